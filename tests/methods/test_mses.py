"""MSES: the smoothed early-stopping rule by hand, stop + restore + freeze, joint-neutral patience."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import mmbalance.methods._validation_heads as validation_heads_module
from mmbalance.balancer import EpochContext
from mmbalance.errors import ConfigError
from mmbalance.methods import METHODS
from mmbalance.methods.mses import MSES, MSESConfig, mses_step
from mmbalance.tasks import make_task
from mmbalance.train import TrainConfig, Trainer, batch_to_device, make_loader

from ._helpers import assert_fits_like_joint, float64_problem, tiny_epoch

CPU = torch.device("cpu")
CFG = TrainConfig(epochs=2, batch_size=16, eval_modality_scores=False, cost_steps=0)


def test_smoothed_patience_rule_by_hand():
    # raw val losses after epochs 0..5; smoothed = 0.6 * previous raw + 0.4 * current raw
    raws = [1.0, 0.8, 0.9, 0.95, 0.97, 0.99]
    expected_smoothed = [1.0, 0.92, 0.84, 0.92, 0.958, 0.978]
    expected_stop = [False, False, False, False, False, True]  # best at epoch 2; 5 - 2 > patience 2
    best, best_epoch, previous = float("inf"), -1, None
    for epoch, raw in enumerate(raws):
        smoothed, best, best_epoch, improved, stop = mses_step(
            raw, previous, best, best_epoch, epoch, smoothing=0.4, patience=2
        )
        previous = raw
        assert smoothed == pytest.approx(expected_smoothed[epoch])
        assert improved == (epoch <= 2) and stop == expected_stop[epoch]
    assert (best, best_epoch) == (pytest.approx(0.84), 2)


def _setup(restore="modality", stop_mode="freeze"):
    return tiny_epoch(MSES(MSESConfig(patience=0, restore=restore, stop_mode=stop_mode)), CFG, num_epochs=4)


def _epoch(trainer, ctx, batches, epoch, scripted, monkeypatch):
    monkeypatch.setattr(validation_heads_module, "unimodal_validation", lambda *a, **k: scripted)
    trainer.balancer.on_train_epoch_start(EpochContext(**{**ctx.__dict__, "epoch": epoch}))
    for i, b in enumerate(batches):
        trainer.train_step(b, epoch, i)


@pytest.mark.parametrize("restore", ["modality", "model"])
def test_stop_restores_the_best_epoch_and_freezes_the_encoder(monkeypatch, restore):
    trainer, ctx, batches = _setup(restore=restore)
    model, balancer = trainer.model, trainer.balancer
    _epoch(trainer, ctx, batches, 0, None, monkeypatch)
    at_best = {k: v.clone() for k, v in model.state_dict().items()}
    _epoch(trainer, ctx, batches, 1, {"a": (1.0, 0.5), "b": (1.0, 0.5)}, monkeypatch)  # first: best for both
    # a got worse (0.6 * 1.0 + 0.4 * 1.5 = 1.2 > 1.0): patience 0 runs out; b improved (0.6 + 0.32 = 0.92)
    _epoch(trainer, ctx, batches, 2, {"a": (1.5, 0.5), "b": (0.8, 0.5)}, monkeypatch)
    assert balancer.stopped.tolist() == [True, False] and balancer.stopped_at.tolist() == [1, -1]
    after = model.state_dict()
    for k, v in after.items():
        if k.startswith("encoders.a."):
            # restored at the start of epoch 2 to its state after epoch 0, then frozen through epoch 2
            assert torch.equal(v, at_best[k]), k
        elif restore == "modality":
            assert not torch.equal(v, at_best[k]), k  # the rest kept training
    d = balancer.diagnostics()
    assert d["stopped/a"] == 1.0
    assert d["smoothed/a"] == pytest.approx(1.2) and d["smoothed/b"] == pytest.approx(0.92)


def test_zero_stop_mode_keeps_the_reimplementations_momentum_drift(monkeypatch):
    trainer, ctx, batches = _setup(restore="none", stop_mode="zero")
    _epoch(trainer, ctx, batches, 0, None, monkeypatch)
    _epoch(trainer, ctx, batches, 1, {"a": (1.0, 0.5), "b": (1.0, 0.5)}, monkeypatch)
    stopped_state = [p.clone() for p in trainer.model.encoders["a"].parameters()]
    _epoch(trainer, ctx, batches, 2, {"a": (1.5, 0.5), "b": (0.8, 0.5)}, monkeypatch)
    grads_zeroed = [p.grad for p in trainer.model.encoders["a"].parameters()]
    assert all(g is None for g in grads_zeroed)  # zero_grad(set_to_none) after the step
    now = trainer.model.encoders["a"].parameters()
    moved = any(not torch.equal(p, q) for p, q in zip(now, stopped_state, strict=True))
    assert moved  # Adam's momentum still moves a "stopped" encoder when its gradient is only zeroed


def test_large_patience_reproduces_joint_exactly():
    cfg = TrainConfig(epochs=3, batch_size=16, eval_modality_scores=False, cost_steps=0)
    result = assert_fits_like_joint(MSES(MSESConfig(patience=100)), cfg)
    assert result.history[-1]["diagnostics"]["val_loss/a"] > 0  # it did measure


def test_config_errors():
    with pytest.raises(ConfigError, match="smoothing must be in \\(0, 1\\]"):
        METHODS.build("mses", None, smoothing=0.0)
    with pytest.raises(ConfigError, match="restore must be one of"):
        METHODS.build("mses", None, restore="all")
    with pytest.raises(ConfigError, match="patience must be an integer >= 0"):
        METHODS.build("mses", None, patience=-1)


def test_float64_model_keeps_the_validation_losses_and_their_smoothing_in_float64():
    """On a float64 model the unimodal validation losses are float64, as the AGM code's
    `loss_a.item()` of a float64 model; smoothed = 0.6 · L(e−1) + 0.4 · L(e) in Python floats. A
    float32 cast of the predictions is off by ~1e-8 relative."""
    model, splits, _ = float64_problem()
    balancer = MSES(MSESConfig(patience=100))
    task = make_task("cls", 3)
    trainer = Trainer(model, balancer, task, CFG, CPU, steps_per_epoch=3)
    train = [batch_to_device(b, CPU) for b in make_loader(splits["train"], CFG, CPU, train=True)]
    val = [batch_to_device(b, CPU) for b in make_loader(splits["val"], CFG, CPU, train=False)]
    ctx = EpochContext(
        model=model, epoch=0, num_epochs=3,
        train_loader=make_loader(splits["train"], CFG, CPU, train=True),
        val_loader=make_loader(splits["val"], CFG, CPU, train=False), task=task, device=CPU,
        optimizer=trainer.optimizer, to_device=lambda b: batch_to_device(b, CPU),
    )

    def per_sample_val_loss():  # re-statement: Σ_i CE(head_m(φ_m(x_i)), y_i) / N in float64
        sums, count = {"a": 0.0, "b": 0.0}, 0
        with torch.no_grad():
            for b in val:
                features = model.encode(b)[0]
                for m in sums:
                    logits = balancer.heads.heads[m](features[m])
                    sums[m] += F.cross_entropy(logits, b["target"], reduction="sum").item()
                count += len(b["target"])
        return {m: s / count for m, s in sums.items()}

    losses = []
    for epoch in (0, 1):
        balancer.on_train_epoch_start(EpochContext(**{**ctx.__dict__, "epoch": epoch}))
        for i, b in enumerate(train):
            trainer.train_step(b, epoch, i)
        losses.append(per_sample_val_loss())
    balancer.on_train_epoch_start(EpochContext(**{**ctx.__dict__, "epoch": 2}))
    for i, m in enumerate(("a", "b")):
        assert balancer.val_loss[i].item() == pytest.approx(losses[1][m], rel=1e-12, abs=0)
        smoothed = 0.6 * losses[0][m] + 0.4 * losses[1][m]
        assert balancer.smoothed_loss[i].item() == pytest.approx(smoothed, rel=1e-12, abs=0)
