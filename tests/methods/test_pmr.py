"""PMR: prototypes, prototypical logits and loss weights by hand; EMA schedule; alpha=0 == joint."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from mmbalance.balancer import EpochContext
from mmbalance.errors import ConfigError, UnsupportedError
from mmbalance.methods import METHODS
from mmbalance.methods.pmr import PMR, PMRConfig, class_prototypes, pmr_weights, prototype_logits
from mmbalance.models.base import ModelOutput
from mmbalance.tasks import make_task
from mmbalance.train import TrainConfig, Trainer, batch_to_device, fit, make_loader

from ..conftest import tiny_model, tiny_splits
from ._helpers import assert_fits_like_joint

CPU = torch.device("cpu")


def test_class_prototypes_by_hand():
    z = torch.tensor([[1.0, 0.0], [3.0, 0.0], [0.0, 2.0]])
    sums, counts = class_prototypes(z, torch.tensor([0, 0, 1]), 3)
    f64 = torch.float64
    assert torch.equal(sums, torch.tensor([[4.0, 0.0], [0.0, 2.0], [0.0, 0.0]], dtype=f64))
    assert torch.equal(counts, torch.tensor([2.0, 1.0, 0.0], dtype=f64))


def test_prototype_logits_are_negative_euclidean_distances_in_float64():
    logits = prototype_logits(torch.tensor([[0.0, 0.0], [3.0, 4.0]]), torch.tensor([[3.0, 4.0], [0.0, 1.0]]))
    assert logits.dtype == torch.float64
    # -sqrt(3^2 + 3^2) = -sqrt(18) = -4.242640687119285
    assert logits.flatten().tolist() == pytest.approx([-5.0, -1.0, 0.0, -math.sqrt(18.0)], rel=1e-12, abs=0)


def test_distances_close_to_a_prototype_do_not_cancel():
    # 30 samples (torch.cdist switches to |z|^2 + |c|^2 - 2 z.c above 25) at c0 + (2^-10, 0) with
    # c0 = (1000.3, 999.7), c1 = c0 + (0, 2^-9): distances 2^-10 and 2^-10 sqrt(5) (the differences
    # are exact in float64), which the expanded form gets wrong by ~1e-4 relative (|z|^2 = 2e6)
    c = torch.tensor([[1000.3, 999.7], [1000.3, 999.7 + 2.0**-9]], dtype=torch.float64)
    z = (c[0] + torch.tensor([2.0**-10, 0.0], dtype=torch.float64)).repeat(30, 1)
    d = -prototype_logits(z, c)
    assert d[:, 0].tolist() == pytest.approx([2.0**-10] * 30, rel=1e-12, abs=0)
    assert d[:, 1].tolist() == pytest.approx([2.0**-10 * math.sqrt(5.0)] * 30, rel=1e-12, abs=0)


def test_scores_ratio_and_proto_term_in_float64_by_hand():
    # K = 2, targets (0, 0), every z = (0, 0). Modality a: c0 = (1, 0), c1 = (0, 2) -> d = (1, 2),
    # p(y=0) = e^-1 / (e^-1 + e^-2) = 1 / (1 + e^-1); modality b: c0 = (0, 2), c1 = (1, 0) -> d = (2, 1),
    # p(y=0) = 1 / (1 + e). s_a = 2 / (1 + e^-1), s_b = 2 / (1 + e), rho_a = s_a / s_b = e, rho_b = 1/e:
    # b is slower, so proto = alpha * CE_b = alpha * ln(1 + e) = 2 * 1.3132616875182228
    model = tiny_model(dims=(("a", 2), ("b", 2)), classes=2).double()
    bal = PMR(PMRConfig(alpha=2.0))
    bal.setup(model, make_task("cls", 2), lambda params, lr=None, **kw: torch.optim.SGD(params, lr=0.1))
    bal.register_buffer("proto_a", torch.tensor([[1.0, 0.0], [0.0, 2.0]], dtype=torch.float64))
    bal.register_buffer("proto_b", torch.tensor([[0.0, 2.0], [1.0, 0.0]], dtype=torch.float64))
    zeros = torch.zeros(2, 2, dtype=torch.float64)
    batch = {"a": zeros, "b": zeros, "target": torch.tensor([0, 0])}
    output = ModelOutput(torch.zeros(2, 2, dtype=torch.float64), {"a": zeros, "b": zeros})
    terms = bal.loss_terms(output, batch, bal.task)
    diag = bal.diagnostics()
    e = math.e
    assert [diag["ratio/a"], diag["ratio/b"]] == pytest.approx([e, 1 / e], rel=1e-12, abs=0)
    assert [diag["proto_weight/a"], diag["proto_weight/b"]] == [0.0, 2.0]
    assert terms["proto"].dtype == torch.float64
    assert terms["proto"].item() == pytest.approx(2.0 * math.log(1 + e), rel=1e-12, abs=0)


def test_loss_weights_accelerate_only_the_slower_modality():
    assert pmr_weights(torch.tensor([10.0, 20.0]), 2.0).tolist() == [2.0, 0.0]  # audio slower: beta = alpha
    assert pmr_weights(torch.tensor([20.0, 10.0]), 2.0).tolist() == [
        0.0,
        2.0,
    ]  # visual slower: lambda = alpha
    assert pmr_weights(torch.tensor([7.0, 7.0]), 2.0).tolist() == [0.0, 0.0]  # tie: none
    # three modalities s = (1, 2, 4): rho = (0.375, 1.25, 3) -> only the first is slower
    assert pmr_weights(torch.tensor([1.0, 2.0, 4.0]), 0.5).tolist() == [0.5, 0.0, 0.0]


def _setup(balancer, seed=0):
    splits, _ = tiny_splits()
    cfg = TrainConfig(batch_size=16, seed=seed, eval_modality_scores=False, cost_steps=0)
    torch.manual_seed(seed)
    trainer = Trainer(tiny_model(seed=seed), balancer, make_task("cls", 3), cfg, CPU, steps_per_epoch=3)
    train_loader = make_loader(splits["train"], cfg, CPU, train=True)

    def ctx(epoch):
        return EpochContext(
            model=trainer.model,
            epoch=epoch,
            num_epochs=3,
            train_loader=train_loader,
            val_loader=make_loader(splits["val"], cfg, CPU, train=False),
            task=trainer.task,
            device=CPU,
            optimizer=trainer.optimizer,
            to_device=lambda b: batch_to_device(b, CPU),
        )

    return trainer, splits, ctx


def _full_means(model, data, m):
    with torch.no_grad():
        z = model.encoders[m](data[m])
    sums, counts = class_prototypes(z, data["target"], 3)
    return sums / counts[:, None]


def test_prototypes_are_class_means_with_ema_from_the_third_update():
    bal = PMR(PMRConfig(momentum_coef=0.25, proto_fraction=1.0))
    trainer, splits, ctx = _setup(bal)
    data = splits["train"].tensors
    enc = trainer.model.encoders["a"][0]
    bal.on_train_epoch_start(ctx(0))
    torch.testing.assert_close(bal.proto_a, _full_means(trainer.model, data, "a"))
    with torch.no_grad():
        enc.weight.mul_(1.5)
    bal.on_train_epoch_start(ctx(1))  # second update: no EMA yet (official epoch <= 0 branch)
    mean1 = _full_means(trainer.model, data, "a")
    torch.testing.assert_close(bal.proto_a, mean1)
    with torch.no_grad():
        enc.weight.mul_(0.5)
    bal.on_train_epoch_start(ctx(2))
    mean2 = _full_means(trainer.model, data, "a")
    torch.testing.assert_close(bal.proto_a, 0.75 * mean2 + 0.25 * mean1)
    assert bal.proto_batches == 3 * 3  # 48 samples / batch 16, all batches each time
    assert trainer.model.training


def test_proto_term_is_alpha_times_the_slower_modalitys_prototype_ce():
    bal = PMR(PMRConfig(alpha=2.0))
    trainer, splits, ctx = _setup(bal)
    bal.on_train_epoch_start(ctx(0))
    assert bal.proto_batches == 1  # 10 % of 3 batches, at least one
    batch = {k: v[:16] for k, v in splits["train"].tensors.items()}
    out = bal.forward_step(trainer.model, batch)
    terms = bal.loss_terms(out, batch, trainer.task)
    ce, score = {}, {}
    for m in ("a", "b"):
        diff = out.features[m].double()[:, None, :] - getattr(bal, f"proto_{m}")[None]
        logits = -(diff * diff).sum(-1).sqrt()
        ce[m] = F.cross_entropy(logits, batch["target"])
        score[m] = F.softmax(logits, 1)[torch.arange(16), batch["target"]].sum()
    slower = "a" if score["a"] < score["b"] else "b"
    torch.testing.assert_close(terms["proto"], (2.0 * ce[slower]).float())
    torch.testing.assert_close(terms["task"], F.cross_entropy(out.prediction, batch["target"]))


def test_alpha0_reproduces_joint_exactly():
    cfg = TrainConfig(epochs=2, batch_size=16, eval_modality_scores=False, cost_steps=0)
    assert_fits_like_joint(PMR(PMRConfig(alpha=0.0)), cfg)


def test_classification_only_and_config_errors():
    assert not METHODS.get("pmr").supports(task="reg")
    with pytest.raises(UnsupportedError, match="pmr"):
        splits, spec = tiny_splits()
        from dataclasses import replace

        fit(
            tiny_model(),
            PMR(),
            splits,
            replace(spec, task="reg", num_outputs=1),
            make_task("reg", 1),
            TrainConfig(epochs=1, batch_size=16, cost_steps=0),
            CPU,
        )
    assert METHODS.build("pmr", "ave").config.proto_fraction == 1.0  # AVE: a whole loader
    assert METHODS.build("pmr", "cremad").config.proto_fraction == 0.1
    with pytest.raises(ConfigError, match="momentum_coef"):
        METHODS.build("pmr", None, momentum_coef=1.0)
    with pytest.raises(ConfigError, match="proto_fraction"):
        METHODS.build("pmr", None, proto_fraction=0.0)
