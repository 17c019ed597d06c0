"""MMPareto: min-norm weights and the combined gradient by hand; per-loss capture in the step; AMP."""

from __future__ import annotations

import math

import pytest
import torch

from mmbalance.balancer import StepContext
from mmbalance.errors import ConfigError
from mmbalance.methods import METHODS
from mmbalance.methods.mmpareto import MMPareto, MMParetoConfig, min_norm_two, pareto_combine, pareto_weights
from mmbalance.tasks import make_task
from mmbalance.train import TrainConfig, Trainer

from ..conftest import tiny_model, tiny_splits

CPU = torch.device("cpu")
T = torch.tensor


def test_weights_for_a_conflicting_and_a_non_conflicting_pair():
    # conflict: g_mm = (1, 0), g_m = (-1, 1): <.,.> = -1, |g_mm|^2 = 1, |g_m|^2 = 2
    # c = (2 - (-1)) / (1 + 2 + 2) = 0.6; c g_mm + (1 - c) g_m = (0.2, 0.4) is orthogonal to g_mm - g_m
    a_mm, a_m, cos = pareto_weights(T([1.0, 0.0]), T([-1.0, 1.0]))
    assert (a_mm.item(), a_m.item()) == pytest.approx((0.6, 0.4))
    assert cos.item() == pytest.approx(-1 / math.sqrt(2))
    # no conflict: g_mm = (1, 0), g_m = (1, 1): cos > 0 -> equal weights
    a_mm, a_m, cos = pareto_weights(T([1.0, 0.0]), T([1.0, 1.0]))
    assert (a_mm.item(), a_m.item()) == (0.5, 0.5)
    # MinNormSolver's boundary cases: <x1,x2> >= |x1|^2 -> 0.999, <x1,x2> >= |x2|^2 -> 0.001
    assert min_norm_two(T(0.0), T(0.0), T(4.0)).item() == pytest.approx(0.999)
    assert min_norm_two(T(4.0), T(0.0), T(0.0)).item() == pytest.approx(0.001)
    assert min_norm_two(T(1.0), T(-1.0), T(2.0)).item() == pytest.approx(0.6)


def test_weights_and_cosine_of_float32_gradients_are_float64_exact():
    # float32 g_mm = (1, 0), g_m = (-1, 1): c = 3/5 = 0.6 and cos = -1/sqrt(2) are not float32
    # numbers; the official weights are NumPy doubles, so they must hold to 1e-12
    a_mm, a_m, cos = pareto_weights(T([1.0, 0.0]), T([-1.0, 1.0]))
    assert a_mm.dtype == a_m.dtype == cos.dtype == torch.float64
    assert (a_mm.item(), a_m.item()) == pytest.approx((0.6, 0.4), rel=1e-12, abs=0)
    assert cos.item() == pytest.approx(-1 / math.sqrt(2), rel=1e-12, abs=0)
    # inner products of float32 values wider than float32: g_mm = (1 + 2^-20, 0), g_m = (-1, 2^-12)
    # <.,.> = -(1 + 2^-20), |g_mm|^2 = 1 + 2^-19 + 2^-40, |g_m|^2 = 1 + 2^-24
    # c = (|g_m|^2 - <.,.>) / (|g_mm|^2 + |g_m|^2 - 2 <.,.>)
    x = 1.0 + 2.0**-20
    a_mm, _, _ = pareto_weights(T([x, 0.0]), T([-1.0, 2.0**-12]))
    c = (1 + 2.0**-24 + x) / (x * x + 1 + 2.0**-24 + 2 * x)
    assert a_mm.item() == pytest.approx(c, rel=1e-12, abs=0)


def test_combined_gradient_by_hand_with_rescale_to_the_summed_norm():
    # g_mm = (1, 0), g_m = (-1, 1): c = 0.6 -> ĝ = 2 (0.2, 0.4) = (0.4, 0.8), |ĝ| = sqrt(0.8)
    # |g_mm + g_m| = |(0, 1)| = 1 > |ĝ| -> ĝ / sqrt(0.8), then x γ = 1.5
    new, a_mm, cos = pareto_combine(T([1.0, 0.0]), T([-1.0, 1.0]), [2], gamma=1.5)
    s = 1.5 / math.sqrt(0.8)
    torch.testing.assert_close(new, T([0.4 * s, 0.8 * s]))
    assert a_mm.item() == pytest.approx(0.6)
    assert cos.item() < 0


def test_zero_combined_tensor_keeps_zero_where_the_official_code_writes_nan():
    # tensors of sizes 1 and 1: g_mm = (1 | 1), g_m = (1 | -3): <.,.> = -2, |g_mm|^2 = 2, |g_m|^2 = 10
    # c = (10 + 2) / (2 + 10 + 4) = 0.75 -> ĝ = 2 (0.75 g_mm + 0.25 g_m) = (2 | 0) exactly
    # tensor 1: |sum| = 2 = |ĝ_1| -> 2 x γ
    # tensor 2: |sum| = 2, |ĝ_2| = 0 -> official diff = inf, inf * 0 = NaN
    new, a_mm, _ = pareto_combine(T([1.0, 1.0]), T([1.0, -3.0]), [1, 1], gamma=1.5)
    assert a_mm.item() == 0.75
    torch.testing.assert_close(new, T([3.0, 0.0]))


