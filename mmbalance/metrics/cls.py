"""Classification metrics: accuracy, macro F1 and weighted F1 from one confusion matrix.

Why hand-written rather than three torchmetrics objects: all three numbers are functions of the
``(C, C)`` confusion matrix, so one scatter-add per batch is the whole update (no per-step host
sync, no per-step value validation, which in torchmetrics costs a ``torch.unique``). The formulas
follow scikit-learn's defaults and are tested against ``sklearn.metrics`` and torchmetrics:

* ``acc``: ``trace(cm) / sum(cm)``.
* ``f1_macro``: mean of per-class F1 ``2 tp / (2 tp + fp + fn)`` over the classes that occur in the
  targets or in the predictions (sklearn's default ``labels``; absent classes are left out, not
  counted as 0). With a single class that is predicted perfectly this is 1.0.
* ``f1_weighted``: per-class F1 weighted by the class's support in the targets (CGGM's
  ``f1_score(..., average='weighted')`` for Food-101 and IEMOCAP).
"""

from __future__ import annotations

import torch
from torch import Tensor

from mmbalance.errors import ConfigError, DataError, ShapeError

__all__ = [
    "ClassificationMetrics",
    "count_indices",
    "confusion_matrix",
    "accuracy_from_confusion",
    "f1_from_confusion",
]


def count_indices(index: Tensor, size: int) -> Tensor:
    """``(size,)`` int64 histogram of a 1-D int64 ``index`` with values in ``[0, size)``.

    ``torch.bincount`` would do, but on CUDA it reads ``index.max()`` back to the host to size its
    output; a 1-D ``scatter_add_`` into a fixed-size buffer needs no sync and is deterministic.
    """
    counts = torch.zeros(size, dtype=torch.long, device=index.device)
    return counts.scatter_add_(0, index, torch.ones_like(index))


def confusion_matrix(pred_labels: Tensor, target: Tensor, num_classes: int) -> tuple[Tensor, Tensor]:
    """Confusion matrix of one batch, on the inputs' device, without a host sync.

    Args:
        pred_labels: ``(N,)`` integer class ids in ``[0, num_classes)``.
        target: ``(N,)`` integer class ids; entries outside ``[0, num_classes)`` are not counted.

    Returns:
        ``(cm, invalid)``: ``cm[i, j]`` counts samples of true class ``i`` predicted as ``j``
        (int64, ``(C, C)``); ``invalid`` is a 0-d int64 count of out-of-range targets, so callers can
        raise once when they read their results instead of syncing on every batch.
    """
    target = target.long()
    pred_labels = pred_labels.long()
    valid = (target >= 0) & (target < num_classes)
    sentinel = num_classes * num_classes
    index = torch.where(valid, target * num_classes + pred_labels, torch.full_like(target, sentinel))
    counts = count_indices(index, sentinel + 1)
    return counts[:sentinel].view(num_classes, num_classes), (~valid).sum()


def accuracy_from_confusion(cm: Tensor) -> Tensor:
    """0-d float64 accuracy; NaN for an empty matrix."""
    cm = cm.double()
    return cm.diagonal().sum() / cm.sum()


def f1_from_confusion(cm: Tensor, average: str) -> Tensor:
    """0-d float64 F1 from a ``(C, C)`` confusion matrix (rows = truth, columns = prediction).

    Args:
        average: ``"macro"`` (mean over classes present in truth or prediction) or ``"weighted"``
            (weights = support in the truth). An empty matrix gives NaN.
    """
    cm = cm.double()
    tp = cm.diagonal()
    support = cm.sum(dim=1)  # tp + fn
    predicted = cm.sum(dim=0)  # tp + fp
    denominator = support + predicted  # 2 tp + fp + fn
    f1 = torch.where(denominator > 0, 2 * tp / denominator.clamp_min(1), torch.zeros_like(tp))
    if average == "macro":
        present = (denominator > 0).double()
        return (f1 * present).sum() / present.sum()
    if average == "weighted":
        return (f1 * support).sum() / support.sum()
    raise ConfigError(f"average must be 'macro' or 'weighted', got {average!r}")


class ClassificationMetrics:
    """Accumulates a confusion matrix over batches; ``compute()`` reads it once.

    Contract: ``update(prediction (B, C) logits or probabilities, target (B,) or (B, 1) class ids)``.
    ``compute()`` returns ``{"acc", "f1_macro", "f1_weighted"}`` as Python floats and raises
    :class:`~mmbalance.errors.DataError` if no sample was seen or a target was outside ``[0, C)``.
    """

    def __init__(self, num_classes: int) -> None:
        if not isinstance(num_classes, int) or num_classes < 2:
            raise ConfigError(f"num_classes must be an int >= 2, got {num_classes!r}")
        self.num_classes = num_classes
        self.reset()

    def reset(self) -> None:
        """Forget every sample seen so far."""
        self._cm: Tensor | None = None
        self._invalid: Tensor | None = None
        self._n = 0

    def update(self, prediction: Tensor, target: Tensor) -> None:
        """Add a batch. ``prediction`` is ``(B, C)`` scores; the class is their ``argmax``."""
        if prediction.ndim != 2 or prediction.shape[1] != self.num_classes:
            raise ShapeError(
                f"prediction must have shape (B, {self.num_classes}), got {tuple(prediction.shape)}"
            )
        if target.shape not in ((prediction.shape[0],), (prediction.shape[0], 1)):
            raise ShapeError(
                f"target must have shape ({prediction.shape[0]},) to match the prediction batch, "
                f"got {tuple(target.shape)}"
            )
        if target.is_floating_point() or target.is_complex():
            raise DataError(f"classification target must hold integer class ids, got dtype {target.dtype}")
        cm, invalid = confusion_matrix(prediction.argmax(dim=1), target.reshape(-1), self.num_classes)
        if self._cm is None:
            self._cm, self._invalid = cm, invalid
        else:
            self._cm += cm
            self._invalid += invalid
        self._n += prediction.shape[0]

    @property
    def confusion(self) -> Tensor:
        """The accumulated ``(C, C)`` confusion matrix (rows = truth)."""
        if self._cm is None:
            raise DataError("no samples: call update() before reading the confusion matrix")
        return self._cm

    def compute(self) -> dict[str, float]:
        """One host sync: ``acc``, ``f1_macro``, ``f1_weighted`` over every sample seen."""
        cm = self.confusion
        values = torch.stack(
            [
                self._invalid.double(),
                accuracy_from_confusion(cm),
                f1_from_confusion(cm, "macro"),
                f1_from_confusion(cm, "weighted"),
            ]
        ).tolist()
        if values[0] > 0:
            raise DataError(
                f"{int(values[0])} of {self._n} targets were outside the class range [0, {self.num_classes})"
            )
        return {"acc": values[1], "f1_macro": values[2], "f1_weighted": values[3]}
