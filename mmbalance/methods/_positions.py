"""Per-position class scores: classification ``(B, K)`` and segmentation ``(B, K, H, W)`` logits as rows.

Several methods write their formulas per sample over class probabilities (MBSD's distillation
weights, CML's confidences, LFM's alignment). On segmentation maps each pixel is such a sample:
:func:`class_rows` turns logits into ``(N, K)`` rows (``N = B`` for classification, ``B·H·W`` for
segmentation, pixels of sample b contiguous) and :func:`label_rows` the targets into ``(N,)``, so one
formula serves both tasks. :func:`per_sample` folds per-position values back to one per sample.
"""

from __future__ import annotations

from torch import Tensor

from mmbalance.errors import ShapeError

__all__ = ["class_rows", "label_rows", "per_sample"]


def class_rows(logits: Tensor) -> Tensor:
    """``(B, K) -> (B, K)``; ``(B, K, H, W) -> (B·H·W, K)`` (class dimension last).

    Raises:
        ShapeError: any other number of dimensions.
    """
    if logits.dim() == 2:
        return logits
    if logits.dim() == 4:
        return logits.movedim(1, -1).reshape(-1, logits.shape[1])
    raise ShapeError(f"class logits must be (B, K) or (B, K, H, W), got shape {tuple(logits.shape)}")


def label_rows(target: Tensor) -> Tensor:
    """Class ids ``(B,)`` or label maps ``(B, H, W)`` as ``(N,)`` int64, in :func:`class_rows` order."""
    return target.reshape(-1).long()


def per_sample(values: Tensor, batch_size: int) -> Tensor:
    """Per-position values ``(N,)`` as ``(B,)``: unchanged for ``N = B``, the mean over each sample's
    pixels for segmentation (``N = B·H·W``).

    Raises:
        ShapeError: ``N`` is not a multiple of ``batch_size``.
    """
    if batch_size < 1 or values.numel() % batch_size:
        raise ShapeError(f"{values.numel()} per-position values do not split into {batch_size} samples")
    return values.reshape(batch_size, -1).mean(dim=1)
