"""Regression metrics for sentiment scores in [-3, 3] (CMU-MOSI / MOSEI), MMSA conventions.

Keys and their exact definitions (``p`` = prediction, ``y`` = label, both flattened):

* ``mae``: ``mean |p - y|``.
* ``corr``: Pearson r of ``p`` and ``y`` (``np.corrcoef`` in MMSA and CGGM's ``eval_senti``).
  **NaN** when either side is constant or fewer than 2 samples were seen: r is undefined there
  (numpy and ``scipy.stats.pearsonr`` also give NaN); 0 would pass a constant predictor off as a
  measured "no correlation". Constancy is detected exactly from the running min and max, not from
  a variance that rounding may leave at 1e-17.
* ``acc2_has0`` / ``f1_has0``: every sample, classes ``y >= 0`` vs ``y < 0`` and ``p >= 0`` vs
  ``p < 0`` (MMSA ``eval_mosei_regression``: ``binary_truth = test_truth >= 0``).
* ``acc2_non0`` / ``f1_non0``: samples with ``y == 0`` removed, classes ``> 0`` vs ``<= 0`` for
  both ``y`` and ``p`` (MMSA ``non_zeros``). NaN when every label is 0.
* F1 is scikit-learn's ``average='weighted'`` over the two classes (weights = label support),
  called with (truth, prediction) as MMSA does.
* ``acc2_cggm`` / ``f1_cggm``: the CGGM code's convention (``src/eval_metrics.py``, ``eval_senti``
  with its default ``exclude_zero=False``, which produced the paper's MOSI numbers): every sample,
  classes ``> 0`` vs ``<= 0`` for both ``y`` and ``p`` (zero labels count as negative), and
  ``f1_score(p > 0, y > 0, average='weighted')`` with the prediction passed first, so the two
  classes' F1 are weighted by the **predicted** counts, not by the label support. The per-class F1
  itself is symmetric in its arguments; only the weights differ from ``f1_has0``. MulT's
  ``eval_mosi(..., exclude_zero=True)`` is ``acc2_non0`` with this same F1 on the non-zero samples.
* ``acc7``: ``round(clip(p, -3, 3)) == round(clip(y, -3, 3))``; ``torch.round`` rounds half to
  even exactly like ``np.round``, so 0.5 -> 0 and 1.5 -> 2 in both.

Sufficient statistics live on the prediction's device in float64: the absolute-error sum, running
means and centred co-moments merged per batch (Chan et al.'s parallel update, so Pearson r does not
suffer the cancellation of raw power sums), the min/max of each side, the Acc-7 hit count and two
2x2 confusion matrices (has-0, non-0, CGGM). ``compute()`` reads them in one transfer.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from mmbalance.errors import DataError, ShapeError
from mmbalance.metrics.cls import accuracy_from_confusion, count_indices, f1_from_confusion

__all__ = ["RegressionMetrics", "regression_metrics"]


def _flatten(prediction: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
    if prediction.ndim not in (1, 2) or (prediction.ndim == 2 and prediction.shape[1] != 1):
        raise ShapeError(
            f"regression prediction must have shape (B,) or (B, 1), got {tuple(prediction.shape)}"
        )
    batch = prediction.shape[0]
    if target.shape not in ((batch,), (batch, 1)):
        raise ShapeError(
            f"regression target must have shape ({batch},) or ({batch}, 1) to match the prediction, "
            f"got {tuple(target.shape)}"
        )
    return prediction.reshape(-1).double(), target.reshape(-1).double()


def _binary_confusion(pred_positive: Tensor, true_positive: Tensor, keep: Tensor | None = None) -> Tensor:
    """``(2, 2)`` int64 counts, rows = truth (0 negative, 1 positive); ``keep`` masks samples out."""
    index = true_positive.long() * 2 + pred_positive.long()
    if keep is not None:
        index = torch.where(keep, index, torch.full_like(index, 4))
    return count_indices(index, 5)[:4].view(2, 2)


class RegressionMetrics:
    """Accumulates MAE, Pearson r, Acc-2 and weighted F1 (MMSA has-0 / non-0, CGGM code) and Acc-7.

    Contract: ``update(prediction (B,) or (B, 1), target (B,) or (B, 1))``; ``compute()`` returns
    ``{"mae", "corr", "acc2_has0", "acc2_non0", "acc2_cggm", "f1_has0", "f1_non0", "f1_cggm",
    "acc7"}`` as Python floats
    (see the module docstring for each definition and its NaN cases) and raises
    :class:`~mmbalance.errors.DataError` if no sample was seen.
    """

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        """Forget every sample seen so far."""
        self._n = 0
        self._stats: dict[str, Tensor] = {}

    def update(self, prediction: Tensor, target: Tensor) -> None:
        """Add a batch (no host sync)."""
        p, y = _flatten(prediction, target)
        n_b = p.shape[0]
        if n_b == 0:
            return
        mean_p, mean_y = p.mean(), y.mean()
        dp, dy = p - mean_p, y - mean_y
        batch = {
            "abs_err": (p - y).abs().sum(),
            "mean_p": mean_p,
            "mean_y": mean_y,
            "m2_p": (dp * dp).sum(),
            "m2_y": (dy * dy).sum(),
            "c_py": (dp * dy).sum(),
            "min_p": p.min(),
            "max_p": p.max(),
            "min_y": y.min(),
            "max_y": y.max(),
            "acc7_hits": (torch.round(p.clamp(-3.0, 3.0)) == torch.round(y.clamp(-3.0, 3.0))).sum(),
            "cm_has0": _binary_confusion(p >= 0, y >= 0),
            "cm_non0": _binary_confusion(p > 0, y > 0, keep=y != 0),
            "cm_cggm": _binary_confusion(p > 0, y > 0),
        }
        if self._n == 0:
            self._stats = batch
            self._n = n_b
            return
        s, n_a = self._stats, self._n
        n = n_a + n_b
        delta_p = batch["mean_p"] - s["mean_p"]
        delta_y = batch["mean_y"] - s["mean_y"]
        cross = n_a * n_b / n
        s["m2_p"] = s["m2_p"] + batch["m2_p"] + delta_p * delta_p * cross
        s["m2_y"] = s["m2_y"] + batch["m2_y"] + delta_y * delta_y * cross
        s["c_py"] = s["c_py"] + batch["c_py"] + delta_p * delta_y * cross
        s["mean_p"] = s["mean_p"] + delta_p * (n_b / n)
        s["mean_y"] = s["mean_y"] + delta_y * (n_b / n)
        s["min_p"] = torch.minimum(s["min_p"], batch["min_p"])
        s["max_p"] = torch.maximum(s["max_p"], batch["max_p"])
        s["min_y"] = torch.minimum(s["min_y"], batch["min_y"])
        s["max_y"] = torch.maximum(s["max_y"], batch["max_y"])
        for key in ("abs_err", "acc7_hits", "cm_has0", "cm_non0", "cm_cggm"):
            s[key] = s[key] + batch[key]
        self._n = n

    def compute(self) -> dict[str, float]:
        """One host sync; see the module docstring for the definitions."""
        if self._n == 0:
            raise DataError("no samples: call update() before compute()")
        s = self._stats
        values = torch.stack(
            [
                s["abs_err"] / self._n,
                s["c_py"] / torch.sqrt(s["m2_p"] * s["m2_y"]),
                ((s["min_p"] == s["max_p"]) | (s["min_y"] == s["max_y"])).double(),
                accuracy_from_confusion(s["cm_has0"]),
                accuracy_from_confusion(s["cm_non0"]),
                accuracy_from_confusion(s["cm_cggm"]),
                f1_from_confusion(s["cm_has0"], "weighted"),
                f1_from_confusion(s["cm_non0"], "weighted"),
                # rows = prediction: the official call passes the prediction as sklearn's y_true
                f1_from_confusion(s["cm_cggm"].T, "weighted"),
                s["acc7_hits"].double() / self._n,
            ]
        ).tolist()
        mae, corr, constant, acc2_has0, acc2_non0, acc2_cggm, f1_has0, f1_non0, f1_cggm, acc7 = values
        if constant or self._n < 2:
            corr = math.nan
        else:
            corr = max(-1.0, min(1.0, corr))  # rounding can leave |r| a few ulps above 1
        return {
            "mae": mae,
            "corr": corr,
            "acc2_has0": acc2_has0,
            "acc2_non0": acc2_non0,
            "acc2_cggm": acc2_cggm,
            "f1_has0": f1_has0,
            "f1_non0": f1_non0,
            "f1_cggm": f1_cggm,
            "acc7": acc7,
        }


def regression_metrics(prediction: Tensor, target: Tensor) -> dict[str, float]:
    """All regression metrics of one set of predictions (a one-batch :class:`RegressionMetrics`)."""
    suite = RegressionMetrics()
    suite.update(prediction, target)
    return suite.compute()
