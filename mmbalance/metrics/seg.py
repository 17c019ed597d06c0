"""BraTS segmentation: region Dice (ET, TC, WT) and the CGGM soft-Dice loss term.

Labels are BraTS with 4 remapped to 3: 0 background, 1 necrotic core (NCR), 2 edema (ED),
3 enhancing tumour (ET). Regions: ET = {3}, TC = {1, 3}, WT = {1, 2, 3}.

Dice convention (CGGM ``src/eval_metrics.py:Dice`` / ``train_eval_seg`` / ``cal_dice``), per sample
and per region, on hard label maps::

    dice = 2 (|P ∩ T| + eps) / (|P| + |T| + 2 eps),   eps = 1e-3

then averaged over samples (CGGM concatenates the whole validation set and takes the mean of the
per-sample values, which is what :class:`SegmentationMetrics` accumulates). Consequences of the
smoothing, which we keep on purpose so that numbers compare with the paper's code:

* empty ground truth and empty prediction: Dice = 1 (the region is correctly absent);
* empty ground truth, non-empty prediction of k pixels: Dice = 2e-3 / (k + 2e-3), about 0;
* non-empty regions: within ~eps/|T| of the unsmoothed Dice.

The MONAI convention is reported beside it (keys ``dice_<region>_monai``, ``dice_mean_monai``):
``monai.metrics.DiceMetric(include_background=True, ignore_empty=True)``, MONAI's default, on the
three region channels, as in MONAI's BraTS tutorial. No smoothing, ``dice = 2 |P ∩ T| / (|P| + |T|)``,
and a sample whose ground truth region is **empty is left out** (NaN in MONAI, dropped from the
mean) instead of counting 1 or about 0. ``dice_<region>_monai`` is ``reduction="mean_batch"``: the
mean over the samples where the region is present; ``dice_mean_monai`` is ``reduction="mean"``: the
mean over samples of each sample's mean over its present regions, over the samples with any tumour.
Where no sample has the region (or any tumour) MONAI's aggregate returns 0; we return NaN, the
value is undefined. On BraTS slices, where ET is often absent and many slices have no tumour, the
two conventions differ by several points, which is why tables name the one each column uses.

Soft-Dice loss (CGGM ``SegLoss``): softmax over classes, drop the background channel, then
``dice = 2 Σ(p · onehot) / (Σ p + Σ onehot + 0.01)`` with the sums taken over the **whole batch**
(classes, pixels and samples together; the 0.01 only in the denominator) and loss ``1 - dice``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from mmbalance.errors import ConfigError, DataError, ShapeError

__all__ = [
    "SegmentationMetrics",
    "brats_region_dice",
    "brats_region_counts",
    "monai_region_dice",
    "brats_region_masks",
    "label_map",
    "soft_dice_loss",
    "soft_dice_statistics",
    "REGIONS",
    "NUM_LABELS",
]

REGIONS: tuple[str, ...] = ("et", "tc", "wt")  # order of the last axis of brats_region_dice
NUM_LABELS = 4  # 0 bg, 1 NCR, 2 ED, 3 ET (BraTS label 4 remapped to 3)
REDUCTIONS = ("mean", "sum", "none")


def label_map(logits: Tensor) -> Tensor:
    """``(B, C, *spatial)`` scores -> ``(B, *spatial)`` int64 class of the highest score.

    Same result as ``logits.argmax(dim=1)`` (first maximum on ties), but ``max(dim=1).indices``:
    on CPU (torch 2.14, one thread, ``(16, 4, 160, 160)``) argmax over the non-innermost class
    axis took 53 ms and ``max`` 9.5 ms.
    """
    return logits.max(dim=1).indices


def brats_region_masks(labels: Tensor) -> Tensor:
    """``(B, *spatial)`` label map -> ``(B, 3, N)`` bool masks of ET, TC, WT (N = prod(spatial))."""
    flat = labels.reshape(labels.shape[0], -1)
    et = flat == 3
    return torch.stack([et, et | (flat == 1), flat != 0], dim=1)


def brats_region_counts(pred_labels: Tensor, target: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``(|P ∩ T|, |P|, |T|)`` per sample and region, each ``(B, 3)`` float32 in :data:`REGIONS` order.

    Float32 counts are exact up to 2**24 pixels per slice. ``pred_labels`` and ``target`` are integer
    label maps of one shape ``(B, *spatial)``, values in 0..3; no host sync.
    """
    if pred_labels.shape != target.shape:
        raise ShapeError(
            f"pred_labels shape {tuple(pred_labels.shape)} differs from target shape {tuple(target.shape)}"
        )
    if pred_labels.ndim < 2:
        raise ShapeError(f"label maps must have shape (B, *spatial), got {tuple(pred_labels.shape)}")
    pred = brats_region_masks(pred_labels)
    true = brats_region_masks(target)
    inter = (pred & true).sum(dim=2, dtype=torch.float32)
    return inter, pred.sum(dim=2, dtype=torch.float32), true.sum(dim=2, dtype=torch.float32)