def test_a_tensor_whose_combined_gradient_is_larger_keeps_its_norm():
    # sizes 1 and 1: g_mm = (3, 1), g_m = (-1, -2): c = (5 + 5) / (10 + 5 + 10) = 0.4
    # ĝ = 2 (0.4 (3, 1) + 0.6 (-1, -2)) = (1.2, -1.6); sum = (2, -1)
    # tensor 1: |2| / |1.2| > 1 -> 2.0; tensor 2: |-1| / |-1.6| < 1 -> -1.6 unchanged
    new, _, _ = pareto_combine(T([3.0, 1.0]), T([-1.0, -2.0]), [1, 1], gamma=1.0)
    torch.testing.assert_close(new, T([2.0, -1.6]))


def test_non_conflicting_gradients_give_gamma_times_the_sum():
    # equal weights make ĝ the summed gradient (the "uniform baseline"); γ = 1 is that baseline
    g_mm, g_m = T([1.0, 0.0, 0.5]), T([1.0, 1.0, 0.25])
    new, _, _ = pareto_combine(g_mm, g_m, [2, 1], gamma=1.0)
    torch.testing.assert_close(new, g_mm + g_m)
    new, _, _ = pareto_combine(g_mm, g_m, [2, 1], gamma=1.5)
    torch.testing.assert_close(new, 1.5 * (g_mm + g_m))


def _step_grads(scaler_enabled: bool = False, gamma: float = 1.5):
    """Run one step's backward + on_after_backward by hand; return model, balancer, batch, terms."""
    splits, _ = tiny_splits()
    task = make_task("cls", 3)
    torch.manual_seed(0)
    model = tiny_model()
    balancer = MMPareto(MMParetoConfig(gamma=gamma))
    trainer = Trainer(model, balancer, task, TrainConfig(batch_size=16, cost_steps=0), CPU)
    batch = {k: v[:16] for k, v in splits["train"].tensors.items()}
    scaler = torch.amp.GradScaler("cpu", enabled=scaler_enabled, init_scale=1024.0)
    output = balancer.forward_step(model, batch)
    terms = balancer.loss_terms(output, batch, task)
    balancer.backward(terms, scaler)
    scaler.unscale_(trainer.optimizer)
    ctx = StepContext(model, batch, output, terms, trainer.optimizer, scaler, 0, 0, 0, 1)
    balancer.on_after_backward(ctx)
    return model, balancer, batch, task


def test_the_step_captures_each_loss_gradient_and_edits_only_the_encoders():
    model, balancer, batch, task = _step_grads()
    # reference: per-loss gradients computed independently on the same weights
    output = model(batch)
    heads = balancer.heads(output.features)
    loss_mm = task.loss(output.prediction, batch["target"])
    for m in model.modalities:
        params = model.modality_parameters(m)
        g_mm = torch.autograd.grad(loss_mm, params, retain_graph=True)
        g_m = torch.autograd.grad(task.loss(heads[m], batch["target"]), params, retain_graph=True)
        sizes = [p.numel() for p in params]
        expected, _, _ = pareto_combine(
            torch.cat([g.reshape(-1) for g in g_mm]), torch.cat([g.reshape(-1) for g in g_m]), sizes, 1.5
        )
        torch.testing.assert_close(torch.cat([p.grad.reshape(-1) for p in params]), expected)
    shared = list(model.shared_parameters())
    for p, g in zip(shared, torch.autograd.grad(loss_mm, shared, retain_graph=True), strict=True):
        torch.testing.assert_close(p.grad, g)  # fusion and head keep the plain L_mm gradient
    head_params = list(balancer.heads.heads["a"].parameters())
    expected_head = torch.autograd.grad(task.loss(heads["a"], batch["target"]), head_params)
    for p, g in zip(head_params, expected_head, strict=True):
        torch.testing.assert_close(p.grad, g)


def test_amp_scaled_losses_give_the_unscaled_result():
    plain, _, _, _ = _step_grads(scaler_enabled=False)
    scaled, _, _, _ = _step_grads(scaler_enabled=True)
    for p, q in zip(plain.parameters(), scaled.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-7)


def test_config_errors_and_missing_terms():
    with pytest.raises(ConfigError, match="gamma"):
        METHODS.build("mmpareto", None, gamma=0.0)
    with pytest.raises(ConfigError, match="sequence_pool"):
        METHODS.build("mmpareto", None, sequence_pool="max")
    balancer = MMPareto()
    balancer.setup(
        tiny_model(), make_task("cls", 3), lambda params, lr=None, **kw: torch.optim.SGD(params, lr=0.1)
    )
    with pytest.raises(ConfigError, match="unimodal/a"):
        balancer.backward(
            {"task": torch.zeros((), requires_grad=True)}, torch.amp.GradScaler("cpu", enabled=False)
        )
