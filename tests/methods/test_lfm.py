"""LFM: the alignment, the fitted schedule, the α update and the hypergradient by hand; 2x joint with no
alignment; the learned α from validation data only; config errors; short runs on every declared task."""

from __future__ import annotations

import math

import pytest
import torch

from mmbalance.balancer import EpochContext
from mmbalance.errors import ConfigError
from mmbalance.methods import METHODS
from mmbalance.methods.joint import Joint
from mmbalance.methods.lfm import (
    LFM,
    LFMConfig,
    alignment,
    fitted_weights,
    hypergradient,
    learned_alpha,
    pairwise_alignment,
)
from mmbalance.train import batch_to_device, make_loader

from ..conftest import tiny_splits
from ._helpers import short_fit, tiny_trainer

CPU = torch.device("cpu")
# softmax: (0, 0) -> p = (1/2, 1/2); (ln 3, 0) -> q = (3/4, 1/4)
P = torch.tensor([[0.0, 0.0]])
Q = torch.tensor([[math.log(3.0), 0.0]])
# m = (5/8, 3/8); KL(m || p) = 5/8 ln(5/4) + 3/8 ln(3/4) = 0.13946472 - 0.10788078 = 0.03158394
# KL(m || q) = 5/8 ln(5/6) + 3/8 ln(3/2) = -0.11395097 + 0.15204942 = 0.03809845
JS_PQ = 0.5 * (0.03158394 + 0.03809845)  # = 0.03484120


def test_alignment_by_hand():
    torch.testing.assert_close(alignment(P, Q), torch.tensor(JS_PQ))
    torch.testing.assert_close(alignment(Q, P), torch.tensor(JS_PQ))
    # batch mean over rows: the pair (p, q) and the pair (p, p), whose alignment is 0
    torch.testing.assert_close(alignment(torch.cat([P, P]), torch.cat([Q, P])), torch.tensor(JS_PQ / 2))


def test_three_modalities_sum_the_pairs():
    # (p, q) + (p, p) + (q, p): 2 JS, not the mean over pairs
    torch.testing.assert_close(pairwise_alignment([P, Q, P]), torch.tensor(2 * JS_PQ))
    maps = [z.reshape(1, 2, 1, 1) for z in (P, Q)]  # one pixel per map
    torch.testing.assert_close(pairwise_alignment(maps), torch.tensor(JS_PQ))
    with pytest.raises(ConfigError, match="at least 2"):
        pairwise_alignment([P])


def test_fitted_schedule_by_hand():
    assert fitted_weights(0) == pytest.approx((0.204623704, 0.795376296), abs=1e-12)
    # epoch 10: 0.204623704 + 0.0335472727 + 0.0122989557 - 0.00292947416 + 0.000223835486 - 0.00000539717505
    a_cls, a_align = fitted_weights(10)
    assert a_cls == pytest.approx(0.247758896551, abs=1e-11)
    assert a_align == pytest.approx(1 - 0.247758896551, abs=1e-11)


def test_learned_alpha_update_by_hand():
    # 0.95 - 1e-4 * 100 = 0.94; alpha_cls = 0.06
    assert learned_alpha(0.95, 1e-4, 100.0, epoch=3) == pytest.approx((0.06, 0.94, 1e-4))
    # epoch 20 halves the step first: 0.5 - 5e-5 * (-2000) = 0.6
    assert learned_alpha(0.5, 1e-4, -2000.0, epoch=20) == pytest.approx((0.4, 0.6, 5e-5))
    # clipped to [0.05, 0.95]
    assert learned_alpha(0.1, 1e-4, 1e4, epoch=1)[1] == pytest.approx(0.05)
    assert learned_alpha(0.9, 1e-4, -1e4, epoch=0)[1] == pytest.approx(0.95)


def test_hypergradient_by_hand():
    # p0 = 1, p1 = 2; S = p0^2 p1, A = p0 p1^2, T = 0.5 S + 0.5 A
    # grad S = (2 p0 p1, p0^2) = (4, 1); Hessian row 0 of T: (0.5 * 2 p1, 0.5 * 2 p0 + 0.5 * 2 p1) = (2, 3)
    # (H grad S)_0 = 2 * 4 + 3 * 1 = 11 (only the first parameter's block, as the official [0])
    p0 = torch.tensor(1.0, requires_grad=True)
    p1 = torch.tensor(2.0, requires_grad=True)
    value = hypergradient(p0**2 * p1, p0 * p1**2, 0.5, 0.5, [p0, p1])
    torch.testing.assert_close(value, torch.tensor(11.0))
    assert p0.grad is None and p1.grad is None  # nothing accumulates into .grad


def test_config_errors():
    with pytest.raises(ConfigError, match="weighting"):
        METHODS.build("lfm", None, weighting="heuristic")
    with pytest.raises(ConfigError, match="alpha"):
        METHODS.build("lfm", None, weighting="fixed", alpha=1.5)
    with pytest.raises(ConfigError, match="alpha"):
        METHODS.build("lfm", None, weighting="learned", alpha=0.99)
    with pytest.raises(ConfigError, match="lr_alpha"):
        METHODS.build("lfm", None, lr_alpha=-1.0)


