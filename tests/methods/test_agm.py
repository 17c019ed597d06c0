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
    running_mean_update_,
    scale_grad,
    shapley_coefficients,
)
from mmbalance.methods.joint import Joint
from mmbalance.tasks import make_task

from ..conftest import tiny_model, tiny_splits
from ._helpers import tiny_trainer

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


def test_response_scores_in_float64_with_the_two_modality_floor_only():
    # responses (M=2, B=1, C=2), target 1: softmax((0, ln 2))[1] = 2/3 -> s = ln 1.5;
    # softmax((0, -40))[1] = e^-40 / (1 + e^-40) = 4.2e-18 < 1e-8 -> the two-modality scripts give
    # -ln 1e-8 = 18.420680743952367; URFunny_main.py (no floor) gives 40 + ln(1 + e^-40) = 40.0
    logits = torch.tensor([[[0.0, math.log(2.0)]], [[0.0, -40.0]]], dtype=torch.float64)
    task, y = make_task("cls", 2), torch.tensor([1])
    s = response_scores(logits, y, task)
    assert s.dtype == torch.float64
    assert s.tolist() == pytest.approx([math.log(1.5), -math.log(1e-8)], rel=1e-12, abs=0)
    unfloored = response_scores(logits, y, task, floor=torch.finfo(torch.float64).tiny)
    assert unfloored.tolist() == pytest.approx([math.log(1.5), 40.0], rel=1e-12, abs=0)


def test_running_mean_is_the_official_recurrence_in_float64():
    # n = 5 -> 6: running (0.2, 3.0), scores (ln 1.5, 1/3): r * 5/6 + s/6
    running = torch.tensor([0.2, 3.0], dtype=torch.float64)
    count = torch.tensor(5.0, dtype=torch.float64)
    running_mean_update_(running, count, torch.tensor([math.log(1.5), 1 / 3], dtype=torch.float64))
    assert count.item() == 6.0
    expected = [0.2 * 5 / 6 + math.log(1.5) / 6, 3.0 * 5 / 6 + (1 / 3) / 6]
    assert running.tolist() == pytest.approx(expected, rel=1e-12, abs=0)
    # no cap (AVMNIST_main.py): scores (0, 0) -> r = (1, 1); running (4, 0) -> r~_a = exp(2 (2 - 4))
    # = e^-4, r~_v = e^4, so r~_v - r_v = e^4 - 1 = 53.598 > 10: k_v = exp(0.5 (e^4 - 1)) uncapped,
    # exp(0.5 * 10) with the CREMA-D cap; k_a = exp(0.5 (e^-4 - 1)) either way
    scores, running = torch.zeros(2, dtype=torch.float64), torch.tensor([4.0, 0.0], dtype=torch.float64)
    k, _, r_ref = agm_coefficients(scores, running, 0.5, None)
    assert r_ref.tolist() == pytest.approx([math.exp(-4), math.exp(4)], rel=1e-12, abs=0)
    assert k.tolist() == pytest.approx(
        [math.exp(0.5 * (math.exp(-4) - 1)), math.exp(0.5 * (math.exp(4) - 1))], rel=1e-12, abs=0
    )
    capped, _, _ = agm_coefficients(scores, running, 0.5, 10.0)
    assert capped[1].item() == pytest.approx(math.exp(0.5 * 10.0), rel=1e-12)


def test_cap_auto_none_and_the_avmnist_preset():
    model = tiny_model()

    def factory(params, lr=None, **kw):
        return torch.optim.SGD(params, lr=0.1)

    auto, none = AGM(AGMConfig()), AGM(AGMConfig(cap="none"))
    for bal in (auto, none):
        bal.setup(model, make_task("cls", 3), factory)
    assert (auto.cap, none.cap, auto.p_floor) == (10.0, None, 1e-8)
    three = AGM(AGMConfig())
    three.setup(tiny_model(dims=(("a", 4), ("b", 3), ("c", 2))), make_task("cls", 3), factory)
    assert three.cap == 7.0 and three.p_floor == torch.finfo(torch.float64).tiny
    assert METHODS.build("agm", "avmnist").config.cap == "none"
    assert METHODS.build("agm", "cremad").config.cap == "auto"


def test_scale_grad_is_identity_forward_and_scaled_backward():
    x = torch.tensor([1.0, -2.0], requires_grad=True)
    y = scale_grad(x, torch.tensor(3.0))
    assert torch.equal(y, x)
    (y * torch.tensor([1.0, 10.0])).sum().backward()
    assert x.grad.tolist() == [3.0, 30.0]


