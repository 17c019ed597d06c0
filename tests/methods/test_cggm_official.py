"""``direction="official"`` against a plain-PyTorch re-statement of the official training step.

The reference below re-states ``zrguo/CGGM:src/msatrain.py`` (``train_model.train``, MOSI branch)
line by line: ``model.zero_grad()``; forward; ``raw_loss = L1 + lamda * l_gm`` (the previous step's
l_gm); ``raw_loss.backward()``; ``cls_optimizer.zero_grad()``; the classifiers on the detached
encoder outputs; ``cls_loss.backward()``; ``cal_cos`` of the output-layer weights; the accuracies
(``train_eval_senti``: sklearn ``accuracy_score`` of ``pred > 0`` vs ``y > 0``, Python floats);
``diff``, ``diff_sum = sum(diff) + 1e-8``, ``coeff``; ``l_gm = np.sum(np.abs(coeff)) - (c0 cos0 +
c1 cos1 + c2 cos2)``, ``/= num_mod``; encoder gradients ``*= coeff[i] * rou``;
``cls_optimizer.step()``; ``clip_grad_norm_(model.parameters(), 0.8)``; ``optimizer.step()``.
Classifiers: ``models/msamodel.py:Classifier`` (``proj1`` applied twice), on the MulT block.
(``nn.DataParallel`` wraps the nets when batch > 10: a pass-through on one device, left out.)

mmbalance runs the same model and classifier weights through ``Trainer.train_step`` with CGGM
(``direction="official"``, the classifiers given as a ``head_factory``) and records its
per-step trace. 8 steps over 2 epochs (a validation pass between them), batch 12, dropout on.
float64: every parameter and every traced value agrees to 1e-12; float32: to float32 resolution
(on CPU with torch 2.14 both agree bit for bit).
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.metrics import accuracy_score
from torch import nn

from mmbalance.datasets.base import DatasetSpec
from mmbalance.methods.cggm import CGGM, CGGMConfig
from mmbalance.models import MODELS
from mmbalance.models.mult import MulTTransformer
from mmbalance.tasks import make_task
from mmbalance.train import TrainConfig, Trainer

CPU = torch.device("cpu")
SHAPES = {"text": (6, 5), "audio": (8, 3), "vision": (7, 4)}  # (L, d_in); encoders.0/1/2 order
BATCH, STEPS_PER_EPOCH, EPOCHS = 12, 4, 2
RHO, LAM, CLS_LR, LR, CLIP = 1.3, 0.2, 5e-4, 1e-3, 0.8
DIM, HEADS, DROPOUT = 8, 2, 0.1


class Classifier(nn.Module):
    """``models/msamodel.py:Classifier``: bone, ``proj1`` on token 0, ``proj1`` again, ReLU, out."""

    def __init__(self) -> None:
        super().__init__()
        self.bone = MulTTransformer(
            DIM, HEADS, 2, attn_dropout=DROPOUT, relu_dropout=DROPOUT, res_dropout=DROPOUT,
            embed_dropout=DROPOUT,
        )
        self.proj1 = nn.Linear(DIM, DIM)
        self.out_layer = nn.Linear(DIM, 1)

    def forward(self, x):
        x = self.bone(x)  # batch-first: x[:, 0] is the official x[0] of the (L, B, d) layout
        x = self.proj1(x[:, 0])
        x = F.relu(self.proj1(x))
        return self.out_layer(x)


def _problem(dtype, seed):
    g = torch.Generator().manual_seed(seed)
    n = BATCH * STEPS_PER_EPOCH
    data = {m: torch.randn(n + BATCH, *shape, generator=g, dtype=dtype) for m, shape in SHAPES.items()}
    # labels rounded to 0.5 steps in [-3, 3]: about one in thirteen is exactly 0 (counted negative)
    data["target"] = (torch.randint(-6, 7, (n + BATCH,), generator=g).to(dtype) / 2)
    batches = [{k: v[i : i + BATCH] for k, v in data.items()} for i in range(0, n, BATCH)]
    val = {k: v[n:] for k, v in data.items()}
    spec = DatasetSpec(task="reg", modalities=SHAPES, num_outputs=1, default_model="mult")
    torch.manual_seed(seed)
    model = MODELS.build(
        "mult", None, proj_dim=DIM, num_heads=HEADS, nlevels=3, attn_dropout=DROPOUT, relu_dropout=DROPOUT,
        res_dropout=DROPOUT, embed_dropout=DROPOUT, out_dropout=DROPOUT,
    )(spec).to(dtype)
    classifiers = {m: Classifier().to(dtype) for m in SHAPES}
    return model, classifiers, batches, val


def _validate(model, val):
    model.eval()
    with torch.no_grad():
        model(val)  # the official evaluate(): eval mode, no gradient, no random draws
    model.train()


def official_msatrain(model, classifiers, batches, val, seed):
    """The re-statement of ``src/msatrain.py``; returns per-step records and parameter snapshots."""
    mods = list(SHAPES)
    classifier = nn.ModuleList(classifiers[m] for m in mods)
    optimizer = torch.optim.Adam(model.parameters(), lr=LR)
    cls_optimizer = torch.optim.Adam(classifier.parameters(), lr=CLS_LR)
    criterion = nn.L1Loss()
    acc1 = [0] * len(mods)
    l_gm = None
    records, snapshots = [], []
    torch.manual_seed(seed + 1)
    for epoch in range(EPOCHS):
        model.train()
        for batch in batches:
            eval_attr = batch["target"].reshape(-1, 1)  # batch_Y (B, 1, 1).squeeze(-1)
            model.zero_grad()
            output = model({m: batch[m] for m in mods})
            preds, hs = output.prediction, [output.features[m].clone().detach() for m in mods]
            raw_loss = criterion(preds, eval_attr)
            if l_gm is not None:
                raw_loss = raw_loss + LAM * l_gm
            raw_loss.backward()
            cls_optimizer.zero_grad()
            cls_res = [classifier[i](hs[i]) for i in range(len(mods))]
            fusion_grad = model.out_layer.weight
            cls_loss = criterion(cls_res[0], eval_attr)
            for i in range(1, len(mods)):
                cls_loss = cls_loss + criterion(cls_res[i], eval_attr)
            cls_loss.backward()
            cls_grad = [classifier[i].out_layer.weight for i in range(len(mods))]
            fgn = fusion_grad.clone().view(-1)  # cal_cos
            llist = [F.cosine_similarity(w.clone().view(-1), fgn, dim=0) for w in cls_grad]
            acc2 = []
            for r in cls_res:  # train_eval_senti(r, eval_attr), exclude_zero=False
                test_preds = r.view(-1).cpu().detach().numpy()
                test_truth = eval_attr.view(-1).cpu().detach().numpy()
                acc2.append(accuracy_score(test_truth > 0, test_preds > 0))
            diff = [acc2[i] - acc1[i] for i in range(len(mods))]
            diff_sum = sum(diff) + 1e-8
            coeff = [(diff_sum - d) / diff_sum for d in diff]
            acc1 = acc2
            l_gm = np.sum(np.abs(coeff)) - (coeff[0] * llist[0] + coeff[1] * llist[1] + coeff[2] * llist[2])
            l_gm /= len(mods)
            for i, m in enumerate(mods):  # `encoders.{i}` in the official names
                for p in model.encoders[m].parameters():
                    p.grad *= coeff[i] * RHO
            cls_optimizer.step()
            torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
            optimizer.step()
            records.append({
                "eps": acc2, "delta": diff, "sum": sum(diff), "B": [c * RHO for c in coeff],
                "cos": [float(c.detach()) for c in llist], "L_gm": float(l_gm.detach()),
            })
            snapshots.append([p.detach().clone() for p in [*model.parameters(), *classifier.parameters()]])
        if epoch + 1 < EPOCHS:
            _validate(model, val)
    return records, snapshots


def mmbalance_cggm(model, classifiers, batches, val, seed):
    """The same run through the library: Trainer + CGGM official, the classifiers as a head factory."""
    config = CGGMConfig(rho=RHO, lam=LAM, cls_lr=CLS_LR, cls_weight_decay=0.0, grad_cos_every=0)
    def head_factory(feature, *, modality, **_):
        return copy.deepcopy(classifiers[modality])

    balancer = CGGM(config, head_factory, trace=True)
    cfg = TrainConfig(batch_size=BATCH, lr=LR, clip_grad_norm=CLIP, seed=seed)
    trainer = Trainer(model, balancer, make_task("reg", 1), cfg, CPU, steps_per_epoch=STEPS_PER_EPOCH)
    snapshots = []
    torch.manual_seed(seed + 1)
    for epoch in range(EPOCHS):
        model.train()
        balancer.train()
        for i, batch in enumerate(batches):
            trainer.train_step(batch, epoch, i)
            heads = [p.detach().clone() for m in SHAPES for p in balancer.heads[m].parameters()]
            snapshots.append([*(p.detach().clone() for p in model.parameters()), *heads])
        if epoch + 1 < EPOCHS:
            _validate(model, val)
    assert balancer.config.head == "custom"
    return balancer.trace_records, snapshots


@pytest.mark.parametrize("dtype, rtol, atol", [(torch.float64, 1e-12, 1e-12), (torch.float32, 1e-6, 1e-7)])
def test_official_direction_equals_the_official_step(dtype, rtol, atol):
    seed = 7  # a seed whose runs (float64 and float32) have steps with Σ Δε = 0 exactly
    model, classifiers, batches, val = _problem(dtype, seed)
    reference = official_msatrain(copy.deepcopy(model), copy.deepcopy(classifiers), batches, val, seed)
    ref_records, ref_params = reference
    records, params = mmbalance_cggm(model, classifiers, batches, val, seed)
    assert len(records) == len(ref_records) == EPOCHS * STEPS_PER_EPOCH
    # the case that float32 bookkeeping gets wrong: the improvements cancel, Σ Δε + 1e-8 is 1e-8
    assert any(r["sum"] == 0.0 for r in ref_records[1:])

    def close(ours, ref, what, step):
        ref = torch.as_tensor(ref, dtype=torch.float64)
        message = f"{what}, step {step}"
        torch.testing.assert_close(ours.double(), ref, rtol=rtol, atol=atol, msg=lambda m: f"{message}: {m}")

    for step, (ours, ref) in enumerate(zip(records, ref_records, strict=True)):
        for key in ("eps", "delta", "B", "cos", "L_gm"):
            assert ours[key].dtype == torch.float64
            close(ours[key], ref[key], key, step)
        close(ours["B_raw"], ref["B"], "B_raw", step)
        assert ours["eps"].tolist() == ref["eps"]  # k / 12 exactly, in both precisions
        for i, (a, b) in enumerate(zip(params[step], ref_params[step], strict=True)):
            close(a, b, f"parameter {i}", step)