def _trainer(balancer):
    """:func:`tiny_trainer` of ``balancer``, with the tiny problem's splits (for epoch contexts)."""
    trainer, batches = tiny_trainer(balancer)
    return trainer, tiny_splits()[0], batches


def _epoch_context(trainer, splits, epoch=0, num_epochs=2):
    return EpochContext(
        model=trainer.model, epoch=epoch, num_epochs=num_epochs,
        train_loader=make_loader(splits["train"], trainer.cfg, CPU, train=True),
        val_loader=make_loader(splits["val"], trainer.cfg, CPU, train=False),
        task=trainer.task, device=CPU, optimizer=trainer.optimizer,
        to_device=lambda b: batch_to_device(b, CPU),
    )


def _grads(trainer, batch):
    captured = {}
    original = trainer.balancer.on_after_backward

    def spy(ctx):
        original(ctx)
        captured.update({n: p.grad.clone() for n, p in ctx.model.named_parameters()})

    trainer.balancer.on_after_backward = spy
    trainer.train_step(batch, 0, 0)
    return captured


def test_without_alignment_the_gradients_are_twice_joints():
    # L = 2 (1 * L_task + 0 * JS): no neutral setting reproduces joint, but the gradients are exactly 2x
    joint, _, batches = _trainer(Joint())
    lfm, _, _ = _trainer(LFM(LFMConfig(weighting="fixed", alpha=0.0)))
    g_joint, g_lfm = _grads(joint, batches[0]), _grads(lfm, batches[0])
    for name, g in g_joint.items():
        assert torch.equal(g_lfm[name], 2 * g), name
    assert lfm.balancer.heads.optimizer.state  # the heads learn from their own detached loss


def test_learned_alpha_uses_the_validation_batch_and_leaves_the_run_untouched():
    trainer, splits, _ = _trainer(LFM(LFMConfig(weighting="learned", lr_alpha=1.0)))
    bal = trainer.balancer
    trainer.balancer.heads({m: torch.zeros(1, 8) for m in bal.modalities})  # build the heads
    norm = torch.nn.BatchNorm1d(8)  # train-mode forward passes update its running statistics
    trainer.model.encoders["a"].append(norm)
    rng = torch.random.get_rng_state()
    bal.on_train_epoch_start(_epoch_context(trainer, splits))
    assert torch.equal(torch.random.get_rng_state(), rng)
    assert all(p.grad is None for p in trainer.model.parameters())
    assert torch.equal(norm.running_mean, torch.zeros(8)) and int(norm.num_batches_tracked) == 0
    # recompute the official alpha_grad on the first half of the first validation batch
    val = next(iter(make_loader(splits["val"], trainer.cfg, CPU, train=False)))
    half = {k: v[:8] for k, v in val.items()}
    out = trainer.model(half)
    uni = bal.heads(out.features)
    params = [p for p in trainer.model.parameters()] + list(bal.heads.parameters())
    grad = hypergradient(trainer.task.loss(out.prediction, half["target"]),
                         pairwise_alignment([uni[m] for m in bal.modalities]), 0.05, 0.95, params)
    expected = min(0.95, max(0.05, 0.95 - float(grad)))
    assert bal._alpha_align == pytest.approx(expected, abs=1e-6)
    assert bal._alpha_cls == pytest.approx(1 - expected, abs=1e-6)
    state = bal.host_state()
    bal._alpha_align = bal._alpha_cls = bal._lr_alpha = -1.0
    bal.load_host_state(state)
    assert bal.host_state() == state


def test_fitted_schedule_refuses_runs_beyond_its_range():
    trainer, splits, _ = _trainer(LFM())
    trainer.balancer.on_train_epoch_start(_epoch_context(trainer, splits, epoch=3, num_epochs=200))
    assert trainer.balancer.diagnostics()["alpha_cls"] == pytest.approx(fitted_weights(3)[0])
    with pytest.raises(ConfigError, match="epochs 0-199"):
        trainer.balancer.on_train_epoch_start(_epoch_context(trainer, splits, num_epochs=201))


@pytest.mark.parametrize("dataset", ["synthetic_cls2", "synthetic_cls3", "synthetic_seg4"])
def test_short_run_on_each_declared_synthetic_task(dataset):
    result = short_fit("lfm", dataset)
    assert result.history[1]["diagnostics"]["alpha_cls"] == pytest.approx(fitted_weights(1)[0])


@pytest.mark.parametrize("dataset", ["synthetic_cls2", "synthetic_seg4"])
def test_short_learned_run(dataset):
    result = short_fit("lfm", dataset, weighting="learned")
    alphas = [r["diagnostics"]["alpha_align"] for r in result.history]
    assert all(0.05 <= a <= 0.95 for a in alphas)


def test_regression_is_not_declared():
    assert not LFM.supports(task="reg")
