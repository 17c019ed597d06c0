"""Tasks ``cls``, ``reg``, ``seg``: loss, metric suite, and the per-modality ``score``.

``score(prediction, target)`` is the signal balancing methods read from unimodal heads (CGGM's ε):
a 0-d tensor on the prediction's device, higher is better, computed without a host sync:

* cls: accuracy of ``argmax``;
* reg: sign accuracy ``(pred > 0) == (target > 0)`` over all samples (zeros count as negative, as
  the CGGM code does), or ``-MAE`` with ``score="neg_mae"``;
* seg: mean over ET/TC/WT of per-sample Dice (eps 1e-3, the CGGM code's convention).

``score(..., exact=True)`` returns a float64 0-d tensor: for cls and reg (sign accuracy) the count
of hits over the batch size, correctly rounded (the value of the CGGM code's sklearn
``accuracy_score``, a Python float; float32 leaves ~3e-8 of error in k/12); ``-MAE`` in float64;
for seg the float32 Dice above (the CGGM code's own arithmetic) as float64. The default
(``exact=False``) is unchanged: float32.

``loss(prediction, target, reduction)``: ``"mean"`` is the scalar the training step minimises,
``"none"`` one value per sample ``(B,)`` (evaluation sums it), ``"sum"`` the sum of those values.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from mmbalance.errors import ConfigError, ShapeError
from mmbalance.metrics.cls import ClassificationMetrics
from mmbalance.metrics.reg import RegressionMetrics
from mmbalance.metrics.seg import SegmentationMetrics, brats_region_dice, label_map, soft_dice_statistics

__all__ = [
    "Task",
    "ClassificationTask",
    "RegressionTask",
    "SegmentationTask",
    "make_task",
    "METRIC_HIGHER_IS_BETTER",
]

# Direction of every metric name any task reports (tables draw the arrows from it).
METRIC_HIGHER_IS_BETTER: dict[str, bool] = {
    "acc": True,
    "f1_macro": True,
    "f1_weighted": True,
    "mae": False,
    "corr": True,
    "acc2_has0": True,
    "acc2_non0": True,
    "acc2_cggm": True,
    "f1_has0": True,
    "f1_non0": True,
    "f1_cggm": True,
    "acc7": True,
    "dice_et": True,
    "dice_tc": True,
    "dice_wt": True,
    "dice_mean": True,
    "dice_et_monai": True,
    "dice_tc_monai": True,
    "dice_wt_monai": True,
    "dice_mean_monai": True,
    "loss": False,
}

REDUCTIONS = ("mean", "sum", "none")


def _check_reduction(reduction: str) -> None:
    if reduction not in REDUCTIONS:
        raise ConfigError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")


def _sample_target(prediction: Tensor, target: Tensor) -> Tensor:
    """``(B,)`` or ``(B, 1)`` target -> ``(B,)``; anything else is a :class:`ShapeError`."""
    batch = prediction.shape[0]
    if target.shape not in ((batch,), (batch, 1)):
        raise ShapeError(
            f"target must have shape ({batch},) or ({batch}, 1) to match the prediction "
            f"{tuple(prediction.shape)}, got {tuple(target.shape)}"
        )
    return target.reshape(batch)


def _hit_rate(hits: Tensor) -> Tensor:
    """``k / n`` in float64 for a boolean ``(n,)`` tensor: the integer count, then one correctly
    rounded division (as ``sklearn.metrics.accuracy_score``); on the device, no host sync."""
    return hits.sum(dtype=torch.int64).to(torch.float64) / hits.numel()


class Task(ABC):
    """A learning task. Stateless apart from its options; safe to share between runs."""

    name: str
    primary_metric: str
    num_outputs: int

    @abstractmethod
    def loss(self, prediction: Tensor, target: Tensor, reduction: str = "mean") -> Tensor:
        """Task loss; ``reduction="none"`` gives one value per sample."""

    @abstractmethod
    def score(self, prediction: Tensor, target: Tensor, *, exact: bool = False) -> Tensor:
        """0-d tensor, higher is better, on the prediction's device (no host sync); float32, or
        float64 with ``exact=True`` (see the module docstring)."""

    @abstractmethod
    def metrics(self) -> Any:
        """A fresh metric suite with ``update(prediction, target)``, ``compute() -> dict``, ``reset()``."""

    def predict_labels(self, prediction: Tensor) -> Tensor:
        """Hard prediction (class ids / values / label maps)."""
        return prediction


class ClassificationTask(Task):
    """Cross-entropy over ``(B, C)`` logits; targets are class ids ``(B,)``."""

    name = "cls"
    primary_metric = "acc"

    def __init__(self, num_outputs: int, label_smoothing: float = 0.0) -> None:
        if num_outputs < 2:
            raise ConfigError(f"num_outputs must be >= 2 for classification, got {num_outputs}")
        self.num_outputs = num_outputs
        self.label_smoothing = label_smoothing

    def _check(self, prediction: Tensor, target: Tensor) -> Tensor:
        if prediction.ndim != 2 or prediction.shape[1] != self.num_outputs:
            raise ShapeError(
                f"prediction must have shape (B, {self.num_outputs}), got {tuple(prediction.shape)}"
            )
        return _sample_target(prediction, target).long()

    def loss(self, prediction: Tensor, target: Tensor, reduction: str = "mean") -> Tensor:
        _check_reduction(reduction)
        target = self._check(prediction, target)
        return F.cross_entropy(prediction, target, reduction=reduction, label_smoothing=self.label_smoothing)

    def score(self, prediction: Tensor, target: Tensor, *, exact: bool = False) -> Tensor:
        hits = prediction.argmax(dim=1) == self._check(prediction, target)
        return _hit_rate(hits) if exact else hits.float().mean()

    def metrics(self) -> ClassificationMetrics:
        return ClassificationMetrics(self.num_outputs)

    def predict_labels(self, prediction: Tensor) -> Tensor:
        return prediction.argmax(dim=1)


class RegressionTask(Task):
    """Scalar regression (sentiment in [-3, 3] for MOSI). ``prediction`` is ``(B, 1)`` or ``(B,)``.

    Args:
        loss: "l1" (the CGGM MOSI loss) or "mse".
        score: "sign_acc" (official CGGM ε) or "neg_mae" (the paper's MAE, sign-corrected).
    """

    name = "reg"
    primary_metric = "mae"
    num_outputs = 1

    def __init__(self, loss: str = "l1", score: str = "sign_acc") -> None:
        if loss not in ("l1", "mse"):
            raise ConfigError(f"regression loss must be 'l1' or 'mse', got {loss!r}")
        if score not in ("sign_acc", "neg_mae"):
            raise ConfigError(f"regression score must be 'sign_acc' or 'neg_mae', got {score!r}")
        self.loss_name, self.score_name = loss, score

    @staticmethod
    def _flat(prediction: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
        if prediction.ndim not in (1, 2) or (prediction.ndim == 2 and prediction.shape[1] != 1):
            raise ShapeError(
                f"regression prediction must have shape (B,) or (B, 1), got {tuple(prediction.shape)}"
            )
        p = prediction.reshape(prediction.shape[0])
        return p, _sample_target(prediction, target).to(p.dtype)

    def loss(self, prediction: Tensor, target: Tensor, reduction: str = "mean") -> Tensor:
        _check_reduction(reduction)
        p, t = self._flat(prediction, target)
        fn = F.l1_loss if self.loss_name == "l1" else F.mse_loss
        return fn(p, t, reduction=reduction)

    def score(self, prediction: Tensor, target: Tensor, *, exact: bool = False) -> Tensor:
        p, t = self._flat(prediction, target)
        if self.score_name == "neg_mae":
            if exact:
                return -(p.double() - _sample_target(prediction, target).double()).abs().mean()
            return -(p - t).abs().mean()
        hits = (p > 0) == (t > 0)
        return _hit_rate(hits) if exact else hits.float().mean()

    def metrics(self) -> RegressionMetrics:
        return RegressionMetrics()

    def predict_labels(self, prediction: Tensor) -> Tensor:
        return prediction.reshape(prediction.shape[0], -1)[:, 0]


class SegmentationTask(Task):
    """BraTS-style 2D segmentation: logits ``(B, C, H, W)``, label maps ``(B, H, W)``.

    Loss, the CGGM ``SegLoss`` (``src/eval_metrics.py``, used by ``src/segtrain.py`` with
    ``weight=[0.2, 0.3, 0.25, 0.25]``, ``alpha=0.5``)::

        ce_weight * CE_w + dice_weight * (1 - soft Dice over the foreground classes)

    * ``CE_w`` is ``F.cross_entropy(logits, target, weight=w)``: with class weights the mean is
      ``Σ w[y_x] ce_x / Σ w[y_x]``, normalised by the weights of the target pixels, not by the
      pixel count.
    * the soft Dice (:func:`~mmbalance.metrics.seg.soft_dice_loss`) sums the softmax probabilities
      of classes 1..C-1, their one-hot targets and the products over the whole batch, then
      ``2 Σ inter / (Σ p + Σ t + 0.01)``.

    ``reduction="mean"`` therefore equals the official scalar (both parts are batch-level ratios,
    not means of per-sample values; tested against a transcription of ``SegLoss``).
    ``reduction="none"`` applies the same two ratios to each sample alone, giving ``(B,)``; their
    mean differs slightly from the ``"mean"`` value whenever samples differ in tumour size.

    Labels follow BraTS with 4 remapped to 3: 0 background, 1 necrotic core, 2 edema, 3 enhancing
    tumour; regions ET = {3}, TC = {1, 3}, WT = {1, 2, 3}.
    """

    name = "seg"
    primary_metric = "dice_mean"

    def __init__(
        self,
        num_outputs: int = 4,
        class_weights: Sequence[float] | None = (0.2, 0.3, 0.25, 0.25),
        ce_weight: float = 0.5,
        dice_weight: float = 0.5,
        dice_smooth: float = 0.01,
    ) -> None:
        if num_outputs != 4:
            raise ConfigError(
                f"segmentation uses the 4 BraTS labels, num_outputs must be 4, got {num_outputs}"
            )
        if class_weights is not None:
            if len(class_weights) != num_outputs:
                raise ConfigError(f"class_weights must have {num_outputs} entries, got {len(class_weights)}")
            if any(not (float(w) > 0) for w in class_weights):
                raise ConfigError(f"class_weights must all be > 0, got {tuple(class_weights)}")
        for field_name, value in (("ce_weight", ce_weight), ("dice_weight", dice_weight)):
            if not value >= 0:
                raise ConfigError(f"{field_name} must be >= 0, got {value}")
        if not dice_smooth >= 0:
            raise ConfigError(f"dice_smooth must be >= 0, got {dice_smooth}")
        self.num_outputs = num_outputs
        self.class_weights = None if class_weights is None else tuple(float(w) for w in class_weights)
        self.ce_weight, self.dice_weight = ce_weight, dice_weight
        self.dice_smooth = dice_smooth
        self._weight_cache: dict[torch.device, Tensor] = {}

    def _weights(self, like: Tensor) -> Tensor | None:
        if self.class_weights is None:
            return None
        if like.device not in self._weight_cache:
            self._weight_cache[like.device] = torch.tensor(self.class_weights, device=like.device)
        return self._weight_cache[like.device]

    def loss(self, prediction: Tensor, target: Tensor, reduction: str = "mean") -> Tensor:
        _check_reduction(reduction)
        if prediction.ndim < 3 or prediction.shape[1] != self.num_outputs:
            raise ShapeError(
                f"segmentation logits must have shape (B, {self.num_outputs}, *spatial), "
                f"got {tuple(prediction.shape)}"
            )
        intersection, denominator = soft_dice_statistics(prediction, target)  # checks target's shape
        target = target.long()
        weight = self._weights(prediction)
        ce = F.cross_entropy(prediction.float(), target, weight=weight, reduction="none").flatten(1)
        ce_num = ce.sum(dim=1)  # Σ_x w[y_x] ce_x per sample
        if weight is None:
            ce_den = torch.full_like(ce_num, float(ce.shape[1]))
        else:
            ce_den = weight[target.flatten(1)].sum(dim=1)  # Σ_x w[y_x] per sample
        if reduction == "mean":
            ce_term = ce_num.sum() / ce_den.sum()
            dice_term = 1 - 2 * intersection.sum() / (denominator.sum() + self.dice_smooth)
            return self.ce_weight * ce_term + self.dice_weight * dice_term
        per_sample = self.ce_weight * (ce_num / ce_den) + self.dice_weight * (
            1 - 2 * intersection / (denominator + self.dice_smooth)
        )
        return per_sample if reduction == "none" else per_sample.sum()

    def score(self, prediction: Tensor, target: Tensor, *, exact: bool = False) -> Tensor:
        dice = brats_region_dice(label_map(prediction), target).mean()
        return dice.double() if exact else dice

    def metrics(self) -> SegmentationMetrics:
        return SegmentationMetrics()

    def predict_labels(self, prediction: Tensor) -> Tensor:
        return label_map(prediction)


def make_task(name: str, num_outputs: int, **options: Any) -> Task:
    """Task for a :class:`~mmbalance.datasets.base.DatasetSpec` (``spec.task``, ``spec.num_outputs``)."""
    if name == "cls":
        return ClassificationTask(num_outputs, **options)
    if name == "reg":
        return RegressionTask(**options)
    if name == "seg":
        return SegmentationTask(num_outputs, **options)
    raise ConfigError(f"task must be one of 'cls', 'reg', 'seg', got {name!r}")
