"""ARL: logit shares, inverse-entropy weights and ω by hand (2 and 3 modalities, per pixel); the
warm-up; encoder gradients scaled by 1 + ω_m; cls/seg only; config errors; short fits."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from mmbalance.errors import ConfigError, UnsupportedError
from mmbalance.methods import METHODS
from mmbalance.methods import arl as arl_module
from mmbalance.methods.arl import ARL, ARLConfig, arl_coefficients, inverse_entropy_weights, logit_shares
from mmbalance.tasks import make_task

from ..conftest import tiny_model, tiny_splits
from ._helpers import short_fit, tiny_trainer

CPU = torch.device("cpu")
OUT_A = torch.tensor([[2.0, 0.0], [0.0, 2.0]])  # confident
OUT_V = torch.tensor([[0.5, 0.5], [0.5, 0.5]])  # uniform


def test_two_modalities_by_hand():
    # c: Σ_k mean_i |out| = 1 + 1 = 2 (a), 0.5 + 0.5 = 1 (v) -> shares (2/3, 1/3)
    torch.testing.assert_close(logit_shares([OUT_A, OUT_V]), torch.tensor([2 / 3, 1 / 3]))
    # H_a = entropy of (e²/(e²+1), 1/(e²+1)) in every row; H_v = ln 2; w_a = H_v / (H_a + H_v)
    p = math.exp(2) / (math.exp(2) + 1)
    h_a, h_v = -(p * math.log(p) + (1 - p) * math.log(1 - p)), math.log(2)  # 0.365334, 0.693147
    w_a = h_v / (h_a + h_v)  # 1/H_a_n normalised = H_v_n = 0.654851 (both above the 0.3 floor)
    weights = inverse_entropy_weights([OUT_A, OUT_V], floor=0.3)
    torch.testing.assert_close(weights, torch.tensor([w_a, 1 - w_a]))
    # ω = softmax(T [c_v w_a, c_a w_v]) = softmax(8 [0.218284, 0.230099]) = (0.476386, 0.523614)
    score_a, score_v = w_a / 3, (1 - w_a) * 2 / 3
    omega_a = 1 / (1 + math.exp(8 * (score_v - score_a)))
    omega = arl_coefficients(torch.tensor([2 / 3, 1 / 3]), weights, temperature=8.0)
    torch.testing.assert_close(omega, torch.tensor([omega_a, 1 - omega_a]))
    assert omega_a == pytest.approx(0.476386, abs=1e-6)


def test_three_modalities_use_the_product_of_the_other_shares():
    shares, weights = torch.tensor([0.5, 0.3, 0.2]), torch.tensor([0.2, 0.3, 0.5])
    # scores: 0.2*(0.3*0.2) = 0.012, 0.3*(0.5*0.2) = 0.03, 0.5*(0.5*0.3) = 0.075; T = 1
    e = [math.exp(0.012), math.exp(0.03), math.exp(0.075)]
    expected = torch.tensor([x / sum(e) for x in e])
    torch.testing.assert_close(arl_coefficients(shares, weights, temperature=1.0), expected)
    torch.testing.assert_close(arl_coefficients(shares, weights, temperature=0.0), torch.full((3,), 1 / 3))


def test_entropy_floor_and_per_pixel_maps():
    # entropies (~4e-8, ln 2) -> normalised (~6e-8, ~1) -> floor 0.3 -> 1/(0.3, 1) = (10/3, 1)
    # -> w = (10/13, 3/13)
    sure = torch.tensor([[20.0, 0.0]]).repeat(4, 1)
    uniform = torch.zeros(4, 2)
    expected = torch.tensor([10 / 13, 3 / 13])
    torch.testing.assert_close(inverse_entropy_weights([sure, uniform], floor=0.3), expected)
    # without a floor the confident modality takes (almost) all the weight
    assert inverse_entropy_weights([sure, uniform], floor=0.0)[0] > 0.999
    # a (B, K, H, W) map counts every pixel as a row: (1, 2, 1, 2) == rows (2, 2)
    rows_a, rows_v = OUT_A, OUT_V
    map_a = rows_a.t().reshape(1, 2, 1, 2)  # pixel j holds row j
    map_v = rows_v.t().reshape(1, 2, 1, 2)
    torch.testing.assert_close(logit_shares([map_a, map_v]), logit_shares([rows_a, rows_v]))
    torch.testing.assert_close(
        inverse_entropy_weights([map_a, map_v], 0.3), inverse_entropy_weights([rows_a, rows_v], 0.3)
    )


def test_the_entropy_floor_scales_with_the_number_of_modalities(monkeypatch):
    rows = {"a": [10.0, 0.0, 0.0], "b": [3.0, 0.0, 0.0], "c": [0.0, 0.0, 0.0]}
    fixed = {m: torch.tensor([r]).repeat(16, 1).requires_grad_() for m, r in rows.items()}
    monkeypatch.setattr(arl_module, "shared_unimodal_predictions", lambda model, features, **kw: fixed)
    dims = (("a", 4), ("b", 3), ("c", 2))
    model, task = tiny_model(dims=dims), make_task("cls", 3)
    bal = ARL(ARLConfig(entropy_floor=0.3))
    bal.setup(model, task, lambda params, **kw: None)
    splits, _ = tiny_splits(dims=dims)
    batch = {k: v[:16] for k, v in splits["train"].tensors.items()}
    bal.loss_terms(bal.forward_step(model, batch), batch, task)
    # entropies: a ~0.0009, b = 0.3665 (p = e³/(e³ + 2)), c = ln 3 -> normalised ~(0.0006, 0.2500, 0.7494)
    h = []
    for r in rows.values():
        p = [math.exp(v) / sum(math.exp(u) for u in r) for v in r]
        h.append(-sum(q * math.log(q) for q in p))
    # three modalities: floor 0.3 * 2/3 = 0.2 -> (0.2, 0.25, 0.749) -> w ~ (0.484, 0.387, 0.129);
    # a fixed 0.3 would give (0.3, 0.3, 0.749) -> w ~ (0.417, 0.417, 0.167)
    inverse = [1 / max(x / sum(h), 0.2) for x in h]
    recorded = bal.epoch_means.pop()
    for m, inv in zip(rows, inverse, strict=True):
        assert recorded[f"inverse_entropy/{m}"] == pytest.approx(inv / sum(inverse), abs=1e-5)
    assert recorded["inverse_entropy/a"] == pytest.approx(0.484, abs=2e-3)


def _trainer(cfg):
    trainer, batches = tiny_trainer(ARL(cfg))
    return trainer, trainer.balancer, batches


class _Epoch:
    def __init__(self, epoch):
        self.epoch = epoch


@pytest.mark.parametrize("coefficients", ["variance", "released"])
def test_warm_up_then_gamma_and_scaled_encoder_gradients(coefficients):
    trainer, bal, batches = _trainer(ARLConfig(gamma=3.0, start=0, coefficients=coefficients))
    captured = {}
    original = bal.on_after_backward

    def spy(ctx):
        before = {m: [p.grad.clone() for p in bal._params[m]] for m in bal.modalities}
        original(ctx)
        after = {m: [p.grad.clone() for p in bal._params[m]] for m in bal.modalities}
        captured[ctx.epoch] = (before, after, bal._omega.clone())

    bal.on_after_backward = spy
    for epoch in (0, 1):
        bal.on_train_epoch_start(_Epoch(epoch))
        trainer.train_step(batches[epoch], epoch, 0)
    before, after, _ = captured[0]  # epoch 0 <= start: weight 1, no scaling
    for m in bal.modalities:
        assert all(torch.equal(x, y) for x, y in zip(before[m], after[m], strict=True))
    before, after, omega = captured[1]  # epoch 1 > start: γ and 1 + ω_m
    if coefficients == "released":
        torch.testing.assert_close(omega, torch.tensor([0.5, 0.5]))
    for i, m in enumerate(bal.modalities):
        for x, y in zip(before[m], after[m], strict=True):
            torch.testing.assert_close(y, x * (1 + omega[i]))


def test_unimodal_term_weight_is_one_in_warm_up_and_gamma_after():
    trainer, bal, batches = _trainer(ARLConfig(gamma=3.0, start=0))
    model, task = trainer.model, make_task("cls", 3)
    for epoch, weight in ((0, 1.0), (1, 3.0)):
        bal.on_train_epoch_start(_Epoch(epoch))
        out = bal.forward_step(model, batches[0])
        terms = bal.loss_terms(out, batches[0], task)
        alone = model.fuse({"a": out.features["a"], "b": torch.zeros_like(out.features["b"])}).prediction
        torch.testing.assert_close(terms["unimodal/a"], weight * F.cross_entropy(alone, batches[0]["target"]))


def test_classification_and_segmentation_only_and_config_errors():
    assert METHODS.get("arl").supports(task="seg") and not METHODS.get("arl").supports(task="reg")
    with pytest.raises(UnsupportedError, match="not task .reg."):
        ARL().setup(tiny_model(), make_task("reg", 1), lambda params, **kw: None)
    for key, value in (("gamma", -1.0), ("temperature", float("nan")), ("start", -2), ("entropy_floor", 1.0)):
        with pytest.raises(ConfigError, match=key):
            METHODS.build("arl", None, **{key: value})
    with pytest.raises(ConfigError, match="coefficients"):
        METHODS.build("arl", None, coefficients="balanced")
    assert METHODS.build("arl", "ave").config.gamma == 5.0
    assert METHODS.build("arl", "synthetic").config.start == 0


@pytest.mark.parametrize("ds_name", ["synthetic_cls2", "synthetic_cls3", "synthetic_seg4"])
def test_short_fit_on_every_declared_synthetic_task(ds_name):
    result = short_fit(ARL(ARLConfig(start=0)), ds_name, batch_size=32)
    diag = result.history[-1]["diagnostics"]
    assert sum(diag[f"omega/{m}"] for m in result.trainer.balancer.modalities) == pytest.approx(1.0)
