"""OGM-GE: Eq. 10 by hand, pairwise ratios, GE noise statistics, neutral setting == joint."""

from __future__ import annotations

import math

import pytest
import torch

from mmbalance.errors import ConfigError
from mmbalance.methods import METHODS
from mmbalance.methods.ogm_ge import (
    OGMGE,
    OGMGEConfig,
    confidence_score,
    gaussian_enhance_,
    ogm_coefficients,
    pairwise_ratios,
)
from mmbalance.tasks import make_task

from ._helpers import assert_same_parameters, joint_and, tiny_trainer, train_steps

CPU = torch.device("cpu")


def test_eq10_two_modalities_by_hand():
    # s_a = 20, s_v = 30 -> rho_v = 1.5 (visual dominant), rho_a = 2/3
    ratios = pairwise_ratios(torch.tensor([20.0, 30.0]))
    torch.testing.assert_close(ratios, torch.tensor([2 / 3, 1.5]))
    k = ogm_coefficients(ratios, alpha=0.8)
    # k_v = 1 - tanh(0.8 * 1.5) = 1 - tanh(1.2) = 1 - 0.8336546070 = 0.1663453930; k_a = 1
    torch.testing.assert_close(k, torch.tensor([1.0, 0.1663453930]))


def test_pairwise_ratios_three_modalities_by_hand():
    # s = (1, 2, 4): rho_0 = (1/2 + 1/4)/2 = 0.375, rho_1 = (2 + 1/2)/2 = 1.25, rho_2 = (4 + 2)/2 = 3
    ratios = pairwise_ratios(torch.tensor([1.0, 2.0, 4.0]))
    torch.testing.assert_close(ratios, torch.tensor([0.375, 1.25, 3.0]))
    k = ogm_coefficients(ratios, alpha=0.1)
    torch.testing.assert_close(k, torch.tensor([1.0, 1 - math.tanh(0.125), 1 - math.tanh(0.3)]))
    with pytest.raises(ConfigError, match="at least 2"):
        pairwise_ratios(torch.tensor([1.0]))


def test_confidence_score_is_the_summed_target_probability():
    logits = torch.tensor([[0.0, math.log(3.0)], [math.log(4.0), 0.0]])  # softmax rows (.25,.75), (.8,.2)
    target = torch.tensor([1, 1])
    assert confidence_score(logits, target, make_task("cls", 2)).item() == pytest.approx(0.75 + 0.2)
    # regression: sum of exp(-|pred - y|) with the L1 task loss
    pred, y = torch.tensor([[0.5], [2.0]]), torch.tensor([0.0, 2.0])
    assert confidence_score(pred, y, make_task("reg", 1)).item() == pytest.approx(math.exp(-0.5) + 1.0)


def test_float64_scores_ratios_and_coefficients_match_the_official_doubles():
    # A float64 model: main.py sums softmax(out)[i][y_i] in the parameter dtype and forms the ratio
    # and 1 - tanh(alpha * rho) from it, so the official values are these doubles (to 1e-12).
    ln2 = math.log(2.0)
    audio = torch.tensor([[0.0, ln2], [ln2, 0.0]], dtype=torch.float64)  # p(y) = 1/3, 1/3 -> s_a = 2/3
    visual = torch.tensor([[ln2, 0.0], [0.0, ln2]], dtype=torch.float64)  # p(y) = 2/3, 2/3 -> s_v = 4/3
    y = torch.tensor([0, 1])
    task = make_task("cls", 2)
    scores = torch.stack([confidence_score(audio, y, task), confidence_score(visual, y, task)])
    assert scores.dtype == torch.float64
    assert scores.tolist() == pytest.approx([2 / 3, 4 / 3], rel=1e-12, abs=0)
    ratios = pairwise_ratios(scores)  # rho_a = (2/3) / (4/3) = 1/2, rho_v = 2
    assert ratios.tolist() == pytest.approx([0.5, 2.0], rel=1e-12, abs=0)
    k = ogm_coefficients(ratios, alpha=0.1)  # k_v = 1 - tanh(0.2) = 0.8026246797750961
    assert k.tolist() == pytest.approx([1.0, 1 - math.tanh(0.2)], rel=1e-12, abs=0)
    # (float32 arithmetic is off by ~1e-8 here: 1/3 is not a float32 number)


def test_noise_scale_is_the_float64_std_plus_1e8():
    # g = (1, 2, 4): mean 7/3, unbiased variance ((4/3)^2 + (1/3)^2 + (5/3)^2) / 2 = 7/3,
    # so the noise std is sqrt(7/3) + 1e-8 = 1.5275252416...; a one-element tensor has std 0 -> 1e-8.
    g = torch.tensor([1.0, 2.0, 4.0], dtype=torch.float64)
    one = torch.tensor([5.0], dtype=torch.float64)
    grads = [g.clone(), one.clone()]
    torch.manual_seed(3)
    gaussian_enhance_(grads, torch.tensor([0.5, 1.0], dtype=torch.float64), noise=True)
    torch.manual_seed(3)
    z = torch.randn(4, dtype=torch.float64)  # one draw over the concatenated gradients
    std = math.sqrt(7 / 3) + 1e-8
    expected = [0.5 * 1.0 + z[0].item() * std, 0.5 * 2.0 + z[1].item() * std, 0.5 * 4.0 + z[2].item() * std]
    assert grads[0].tolist() == pytest.approx(expected, rel=1e-12, abs=0)
    assert grads[1].item() == pytest.approx(5.0 + z[3].item() * 1e-8, rel=1e-12, abs=0)