def brats_region_dice(pred_labels: Tensor, target: Tensor, eps: float = 1e-3) -> Tensor:
    """Per-sample Dice of ET, TC, WT with CGGM's smoothing; no host sync.

    Args:
        pred_labels: ``(B, H, W)`` (or any ``(B, *spatial)``) integer label map, values in 0..3.
        target: integer label map of the same shape, values in 0..3 (not checked here: this runs
            every training step; :class:`SegmentationMetrics` checks the range once per evaluation).
        eps: smoothing added to the intersection and twice to the denominator; ``eps >= 0``. With
            ``eps = 0`` a region empty in both maps gives NaN (0/0).

    Returns:
        ``(B, 3)`` float32 Dice in the order of :data:`REGIONS` (ET, TC, WT).
    """
    if eps < 0:
        raise ConfigError(f"eps must be >= 0, got {eps}")
    inter, pred_size, true_size = brats_region_counts(pred_labels, target)
    return 2 * (inter + eps) / (pred_size + true_size + 2 * eps)


def monai_region_dice(pred_labels: Tensor, target: Tensor) -> Tensor:
    """Per-sample Dice of ET, TC, WT in MONAI's default convention: ``(B, 3)`` float32, NaN where
    the ground truth region is empty (``compute_dice(..., ignore_empty=True)``); no host sync."""
    inter, pred_size, true_size = brats_region_counts(pred_labels, target)
    return torch.where(true_size > 0, 2 * inter / (pred_size + true_size).clamp_min(1), torch.nan)


def _check_logits(logits: Tensor, target: Tensor) -> None:
    if logits.ndim < 3:
        raise ShapeError(f"segmentation logits must have shape (B, C, *spatial), got {tuple(logits.shape)}")
    expected = (logits.shape[0], *logits.shape[2:])
    if tuple(target.shape) != expected:
        raise ShapeError(
            f"segmentation target must have shape {expected} to match logits {tuple(logits.shape)}, "
            f"got {tuple(target.shape)}"
        )


