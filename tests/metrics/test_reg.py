"""Regression metrics against MMSA-style and CGGM-code numpy/sklearn/scipy references and hand values."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.stats import pearsonr
from sklearn.metrics import accuracy_score, f1_score

from mmbalance.errors import DataError, ShapeError
from mmbalance.metrics.reg import RegressionMetrics, regression_metrics


def mmsa_reference(pred: np.ndarray, truth: np.ndarray) -> dict[str, float]:
    """Transcription of MMSA ``eval_mosei_regression`` (truth first in sklearn calls)."""
    non0 = truth != 0
    return {
        "mae": float(np.mean(np.abs(pred - truth))),
        "corr": float(pearsonr(pred, truth)[0]),
        "acc2_has0": accuracy_score(truth >= 0, pred >= 0),
        "acc2_non0": accuracy_score(truth[non0] > 0, pred[non0] > 0),
        "f1_has0": f1_score(truth >= 0, pred >= 0, average="weighted"),
        "f1_non0": f1_score(truth[non0] > 0, pred[non0] > 0, average="weighted"),
        "acc7": float(np.mean(np.round(np.clip(pred, -3, 3)) == np.round(np.clip(truth, -3, 3)))),
    }


def cggm_reference(pred: np.ndarray, truth: np.ndarray) -> dict[str, float]:
    """Transcription of CGGM ``src/eval_metrics.py:eval_senti`` with its default ``exclude_zero=False``:
    every sample kept, ``> 0`` on both sides, and sklearn called with the prediction first."""
    return {
        "acc2_cggm": accuracy_score(truth > 0, pred > 0),
        "f1_cggm": f1_score(pred > 0, truth > 0, average="weighted"),
    }


def test_matches_reference_on_random_sentiment() -> None:
    g = torch.Generator().manual_seed(0)
    truth = torch.round(torch.empty(120).uniform_(-3, 3, generator=g) * 3) / 3  # MOSI labels are thirds
    truth[:10] = 0.0
    pred = truth + 0.8 * torch.randn(120, generator=g)
    got = regression_metrics(pred.view(-1, 1), truth)
    p, y = pred.double().numpy(), truth.double().numpy()
    ref = {**mmsa_reference(p, y), **cggm_reference(p, y)}
    assert set(got) == set(ref)
    for key in ref:
        assert got[key] == pytest.approx(ref[key], abs=1e-9), key


@pytest.mark.parametrize("seed", range(6))
def test_cggm_convention_matches_the_official_formula_with_zero_labels(seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    n = int(torch.randint(5, 60, (1,), generator=g))
    truth = torch.randint(-3, 4, (n,), generator=g).double()  # integers: about one label in seven is 0
    truth[: n // 4] = 0.0  # and a block of zero labels for sure
    pred = torch.randn(n, generator=g, dtype=torch.float64) + 0.3 * seed - 0.8  # skewed predicted classes
    pred[:3] = 0.0  # predictions of exactly 0 count as negative too
    suite = RegressionMetrics()
    for lo in range(0, n, 7):  # accumulated over batches like an evaluation loop
        suite.update(pred[lo : lo + 7].view(-1, 1), truth[lo : lo + 7])
    got = suite.compute()
    ref = cggm_reference(pred.numpy(), truth.numpy())
    assert got["acc2_cggm"] == pytest.approx(ref["acc2_cggm"], abs=1e-12)
    assert got["f1_cggm"] == pytest.approx(ref["f1_cggm"], abs=1e-12)


def test_cggm_convention_by_hand() -> None:
    truth = torch.tensor([0.0, 0.0, 1.0, 2.0, -1.0, 0.5])
    pred = torch.tensor([0.3, -0.2, 0.4, -0.1, -2.0, 0.6])
    got = regression_metrics(pred, truth)
    # > 0 on both sides, zeros negative: truth F F T T F T, pred T F T F F T -> hits at 1, 2, 4, 5
    assert got["acc2_cggm"] == pytest.approx(4 / 6)
    # per-class F1: T: tp 2, fp 1, fn 1 -> 4/6; F: tp 2, fp 1, fn 1 -> 4/6; weights are predicted
    # counts (T 3, F 3): (3 * 4/6 + 3 * 4/6) / 6 = 2/3
    assert got["f1_cggm"] == pytest.approx(2 / 3)
    # MMSA has-0 on the same data (>= 0): truth T T T T F T, pred T F T F F T -> 4/6 as well, but
    # its F1 weights by label support: T (5): tp 3, fn 2 -> 6/8; F (1): tp 1, fp 2 -> 2/4
    assert got["f1_has0"] == pytest.approx((5 * 6 / 8 + 1 * 2 / 4) / 6)


def test_cggm_f1_weights_by_predicted_counts() -> None:
    # every label positive, two of four predicted positive: truth T T T T, pred T T F F.
    # Class T: tp 2, fn 2 -> F1 4/6; class F: tp 0, fp 2 -> F1 0.
    # Official order f1_score(pred, truth): weights = predicted counts (T 2, F 2) -> (2*4/6 + 0)/4 = 1/3.
    # MMSA order would weight by label support (T 4, F 0) -> 4/6.
    got = regression_metrics(torch.tensor([1.0, 2.0, -1.0, 0.0]), torch.tensor([1.0, 1.0, 2.0, 3.0]))
    assert got["f1_cggm"] == pytest.approx(1 / 3)
    assert got["f1_non0"] == pytest.approx(4 / 6)


def test_hand_example_acc2_acc7_f1() -> None:
    truth = torch.tensor([-1.0, 0.0, 0.0, 2.0, 1.5, 2.5])
    pred = torch.tensor([-0.5, 0.2, -0.1, -1.0, 0.0, 2.0])
    got = regression_metrics(pred, truth)
    # has0 (>= 0): truth F T T T T T, pred F T F F T T -> hits at 0, 1, 4, 5
    assert got["acc2_has0"] == pytest.approx(4 / 6)
    # non0 drops the two zero labels; (> 0): truth F T T T, pred F F F T -> hits at 0 and 5
    assert got["acc2_non0"] == pytest.approx(2 / 4)
    # Acc-7, half to even: round(-0.5) = -0 vs -1 miss; 0 vs 0 hit; round(-0.1) = -0 vs 0 hit;
    # -1 vs 2 miss; 0 vs round(1.5) = 2 miss; 2 vs round(2.5) = 2 hit
    assert got["acc7"] == pytest.approx(3 / 6)
    # has0 weighted F1: class T (support 5): tp 3, fn 2, fp 0 -> 6/8; class F (support 1): tp 1, fp 2 -> 2/4
    assert got["f1_has0"] == pytest.approx((5 * 6 / 8 + 1 * 2 / 4) / 6)
    # non0 weighted F1: class T (support 3): tp 1, fn 2 -> 2/4; class F (support 1): tp 1, fp 2 -> 2/4
    assert got["f1_non0"] == pytest.approx(0.5)
    assert got["mae"] == pytest.approx((0.5 + 0.2 + 0.1 + 3.0 + 1.5 + 0.5) / 6)


def test_acc7_clips_before_rounding() -> None:
    got = regression_metrics(torch.tensor([5.0, -4.0, 3.4]), torch.tensor([3.0, -2.6, 2.4]))
    assert got["acc7"] == pytest.approx(2 / 3)  # 3==3, -3==-3, 3 vs 2 misses


def test_corr_is_nan_for_constant_or_single_sample_and_one_for_linear() -> None:
    truth = torch.tensor([-1.0, 0.5, 2.0, 1.0])
    assert math.isnan(regression_metrics(torch.full((4,), 0.1), truth)["corr"])  # constant prediction
    assert math.isnan(regression_metrics(truth, torch.full((4,), 0.1))["corr"])  # constant labels
    assert math.isnan(regression_metrics(torch.tensor([1.0]), torch.tensor([2.0]))["corr"])
    assert regression_metrics(3 * truth - 1, truth)["corr"] == pytest.approx(1.0, abs=1e-12)
    assert regression_metrics(-truth, truth)["corr"] == pytest.approx(-1.0, abs=1e-12)


def test_constant_prediction_split_over_batches_is_still_nan() -> None:
    suite = RegressionMetrics()
    for lo in range(0, 9, 3):
        suite.update(torch.full((3, 1), 0.1), torch.arange(lo, lo + 3, dtype=torch.float32))
    assert math.isnan(suite.compute()["corr"])


def test_all_zero_labels_leave_non0_metrics_undefined() -> None:
    got = regression_metrics(torch.tensor([0.3, -0.2]), torch.zeros(2))
    assert math.isnan(got["acc2_non0"]) and math.isnan(got["f1_non0"])
    assert got["acc2_has0"] == pytest.approx(0.5)


def test_accumulation_equals_one_update_even_with_large_offset() -> None:
    g = torch.Generator().manual_seed(1)
    truth = 1000.0 + torch.randn(64, generator=g, dtype=torch.float64)
    pred = truth + 0.5 * torch.randn(64, generator=g, dtype=torch.float64)
    whole, parts = RegressionMetrics(), RegressionMetrics()
    whole.update(pred, truth)
    for lo, hi in ((0, 1), (1, 10), (10, 10), (10, 47), (47, 64)):
        parts.update(pred[lo:hi].view(-1, 1), truth[lo:hi].view(-1, 1))
    a, b = whole.compute(), parts.compute()
    assert a == pytest.approx(b, rel=1e-12, abs=1e-12)
    assert a["corr"] == pytest.approx(float(pearsonr(pred.numpy(), truth.numpy())[0]), abs=1e-12)


def test_errors_and_reset() -> None:
    suite = RegressionMetrics()
    with pytest.raises(DataError, match="no samples"):
        suite.compute()
    with pytest.raises(ShapeError, match=r"\(B,\) or \(B, 1\).*\(4, 2\)"):
        suite.update(torch.zeros(4, 2), torch.zeros(4))
    with pytest.raises(ShapeError, match=r"\(4,\) or \(4, 1\).*\(3,\)"):
        suite.update(torch.zeros(4), torch.zeros(3))
    suite.update(torch.tensor([9.0]), torch.tensor([0.0]))
    suite.reset()
    suite.update(torch.tensor([1.0, 2.0]), torch.tensor([1.0, 2.0]))
    assert suite.compute()["mae"] == 0.0
