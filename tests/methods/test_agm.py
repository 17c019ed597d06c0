"""AGM: Shapley weights and coefficients by hand, gradient scaling of responses, conditional clip."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from mmbalance.errors import ConfigError
from mmbalance.methods import METHODS
from mmbalance.methods.agm import (
    AGM,
    AGMConfig,
    agm_coefficients,
    response_scores,
    scale_grad,
    shapley_coefficients,
)
from mmbalance.methods.joint import Joint
from mmbalance.tasks import make_task
from mmbalance.train import TrainConfig, Trainer

from ..conftest import tiny_model, tiny_splits

CPU = torch.device("cpu")


def test_shapley_coefficients_two_modalities_match_cremad_net():
    subsets, c = shapley_coefficients(2)
    assert subsets == [(0,), (1,), (0, 1)]
    # m_a = 1/2 [f(a,v) - f(v) + f(a)], m_v = 1/2 [f(a,v) - f(a) + f(v)]
    assert c.tolist() == [[0.5, -0.5, 0.5], [-0.5, 0.5, 0.5]]


def test_shapley_coefficients_three_modalities_match_urfunny_net():
    subsets, c = shapley_coefficients(3)
    col = {t: j for j, t in enumerate(subsets)}
    a, v, t = 0, 1, 2  # text response of URFunny_net.Modality_Text:
    # (f(avt) - f(av) + f(t)) / 3 + (f(at) - f(a) + f(vt) - f(v)) / 6
    expected = {
        (a, v, t): 1 / 3,
        (a, v): -1 / 3,
        (t,): 1 / 3,
        (a, t): 1 / 6,
        (a,): -1 / 6,
        (v, t): 1 / 6,
        (v,): -1 / 6,
    }
    for subset, w in expected.items():
        assert c[t, col[subset]].item() == pytest.approx(w)
    # responses add up to f(N): column sums are 0 except the full set's, which is 1
    for m in (2, 3, 4):
        _, cm = shapley_coefficients(m)
        sums = cm.sum(dim=0)
        assert torch.allclose(sums[:-1], torch.zeros(cm.shape[1] - 1, dtype=cm.dtype), atol=1e-12) and sums[
            -1
        ].item() == pytest.approx(1)
    with pytest.raises(ConfigError, match="at least 2"):
        shapley_coefficients(1)


def test_coefficients_by_hand():
    # M = 2, s = (0.5, 1.0), running (0.8, 0.8): r_a = exp(2 (0.75 - 0.5)) = e^0.5, r_v = e^-0.5, r~ = 1
    k, r, r_ref = agm_coefficients(torch.tensor([0.5, 1.0]), torch.tensor([0.8, 0.8]), alpha=1.0, cap=10.0)
    torch.testing.assert_close(r, torch.tensor([math.exp(0.5), math.exp(-0.5)]))
    torch.testing.assert_close(r_ref, torch.ones(2))
    torch.testing.assert_close(k, torch.tensor([math.exp(1 - math.exp(0.5)), math.exp(1 - math.exp(-0.5))]))
    # the official CREMA-D form: ratio_a = exp(score_v - score_a)
    assert r[0].item() == pytest.approx(math.exp(1.0 - 0.5))
    capped, _, _ = agm_coefficients(torch.tensor([0.5, 1.0]), torch.tensor([0.8, 0.8]), alpha=2.0, cap=0.2)
    assert capped[1].item() == pytest.approx(math.exp(2.0 * 0.2))
    # M = 3 uses the factor 3/2 (URFunny_main.py)
    _, r3, _ = agm_coefficients(torch.tensor([1.0, 2.0, 3.0]), torch.zeros(3), alpha=1.0, cap=7.0)
    torch.testing.assert_close(r3, torch.tensor([math.exp(1.5), 1.0, math.exp(-1.5)]))


def test_response_scores_use_the_clamped_cross_entropy():
    logits = torch.tensor([[[0.0, 0.0]], [[0.0, -40.0]]])  # (M=2, B=1, C=2)
    s = response_scores(logits, torch.tensor([1]), make_task("cls", 2))
    torch.testing.assert_close(s, torch.tensor([math.log(2.0), -math.log(1e-8)]))


def test_scale_grad_is_identity_forward_and_scaled_backward():
    x = torch.tensor([1.0, -2.0], requires_grad=True)
    y = scale_grad(x, torch.tensor(3.0))
    assert torch.equal(y, x)
    (y * torch.tensor([1.0, 10.0])).sum().backward()
    assert x.grad.tolist() == [3.0, 30.0]


def _trainer(balancer, seed=0):
    splits, _ = tiny_splits()
    cfg = TrainConfig(batch_size=16, seed=seed, eval_modality_scores=False, cost_steps=0)
    torch.manual_seed(seed)
    trainer = Trainer(tiny_model(seed=seed), balancer, make_task("cls", 3), cfg, CPU, steps_per_epoch=3)
    data = splits["train"].tensors
    return trainer, [{k: v[i * 16 : (i + 1) * 16] for k, v in data.items()} for i in range(3)]


@pytest.mark.parametrize("mask", ["input", "feature"])
def test_gradient_is_the_k_weighted_sum_of_response_gradients(mask):
    bal = AGM(AGMConfig(alpha=1.0, mask=mask, head_grad_clip=None))
    trainer, batches = _trainer(bal)
    model, batch = trainer.model, batches[0]
    bal.running_score.copy_(torch.tensor([0.2, 3.0]))
    bal.num_scores.fill_(5)
    out = bal.forward_step(model, batch)
    k = bal._means._sums["coeff"].float()
    assert not torch.allclose(k, torch.ones(2))
    torch.testing.assert_close(out.prediction, model(batch).prediction, atol=1e-6, rtol=1e-5)  # Σ m_i = f(N)
    params = list(model.parameters())
    loss = F.cross_entropy(out.prediction, batch["target"])
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    # surrogate: Σ_i k_i <g_p, m_i> with g_p = ∂L/∂p at the same prediction
    outputs = bal._subset_outputs(model, batch) + [model(batch).prediction]
    responses = torch.einsum("ms,s...->m...", bal.shapley, torch.stack(outputs))
    p = responses.sum(0).detach().requires_grad_(True)
    (g_p,) = torch.autograd.grad(F.cross_entropy(p, batch["target"]), p)
    surrogate = sum(k[i] * (g_p * responses[i]).sum() for i in range(2))
    expected = torch.autograd.grad(surrogate, params, allow_unused=True)
    for g, e in zip(grads, expected, strict=True):
        if g is None:
            assert e is None
        else:
            torch.testing.assert_close(g, e, atol=1e-6, rtol=1e-4)


def test_alpha0_gradient_equals_joint_up_to_rounding():
    joint, batches = _trainer(Joint())
    agm, _ = _trainer(AGM(AGMConfig(alpha=0.0, head_grad_clip=None)))
    for trainer in (joint, agm):
        out = trainer.balancer.forward_step(trainer.model, batches[0])
        F.cross_entropy(out.prediction, batches[0]["target"]).backward()
    for pj, pa in zip(joint.model.parameters(), agm.model.parameters(), strict=True):
        torch.testing.assert_close(pa.grad, pj.grad, atol=1e-6, rtol=1e-4)


def test_modulation_window_and_running_mean():
    bal = AGM(AGMConfig(alpha=1.0, modulation_starts=1, modulation_ends=2))
    trainer, batches = _trainer(bal)
    bal.running_score.copy_(torch.tensor([0.2, 3.0]))
    bal.num_scores.fill_(1)
    bal._epoch = 0
    bal.forward_step(trainer.model, batches[0])
    assert torch.equal(
        bal._means._sums["coeff"], torch.ones(2, dtype=torch.float64)
    )  # outside the window: k = 1
    s = bal._means._sums["score"].float()
    torch.testing.assert_close(bal.running_score, (torch.tensor([0.2, 3.0]) + s) / 2)
    assert bal.num_scores.item() == 2


def test_conditional_clip_only_when_a_head_gradient_exceeds_c():
    bal = AGM(AGMConfig(head_grad_clip=1.0))
    trainer, _ = _trainer(bal)
    params = bal._params
    for p in params:
        p.grad = torch.full_like(p, 0.01)
    before = [p.grad.clone() for p in params]
    bal.on_after_backward(None)
    assert all(torch.equal(b, p.grad) for b, p in zip(before, params, strict=True))  # max |g| = 0.01 <= 1
    trainer.model.out_layer.weight.grad[0, 0] = 5.0
    bal.on_after_backward(None)
    total = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params]))
    assert total.item() == pytest.approx(1.0, rel=1e-4)


def test_config_errors():
    with pytest.raises(ConfigError, match="mask"):
        METHODS.build("agm", None, mask="token")
    with pytest.raises(ConfigError, match="cap"):
        METHODS.build("agm", None, cap=0.0)
    with pytest.raises(ConfigError, match="alpha"):
        METHODS.build("agm", None, alpha=-0.5)
