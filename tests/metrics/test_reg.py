"""Regression metrics against an MMSA-style numpy/sklearn/scipy reference and hand values."""

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


def test_matches_reference_on_random_sentiment() -> None:
    g = torch.Generator().manual_seed(0)
    truth = torch.round(torch.empty(120).uniform_(-3, 3, generator=g) * 3) / 3  # MOSI labels are thirds
    truth[:10] = 0.0
    pred = truth + 0.8 * torch.randn(120, generator=g)
    got = regression_metrics(pred.view(-1, 1), truth)
    ref = mmsa_reference(pred.double().numpy(), truth.double().numpy())
    assert set(got) == set(ref)
    for key in ref:
        assert got[key] == pytest.approx(ref[key], abs=1e-9), key


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