def soft_dice_statistics(logits: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
    """Per-sample sums of the foreground soft Dice: ``(intersection (B,), denominator (B,))``.

    ``intersection_b = Σ_{c>0, x} softmax(logits)_b[c, x] · [target_b(x) = c]`` and
    ``denominator_b = Σ_{c>0, x} softmax(logits)_b[c, x] + #{x : target_b(x) > 0}`` (without the
    smoothing). Computed by gathering the target class's probability, never a one-hot tensor.
    """
    _check_logits(logits, target)
    target = target.long()
    probs = F.softmax(logits.float(), dim=1).flatten(2)  # (B, C, N)
    flat_target = target.reshape(target.shape[0], 1, -1)  # (B, 1, N)
    picked = probs.gather(1, flat_target).squeeze(1)  # (B, N): probability of the true class
    foreground = flat_target.squeeze(1) > 0
    intersection = (picked * foreground).sum(dim=1)
    denominator = probs[:, 1:].sum(dim=(1, 2)) + foreground.sum(dim=1)
    return intersection, denominator


def soft_dice_loss(logits: Tensor, target: Tensor, reduction: str = "mean", smooth: float = 0.01) -> Tensor:
    """``1 - soft Dice`` over the foreground classes, CGGM ``SegLoss`` convention.

    Args:
        logits: ``(B, C, H, W)`` (or ``(B, C, *spatial)``) raw scores; class 0 is background.
        target: ``(B, H, W)`` integer labels in ``[0, C)``.
        reduction: ``"mean"``: one Dice over the whole batch (sums over samples first), exactly the
            official scalar; ``"none"``: ``(B,)`` per-sample ``1 - Dice_b``; ``"sum"``: the sum of
            the per-sample values.
        smooth: added to the denominator only (CGGM: 0.01).
    """
    if reduction not in REDUCTIONS:
        raise ConfigError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    intersection, denominator = soft_dice_statistics(logits, target)
    if reduction == "mean":
        return 1 - 2 * intersection.sum() / (denominator.sum() + smooth)
    per_sample = 1 - 2 * intersection / (denominator + smooth)
    return per_sample if reduction == "none" else per_sample.sum()


class SegmentationMetrics:
    """Mean over samples of the per-sample region Dice, CGGM and MONAI conventions (module docstring).

    Contract: ``update(prediction (B, 4, *spatial) logits, target (B, *spatial) labels in 0..3)``;
    the predicted label map is the ``argmax`` over classes (:func:`label_map`). ``compute()`` returns
    ``{"dice_et", "dice_tc", "dice_wt", "dice_mean"}`` (CGGM convention; ``dice_mean`` = mean of the
    three) and the same four keys with the suffix ``_monai`` (MONAI's default convention, NaN where
    no sample has the region). Raises :class:`~mmbalance.errors.DataError` if no sample was seen or
    a target label was outside 0..3 (for example an unremapped BraTS label 4).
    """

    def __init__(self, eps: float = 1e-3) -> None:
        if eps < 0:
            raise ConfigError(f"eps must be >= 0, got {eps}")
        self.eps = eps
        self.reset()

    def reset(self) -> None:
        """Forget every sample seen so far."""
        # float64 on the device: [invalid pixels, CGGM Dice sums (3), MONAI Dice sums over present
        # regions (3), present-region counts (3), sum of per-sample MONAI means, samples with tumour]
        self._stats: Tensor | None = None
        self._n = 0

    def update(self, prediction: Tensor, target: Tensor) -> None:
        """Add a batch (no host sync)."""
        _check_logits(prediction, target)
        if prediction.shape[1] != NUM_LABELS:
            raise ShapeError(
                f"segmentation logits must have {NUM_LABELS} channels (BraTS labels 0..3), "
                f"got shape {tuple(prediction.shape)}"
            )
        if target.is_floating_point() or target.is_complex():
            raise DataError(f"segmentation target must hold integer labels, got dtype {target.dtype}")
        inter, pred_size, true_size = (x.double() for x in brats_region_counts(label_map(prediction), target))
        cggm = 2 * (inter + self.eps) / (pred_size + true_size + 2 * self.eps)
        present = true_size > 0
        monai = torch.where(present, 2 * inter / (pred_size + true_size).clamp_min(1), 0.0)
        regions_present = present.sum(dim=1)
        sample_mean = monai.sum(dim=1) / regions_present.clamp_min(1)
        stats = torch.cat(
            [
                ((target < 0) | (target >= NUM_LABELS)).sum().double().view(1),
                cggm.sum(dim=0),
                monai.sum(dim=0),
                present.sum(dim=0).double(),
                sample_mean.sum().view(1),
                (regions_present > 0).sum().double().view(1),
            ]
        )
        self._stats = stats if self._stats is None else self._stats + stats
        self._n += prediction.shape[0]

    def compute(self) -> dict[str, float]:
        """One host sync: ``dice_et``, ``dice_tc``, ``dice_wt``, ``dice_mean`` and their ``_monai``."""
        if self._stats is None:
            raise DataError("no samples: call update() before compute()")
        s = self._stats
        cggm = s[1:4] / self._n
        monai = s[4:7] / s[7:10]  # 0/0 = NaN: no sample has the region
        values = torch.cat([s[:1], cggm, cggm.mean().view(1), monai, (s[10] / s[11]).view(1)]).tolist()
        if values[0] > 0:
            raise DataError(
                f"{int(values[0])} target pixels were outside the BraTS labels 0..{NUM_LABELS - 1} "
                "(remap label 4 to 3)"
            )
        keys = [f"dice_{r}" for r in REGIONS] + ["dice_mean"]
        return {
            **dict(zip(keys, values[1:5], strict=True)),
            **{f"{k}_monai": v for k, v in zip(keys, values[5:9], strict=True)},
        }
