"""CGGM's float64 bookkeeping (hand values where Σ Δε cancels), head factories, the per-step trace,
heads that follow the model's dtype, and the heads' saved layout."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mmbalance.datasets.base import TensorDictDataset
from mmbalance.errors import ConfigError, ShapeError
from mmbalance.methods import METHODS
from mmbalance.methods._cggm_formulas import magnitude_coefficients, sequential_sum
from mmbalance.methods._cggm_head_layers import OfficialClassifier
from mmbalance.methods._cggm_heads import msa_head
from mmbalance.methods.cggm import CGGM, CGGMConfig
from mmbalance.tasks import make_task
from mmbalance.train import TrainConfig, Trainer, fit
from tests.conftest import tiny_model, tiny_splits

CPU = torch.device("cpu")
F64 = torch.float64
DIMS3 = (("a", 4), ("b", 3), ("c", 5))


class PlannedHead(nn.Module):
    """A head whose logits are planned per step (its ``out_layer`` still gets the gradient)."""

    def __init__(self, width: int, plan: list[torch.Tensor]) -> None:
        super().__init__()
        self.out_layer = nn.Linear(width, 3)
        self.plan = plan

    def forward(self, x):
        z = self.out_layer(x)
        return z - z.detach() + self.plan.pop(0).to(z.dtype)


def _logits_with_hits(target, hits):
    predicted = target.clone()
    predicted[hits:] = (target[hits:] + 1) % 3
    return F.one_hot(predicted, 3).double()


def test_cancelling_improvements_with_batch_12_give_the_float64_hand_values():
    target = torch.arange(12) % 3
    hits = {"a": (5, 7), "b": (7, 5), "c": (6, 6)}  # step 0, step 1 correct answers out of 12
    plans = {m: [_logits_with_hits(target, k) for k in ks] for m, ks in hits.items()}
    def planned(feature, *, modality, **_):
        return PlannedHead(8, plans[modality])

    balancer = CGGM(CGGMConfig(lam=0.5), planned, trace=True)
    model = tiny_model(dims=DIMS3).double()
    trainer = Trainer(model, balancer, make_task("cls", 3), TrainConfig(batch_size=12), CPU)
    g = torch.Generator().manual_seed(0)
    batch = {m: torch.randn(12, d, generator=g, dtype=F64) for m, d in DIMS3} | {"target": target}
    trainer.train_step(batch, 0, 0)
    trainer.train_step(batch, 0, 1)
    first, second = balancer.trace_records
    # step 0: ε^0 = 0, so Δε = ε = (5/12, 7/12, 6/12) exactly as float64 k/12; S = 18/12 + 1e-8
    assert first["eps"].tolist() == [5 / 12, 7 / 12, 6 / 12]
    s = 1.5 + 1e-8
    hand0 = [(13 / 12 + 1e-8) / s, (11 / 12 + 1e-8) / s, (12 / 12 + 1e-8) / s]  # (S - Δε_i) / S
    torch.testing.assert_close(first["B"], 1.3 * torch.tensor(hand0, dtype=F64), rtol=1e-12, atol=0)
    # step 1: Δε = (7/12 - 5/12, 5/12 - 7/12, 0) = (d, -d, 0): Σ Δε = 0 exactly, S = 1e-8, and
    # c = (1 - d / 1e-8, 1 + d / 1e-8, 1) with d = 1/6: (-16666665.666…, 16666667.666…, 1).
    # float32 bookkeeping gave (-16666664, 16666667, 1): 1e-7 off, and its S is 1.3e-9 off 1e-8.
    assert second["delta"][0].item() == -second["delta"][1].item() and second["delta"][2].item() == 0.0
    assert sequential_sum(second["delta"]).item() == 0.0
    hand1 = [1 - 1e8 / 6, 1 + 1e8 / 6, 1.0]
    torch.testing.assert_close(second["B_raw"], 1.3 * torch.tensor(hand1, dtype=F64), rtol=1e-12, atol=0)
    torch.testing.assert_close(second["B"], second["B_raw"], rtol=0, atol=0)  # no guard by default
    # L_gm = (Σ|c| - Σ c_i cos_i) / 3 with the step's cosines (ρ outside L_gm in the official code)
    cos = second["cos"].tolist()
    hand_gm = (sum(abs(c) for c in hand1) - sum(c * k for c, k in zip(hand1, cos, strict=True))) / 3
    assert math.isclose(second["L_gm"].item(), hand_gm, rel_tol=1e-12)


def test_sum_of_the_improvements_is_taken_in_the_official_order():
    # Python's sum((1, 1e-16, -1)) is (1 + 1e-16) - 1 = 0 (1 + 1e-16 rounds to 1); right to left
    # it would be 1.1e-16. With S = 0 + 1e-8 the coefficients are (1 - Δε_i / 1e-8).
    delta = torch.tensor([1.0, 1e-16, -1.0], dtype=F64)
    assert sequential_sum(delta).item() == 0.0
    c, _ = magnitude_coefficients(delta)
    hand = torch.tensor([1 - 1e8, 1 - 1e-8, 1 + 1e8], dtype=F64)
    torch.testing.assert_close(c, hand, rtol=1e-12, atol=0)


def test_a_float64_model_trains_end_to_end_with_float64_heads():
    splits, spec = tiny_splits(n=36, dims=DIMS3)
    def widen(tensors):
        return TensorDictDataset({n: t.double() if t.is_floating_point() else t for n, t in tensors.items()})

    splits = {k: widen(v.tensors) for k, v in splits.items()}
    balancer = CGGM(CGGMConfig(head_dropout=0.0), trace=True)
    cfg = TrainConfig(epochs=2, batch_size=12, eval_modality_scores=False, cost_steps=0)
    result = fit(tiny_model(dims=DIMS3).double(), balancer, splits, spec, make_task("cls", 3), cfg, CPU)
    assert all(p.dtype == F64 for p in balancer.heads.parameters())
    assert all(s["exp_avg"].dtype == F64 for s in balancer.heads.optimizer.state.values())
    assert len(balancer.trace_records) == 6
    assert all(v.dtype == F64 for r in balancer.trace_records for v in r.values())
    assert 0 <= result.test["acc"] <= 1 and all("eps/a" in h["diagnostics"] for h in result.history)


def test_a_bare_linear_head_factory_from_python_and_registered_heads():
    def bare(feature, *, num_outputs, **_):
        return nn.Linear(feature.shape[-1], num_outputs)

    balancer = CGGM(CGGMConfig(direction="paper", head_dropout=0.0), bare)
    assert balancer.config.head == "custom"
    splits, _ = tiny_splits(n=24)
    batch = {k: v[:12] for k, v in splits["train"].tensors.items()}
    trainer = Trainer(tiny_model(), balancer, make_task("cls", 3), TrainConfig(batch_size=12), CPU)
    trainer.train_step(batch, 0, 0)
    assert all(isinstance(balancer.heads[m], nn.Linear) for m in balancer.modalities)
    # the head is its own out_layer: its recorded input (the paper mode's hidden) is the feature
    features = trainer.model(batch).features
    logits, hidden = balancer.heads(features)
    for m, z, h in zip(balancer.modalities, logits, hidden, strict=True):
        assert torch.equal(h, features[m]) and torch.equal(z, balancer.heads[m](features[m]))
    registered = METHODS.build("cggm", None, head="linear")
    assert registered.config.head == "linear"
    with pytest.raises(ConfigError, match="head"):
        METHODS.build("cggm", None, head="nope")
    with pytest.raises(ConfigError, match="head_factory"):
        CGGM(CGGMConfig(head="custom"))
    with pytest.raises(ConfigError, match="one head choice"):
        CGGM(CGGMConfig(head="msa"), bare)


def _trainer(balancer):
    return Trainer(tiny_model(), balancer, make_task("cls", 3), TrainConfig(batch_size=12), CPU)


def test_a_head_without_out_layer_or_with_another_weight_shape_is_an_error():
    splits, _ = tiny_splits(n=12)
    batch = {k: v[:12] for k, v in splits["train"].tensors.items()}
    cases = [
        (lambda feature, **_: nn.Sequential(nn.Linear(8, 3)), ConfigError, "out_layer"),
        (lambda feature, **_: nn.Sequential(nn.Linear(8, 5), nn.ReLU()), ConfigError, "out_layer"),
    ]
    for factory, error, match in cases:
        trainer = _trainer(CGGM(None, factory))
        with pytest.raises(error, match=match):
            trainer.train_step(batch, 0, 0)

    class Wide(nn.Module):
        def __init__(self):
            super().__init__()
            self.out_layer = nn.Linear(4, 3)
            self.body = nn.Linear(8, 4)

        def forward(self, x):
            return self.out_layer(self.body(x))

    trainer = _trainer(CGGM(None, lambda feature, **_: Wide()))
    with pytest.raises(ConfigError, match=r"compares each head's out_layer weight"):
        trainer.train_step(batch, 0, 0)
    with pytest.raises(ShapeError, match="head='msa' needs sequence features"):
        config = CGGMConfig()
        msa_head(torch.zeros(2, 8), modality="a", out_layer=nn.Linear(8, 3), num_outputs=3, config=config)


def test_msa_head_is_the_official_classifier_with_proj1_applied_twice():
    torch.manual_seed(0)
    head = msa_head(torch.zeros(2, 5, 10), modality="t", out_layer=nn.Linear(10, 1), num_outputs=1,
                    config=CGGMConfig(head_dropout=0.0))
    assert isinstance(head, OfficialClassifier) and len(head.bone.layers) == 2  # cls_layers = head_layers = 2
    x = torch.randn(3, 5, 10)
    hand = head.out_layer(torch.relu(head.proj1(head.proj1(head.bone(x)[:, 0]))))
    assert torch.equal(head(x), hand)


def test_trace_off_records_nothing_and_a_callback_receives_every_step():
    splits, _ = tiny_splits(n=24)
    batches = [{k: v[i : i + 12] for k, v in splits["train"].tensors.items()} for i in (0, 12)]
    seen = []
    for trace in (False, seen.append):
        balancer = CGGM(CGGMConfig(head_dropout=0.0), trace=trace)
        trainer = Trainer(tiny_model(), balancer, make_task("cls", 3), TrainConfig(batch_size=12), CPU)
        for i, batch in enumerate(batches):
            trainer.train_step(batch, 0, i)
        assert balancer.trace_records == []
    assert len(seen) == 2
    assert set(seen[0]) == {"eps", "delta", "B_raw", "B", "cos", "L_gm"}
    assert all(v.dtype == F64 for v in seen[1].values())
    with pytest.raises(ConfigError, match="trace"):
        CGGM(trace="yes")


def test_heads_state_loads_into_unbuilt_heads():
    splits, _ = tiny_splits(n=12)
    batch = {k: v[:12] for k, v in splits["train"].tensors.items()}
    trainer = Trainer(tiny_model(), CGGM(), make_task("cls", 3), TrainConfig(batch_size=12), CPU)
    trainer.train_step(batch, 0, 0)
    state = trainer.balancer.training_state()
    fresh = Trainer(tiny_model(seed=1), CGGM(), make_task("cls", 3), TrainConfig(batch_size=12), CPU)
    assert not fresh.balancer.heads.built
    fresh.balancer.load_training_state(state)
    assert fresh.balancer.heads.built
    for a, b in zip(fresh.balancer.heads.parameters(), trainer.balancer.heads.parameters(), strict=True):
        assert torch.equal(a, b)
    opt_a, opt_b = fresh.balancer.heads.optimizer.state_dict(), trainer.balancer.heads.optimizer.state_dict()
    assert all(torch.equal(opt_a["state"][k]["exp_avg"], v["exp_avg"]) for k, v in opt_b["state"].items())
    assert torch.equal(fresh.balancer.eps_prev, trainer.balancer.eps_prev)


def test_registered_msa_heads_train_on_the_mult_model():
    from mmbalance.datasets.base import DatasetSpec
    from mmbalance.models import MODELS

    shapes = {"text": (5, 6), "audio": (4, 3)}
    spec = DatasetSpec(task="reg", modalities=shapes, num_outputs=1, default_model="mult")
    torch.manual_seed(0)
    model = MODELS.build("mult", None, proj_dim=8, num_heads=2, nlevels=3)(spec)
    balancer = METHODS.build("cggm", "mosi", head="msa")
    cfg = TrainConfig(batch_size=6, clip_grad_norm=0.8)
    trainer = Trainer(model, balancer, make_task("reg", 1), cfg, CPU)
    g = torch.Generator().manual_seed(0)
    batch = {m: torch.randn(6, *s, generator=g) for m, s in shapes.items()}
    batch["target"] = torch.randn(6, generator=g)
    trainer.train_step(batch, 0, 0)
    trainer.train_step(batch, 0, 1)
    for m in shapes:
        head = balancer.heads[m]
        assert isinstance(head, OfficialClassifier)
        assert head.out_layer.weight.shape == model.out_layer.weight.shape
        assert head.bone.embed_dropout.p == 0.15  # the mosi preset's head_dropout
    assert trainer.flush_terms() is None


def test_a_resumed_run_continues_identically_including_the_stale_direction_term():
    import io

    splits, _ = tiny_splits(n=48)
    batches = [{k: v[i : i + 12] for k, v in splits["train"].tensors.items()} for i in range(0, 48, 12)]

    def make(seed):
        balancer = CGGM(CGGMConfig(lam=0.5, head_dropout=0.1))
        return Trainer(tiny_model(seed=seed), balancer, make_task("cls", 3), TrainConfig(batch_size=12), CPU)

    ran = make(0)
    for i in range(3):
        ran.train_step(batches[i], 0, i)
    buf = io.BytesIO()
    torch.save({"model": ran.model.state_dict(), "optimizer": ran.optimizer.state_dict(),
                "balancer": ran.balancer.training_state()}, buf)
    resumed = make(1)  # other initial weights, heads not built yet
    ckpt = torch.load(io.BytesIO(buf.getvalue()), weights_only=True)
    resumed.model.load_state_dict(ckpt["model"])
    resumed.optimizer.load_state_dict(ckpt["optimizer"])
    resumed.balancer.load_training_state(ckpt["balancer"])
    for trainer in (ran, resumed):
        torch.manual_seed(5)  # the same dropout masks from here on
        trainer.train_step(batches[3], 0, 3)  # its loss holds the L_gm of step 2, from the buffers
        trainer.train_step(batches[0], 1, 0)
    for a, b in zip(ran.model.state_dict().values(), resumed.model.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    state, state_resumed = ran.balancer.state_dict(), resumed.balancer.state_dict()
    assert set(state) == set(state_resumed) and all(torch.equal(state[k], state_resumed[k]) for k in state)