def test_gaussian_enhancement_scales_and_adds_noise_with_each_tensors_std():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(400, 250, generator=g) * 2.0 + 1.0  # std 2
    b = torch.randn(100_000, generator=g) * 0.1  # std 0.1
    one = torch.tensor([5.0])  # a single element: std 0
    grads = [a.clone(), b.clone(), one.clone()]
    torch.manual_seed(1)
    gaussian_enhance_(grads, torch.tensor(0.5), noise=True)
    noise_a, noise_b = grads[0] - 0.5 * a, grads[1] - 0.5 * b
    assert noise_a.std().item() == pytest.approx(a.std().item(), rel=0.02)
    assert noise_b.std().item() == pytest.approx(b.std().item(), rel=0.02)
    assert abs(noise_a.mean().item()) < 0.02
    assert grads[2].item() == pytest.approx(2.5, abs=1e-6)  # noise std 1e-8
    plain = [a.clone()]
    gaussian_enhance_(plain, torch.tensor(0.5), noise=False)
    assert torch.equal(plain[0], a * 0.5)


def test_gaussian_enhancement_with_one_coefficient_per_tensor():
    grads = [torch.ones(3, 2), torch.ones(4)]
    gaussian_enhance_(grads, torch.tensor([0.25, 2.0]), noise=False)
    assert torch.equal(grads[0], torch.full((3, 2), 0.25)) and torch.equal(grads[1], torch.full((4,), 2.0))
    const = [torch.full((50,), 3.0), torch.full((7,), -1.0)]  # std 0: noise 1e-8 only
    gaussian_enhance_(const, torch.tensor([0.5, 1.0]), noise=True)
    torch.testing.assert_close(const[0], torch.full((50,), 1.5), atol=1e-6, rtol=0)
    torch.testing.assert_close(const[1], torch.full((7,), -1.0), atol=1e-6, rtol=0)
    with pytest.raises(ConfigError, match="coefficients"):
        gaussian_enhance_([torch.ones(2)], torch.tensor([1.0, 2.0]))


def test_neutral_setting_alpha0_without_ge_reproduces_joint_exactly():
    joint, ogm, batches = joint_and(OGMGE(OGMGEConfig(alpha=0.0, ge=False)))
    train_steps(batches, 0, joint, ogm)
    assert_same_parameters(joint.model, ogm.model)
    assert ogm.balancer.heads.built


def test_only_the_dominant_modality_is_scaled_and_only_inside_the_window():
    bal = OGMGE(OGMGEConfig(alpha=0.5, ge=False, modulation_starts=1, modulation_ends=1))
    trainer, batches = tiny_trainer(bal)
    captured = {}
    original = bal.on_after_backward

    def spy(ctx):
        before = {m: [p.grad.clone() for p in bal._groups[m]] for m in bal.modalities}
        original(ctx)
        after = {m: [p.grad.clone() for p in bal._groups[m]] for m in bal.modalities}
        captured[ctx.epoch] = (before, after, pairwise_ratios(bal._scores))

    bal.on_after_backward = spy
    trainer.train_step(batches[0], 0, 0)  # epoch 0: outside [1, 1]
    trainer.train_step(batches[1], 1, 0)  # epoch 1: inside
    before, after, _ = captured[0]
    for m in bal.modalities:
        assert all(torch.equal(x, y) for x, y in zip(before[m], after[m], strict=True))
    before, after, ratios = captured[1]
    k = ogm_coefficients(ratios, 0.5)
    for i, m in enumerate(bal.modalities):
        for x, y in zip(before[m], after[m], strict=True):
            torch.testing.assert_close(y, x * k[i])
    assert (k < 1).sum() <= 1  # with two modalities at most the dominant one is slowed
    diag = bal.diagnostics()
    assert set(diag) == {f"{kind}/{m}" for kind in ("coeff", "ratio", "score") for m in bal.modalities}


def test_config_and_setup_errors():
    with pytest.raises(ConfigError, match="alpha"):
        METHODS.build("ogm_ge", None, alpha=-1.0)
    with pytest.raises(ConfigError, match="modulation_ends"):
        METHODS.build("ogm_ge", None, modulation_starts=5, modulation_ends=2)
    with pytest.raises(ConfigError, match="params"):
        METHODS.build("ogm_ge", None, params="linear")
    with pytest.raises(ConfigError, match="unknown config key"):
        METHODS.build("ogm_ge", None, rho=1.0)
    with pytest.raises(ConfigError, match="4-D conv weights.*'a'"):
        tiny_trainer(OGMGE(OGMGEConfig(params="conv")))
