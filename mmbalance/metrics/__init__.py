"""Metric suites of the three tasks: ``update(prediction, target)``, ``compute() -> dict``, ``reset()``.

Every suite keeps sufficient statistics on the prediction's device (a confusion matrix, sums,
per-sample Dice sums) and reads them with one host transfer in ``compute()``. Metric names match
:data:`mmbalance.tasks.METRIC_HIGHER_IS_BETTER`; each module docstring states its conventions.
"""

from __future__ import annotations

from mmbalance.metrics.cls import (
    ClassificationMetrics,
    accuracy_from_confusion,
    confusion_matrix,
    f1_from_confusion,
)
from mmbalance.metrics.reg import RegressionMetrics, regression_metrics
from mmbalance.metrics.seg import (
    REGIONS,
    SegmentationMetrics,
    brats_region_counts,
    brats_region_dice,
    brats_region_masks,
    label_map,
    monai_region_dice,
    soft_dice_loss,
    soft_dice_statistics,
)

__all__ = [
    "ClassificationMetrics",
    "RegressionMetrics",
    "SegmentationMetrics",
    "confusion_matrix",
    "accuracy_from_confusion",
    "f1_from_confusion",
    "regression_metrics",
    "brats_region_dice",
    "brats_region_counts",
    "brats_region_masks",
    "label_map",
    "monai_region_dice",
    "soft_dice_loss",
    "soft_dice_statistics",
    "REGIONS",
]