@pytest.mark.parametrize("mask", ["input", "feature"])
def test_gradient_is_the_k_weighted_sum_of_response_gradients(mask):
    bal = AGM(AGMConfig(alpha=1.0, mask=mask, head_grad_clip=None))
    trainer, batches = tiny_trainer(bal)
    model, batch = trainer.model, batches[0]
    bal.running_score.copy_(torch.tensor([0.2, 3.0]))
    bal.num_scores.fill_(5)
    out = bal.forward_step(model, batch)
    k = bal.epoch_means._sums["coeff"].float()
    assert not torch.allclose(k, torch.ones(2))
    torch.testing.assert_close(out.prediction, model(batch).prediction, atol=1e-6, rtol=1e-5)  # Σ m_i = f(N)
    params = list(model.parameters())
    loss = F.cross_entropy(out.prediction, batch["target"])
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    # surrogate: Σ_i k_i <g_p, m_i> with g_p = ∂L/∂p at the same prediction
    outputs = bal._subset_outputs(model, batch) + [model(batch).prediction]
    responses = torch.einsum("ms,s...->m...", bal.shapley.float(), torch.stack(outputs))
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
    joint, batches = tiny_trainer(Joint())
    agm, _ = tiny_trainer(AGM(AGMConfig(alpha=0.0, head_grad_clip=None)))
    for trainer in (joint, agm):
        out = trainer.balancer.forward_step(trainer.model, batches[0])
        F.cross_entropy(out.prediction, batches[0]["target"]).backward()
    for pj, pa in zip(joint.model.parameters(), agm.model.parameters(), strict=True):
        torch.testing.assert_close(pa.grad, pj.grad, atol=1e-6, rtol=1e-4)


def test_modulation_window_and_running_mean():
    bal = AGM(AGMConfig(alpha=1.0, modulation_starts=1, modulation_ends=2))
    trainer, batches = tiny_trainer(bal)
    bal.running_score.copy_(torch.tensor([0.2, 3.0], dtype=torch.float64))
    bal.num_scores.fill_(1)
    bal._epoch = 0
    bal.forward_step(trainer.model, batches[0])
    k = bal.epoch_means._sums["coeff"]
    assert torch.equal(k, torch.ones(2, dtype=torch.float64))  # outside the window: k = 1
    s = bal.epoch_means._sums["score"]
    expected = torch.tensor([0.2, 3.0], dtype=torch.float64) * 1 / 2 + s / 2
    torch.testing.assert_close(bal.running_score, expected, rtol=1e-12, atol=0)
    assert bal.num_scores.item() == 2


def _softmax_p(row, y):
    exps = [math.exp(v) for v in row]
    return exps[y] / sum(exps)


def test_float64_model_follows_the_official_cremad_arithmetic_step_by_step():
    """A plain re-statement of CREMAD_main.py's AGM branch in Python doubles (masked passes with
    zeroed inputs, clamped scores, math.exp ratios, min(., 10), iteration-weighted running means)
    against the balancer on a float64 model, over three steps, to 1e-12."""
    splits, _ = tiny_splits()
    model = tiny_model().double()
    bal = AGM(AGMConfig(alpha=1.5, head_grad_clip=None))
    bal.setup(model, make_task("cls", 3), lambda params, lr=None, **kw: torch.optim.SGD(params, lr=0.1))
    data = {k: (v.double() if v.is_floating_point() else v) for k, v in splits["train"].tensors.items()}
    train_a, train_v = 0.0, 0.0
    for iteration in range(1, 4):
        batch = {k: v[(iteration - 1) * 12 : iteration * 12] for k, v in data.items()}  # batch of 12
        bal.forward_step(model, batch)
        got = bal.diagnostics()  # one step: the means are this step's values
        with torch.no_grad():
            total = model(batch).prediction.tolist()
            pad_visual = model(dict(batch, b=torch.zeros_like(batch["b"]))).prediction.tolist()
            pad_audio = model(dict(batch, a=torch.zeros_like(batch["a"]))).prediction.tolist()
        label = batch["target"].tolist()
        score_a = score_v = 0.0
        for k in range(12):
            out_a = [
                0.5 * (t - pa + pv) for t, pa, pv in zip(total[k], pad_audio[k], pad_visual[k], strict=True)
            ]
            out_v = [
                0.5 * (t - pv + pa) for t, pa, pv in zip(total[k], pad_audio[k], pad_visual[k], strict=True)
            ]
            score_a += -math.log(max(_softmax_p(out_a, label[k]), 1e-8))
            score_v += -math.log(max(_softmax_p(out_v, label[k]), 1e-8))
        score_a, score_v = score_a / 12, score_v / 12
        ratio_a, ratio_v = math.exp(score_v - score_a), math.exp(score_a - score_v)
        optimal_a, optimal_v = math.exp(train_v - train_a), math.exp(train_a - train_v)
        coeff_a = math.exp(1.5 * min(optimal_a - ratio_a, 10))
        coeff_v = math.exp(1.5 * min(optimal_v - ratio_v, 10))
        train_a = train_a * (iteration - 1) / iteration + score_a / iteration
        train_v = train_v * (iteration - 1) / iteration + score_v / iteration
        assert [got["score/a"], got["score/b"]] == pytest.approx([score_a, score_v], rel=1e-12, abs=0)
        assert [got["coeff/a"], got["coeff/b"]] == pytest.approx([coeff_a, coeff_v], rel=1e-12, abs=0)
        assert bal.running_score.tolist() == pytest.approx([train_a, train_v], rel=1e-12, abs=0)


def test_conditional_clip_only_when_a_head_gradient_exceeds_c():
    bal = AGM(AGMConfig(head_grad_clip=1.0))
    trainer, _ = tiny_trainer(bal)
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
