"""BraTS region Dice, the segmentation metric suite and the CGGM soft-Dice term."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from monai.metrics import DiceMetric, compute_dice

from mmbalance.errors import ConfigError, DataError, ShapeError
from mmbalance.metrics.seg import (
    SegmentationMetrics,
    brats_region_dice,
    brats_region_masks,
    label_map,
    monai_region_dice,
    soft_dice_loss,
)

EPS = 1e-3


def logits_for(labels: torch.Tensor) -> torch.Tensor:
    """(B, H, W) labels -> (B, 4, H, W) logits whose argmax is ``labels``."""
    return F.one_hot(labels, 4).permute(0, 3, 1, 2).float() * 5.0


def smoothed(inter: float, size_p: float, size_t: float) -> float:
    return 2 * (inter + EPS) / (size_p + size_t + 2 * EPS)


def test_region_dice_by_hand() -> None:
    target = torch.tensor([[[0, 1, 2], [3, 3, 2]]])
    pred = torch.tensor([[[0, 3, 2], [3, 0, 0]]])
    # ET: T = {(1,0),(1,1)}, P = {(0,1),(1,0)} -> inter 1, |P| 2, |T| 2
    # TC: T = {(0,1),(1,0),(1,1)}, P = {(0,1),(1,0)} -> inter 2, 2, 3
    # WT: T = 5 pixels, P = {(0,1),(0,2),(1,0)} -> inter 3, 3, 5
    expected = [smoothed(1, 2, 2), smoothed(2, 2, 3), smoothed(3, 3, 5)]
    assert brats_region_dice(pred, target).tolist()[0] == pytest.approx(expected, rel=1e-6)


def test_region_membership() -> None:
    masks = brats_region_masks(torch.tensor([[0, 1, 2, 3]]))  # (1, 3, 4): ET, TC, WT
    assert masks[0].int().tolist() == [[0, 0, 0, 1], [0, 1, 0, 1], [0, 1, 1, 1]]


def test_empty_ground_truth_cggm_convention() -> None:
    target = torch.zeros(2, 4, 4, dtype=torch.long)
    pred = torch.zeros(2, 4, 4, dtype=torch.long)
    pred[1, 0, :3] = 3  # sample 1 predicts 3 ET pixels where there is no tumour
    dice = brats_region_dice(pred, target)
    assert dice[0].tolist() == pytest.approx([1.0, 1.0, 1.0])  # correctly empty -> 1
    assert dice[1].tolist() == pytest.approx([2 * EPS / (3 + 2 * EPS)] * 3)  # false positive -> ~0


def test_eps_zero_equals_monai_on_non_empty_regions() -> None:
    g = torch.Generator().manual_seed(0)
    target = torch.randint(0, 4, (3, 8, 8), generator=g)
    pred = torch.randint(0, 4, (3, 8, 8), generator=g)
    ours = brats_region_dice(pred, target, eps=0.0)
    as_channels = lambda x: brats_region_masks(x).view(3, 3, 8, 8).float()  # noqa: E731
    monai = compute_dice(as_channels(pred), as_channels(target), include_background=True, ignore_empty=False)
    assert torch.allclose(ours, monai, atol=1e-6)
    # the smoothed value stays within eps / |T| of it
    assert torch.allclose(brats_region_dice(pred, target), ours, atol=1e-4)


def test_suite_averages_per_sample_dice_and_accumulates() -> None:
    g = torch.Generator().manual_seed(1)
    target = torch.randint(0, 4, (5, 6, 6), generator=g)
    target[0] = 0  # one empty slice
    logits = torch.randn(5, 4, 6, 6, generator=g)
    per_sample = brats_region_dice(logits.argmax(1), target)
    whole, parts = SegmentationMetrics(), SegmentationMetrics()
    whole.update(logits, target)
    parts.update(logits[:2], target[:2])
    parts.update(logits[2:], target[2:])
    got = whole.compute()
    assert got == pytest.approx(parts.compute(), abs=1e-12)
    mean = per_sample.double().mean(0).tolist()
    assert [got["dice_et"], got["dice_tc"], got["dice_wt"]] == pytest.approx(mean, abs=1e-7)
    assert got["dice_mean"] == pytest.approx(sum(mean) / 3, abs=1e-7)


def test_perfect_prediction_scores_one() -> None:
    target = torch.tensor([[[0, 1], [2, 3]], [[0, 0], [2, 2]]])
    suite = SegmentationMetrics()
    suite.update(logits_for(target), target)
    ones = {"dice_et": 1.0, "dice_tc": 1.0, "dice_wt": 1.0, "dice_mean": 1.0}
    assert suite.compute() == pytest.approx({**ones, **{f"{k}_monai": 1.0 for k in ones}})


def test_monai_convention_by_hand() -> None:
    # sample 0: ET absent in the truth; sample 1: no tumour at all (left out of every MONAI mean)
    target = torch.tensor([[[0, 1, 2, 2]], [[0, 0, 0, 0]]])
    pred = torch.tensor([[[0, 1, 2, 3]], [[0, 3, 0, 0]]])
    got = SegmentationMetrics()
    got.update(logits_for(pred), target)
    got = got.compute()
    # sample 0: ET T = {} -> left out; TC T = {1}, P = {1, 3} -> 2*1/3; WT T = {1,2,3}, P = {1,2,3} -> 1
    assert got["dice_et_monai"] != got["dice_et_monai"]  # NaN: no sample has ET
    assert got["dice_tc_monai"] == pytest.approx(2 / 3)
    assert got["dice_wt_monai"] == pytest.approx(1.0)
    # "mean": per-sample mean over present regions, then over samples with tumour: (2/3 + 1) / 2
    assert got["dice_mean_monai"] == pytest.approx(5 / 6)
    # CGGM: sample 0 ET empty in truth, 1 predicted pixel -> 2e-3/(1 + 2e-3); sample 1 predicts ET,
    # TC, WT at one pixel where none exists -> the same small value, in each region
    small = 2 * EPS / (1 + 2 * EPS)
    assert got["dice_et"] == pytest.approx((small + small) / 2)
    assert got["dice_wt"] == pytest.approx((1.0 + small) / 2)


@pytest.mark.parametrize("seed", range(4))
def test_monai_convention_matches_dice_metric_over_batches(seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    target = torch.randint(0, 4, (9, 6, 6), generator=g)
    target[:3] = torch.where(target[:3] == 3, 2, target[:3])  # ET absent in three slices
    target[3] = 0  # and one slice without tumour
    target[4, :5] = torch.where(target[4, :5] > 0, 0, target[4, :5])  # a nearly empty one
    logits = torch.randn(9, 4, 6, 6, generator=g)
    mean, per_region = DiceMetric(reduction="mean"), DiceMetric(reduction="mean_batch")  # ignore_empty=True
    ours = SegmentationMetrics()
    for lo, hi in ((0, 4), (4, 5), (5, 9)):
        pred, true = label_map(logits[lo:hi]), target[lo:hi]
        as_channels = lambda x: brats_region_masks(x).view(x.shape[0], 3, 6, 6).float()  # noqa: E731
        mean(as_channels(pred), as_channels(true))
        per_region(as_channels(pred), as_channels(true))
        ours.update(logits[lo:hi], true)
        # the per-sample function agrees with MONAI's NaN-for-empty values
        expected = compute_dice(as_channels(pred), as_channels(true), ignore_empty=True)
        assert torch.allclose(monai_region_dice(pred, true), expected, equal_nan=True)
    got = ours.compute()
    regions = per_region.aggregate().tolist()  # ET, TC, WT
    ours_regions = [got["dice_et_monai"], got["dice_tc_monai"], got["dice_wt_monai"]]
    assert ours_regions == pytest.approx(regions, abs=1e-6)
    assert got["dice_mean_monai"] == pytest.approx(float(mean.aggregate()), abs=1e-6)


def test_soft_dice_loss_matches_official_sums() -> None:
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(3, 4, 5, 5, generator=g)
    target = torch.randint(0, 4, (3, 5, 5), generator=g)
    probs = F.softmax(logits, 1).flatten(2)[:, 1:]
    onehot = F.one_hot(target, 4).permute(0, 3, 1, 2).flatten(2)[:, 1:].float()
    inter, denom = (probs * onehot).sum(dim=(1, 2)), probs.sum(dim=(1, 2)) + onehot.sum(dim=(1, 2))
    assert soft_dice_loss(logits, target) == pytest.approx(
        float(1 - 2 * inter.sum() / (denom.sum() + 0.01)), abs=1e-6
    )
    per_sample = soft_dice_loss(logits, target, reduction="none")
    assert per_sample.shape == (3,)
    assert torch.allclose(per_sample, 1 - 2 * inter / (denom + 0.01), atol=1e-6)
    assert soft_dice_loss(logits, target, reduction="sum") == pytest.approx(float(per_sample.sum()), abs=1e-6)


def test_errors() -> None:
    suite = SegmentationMetrics()
    with pytest.raises(DataError, match="no samples"):
        suite.compute()
    with pytest.raises(ShapeError, match="4 channels"):
        suite.update(torch.zeros(1, 3, 2, 2), torch.zeros(1, 2, 2, dtype=torch.long))
    with pytest.raises(ShapeError, match=r"\(1, 2, 2\).*\(1, 2, 3\)"):
        suite.update(torch.zeros(1, 4, 2, 2), torch.zeros(1, 2, 3, dtype=torch.long))
    with pytest.raises(DataError, match="integer"):
        suite.update(torch.zeros(1, 4, 2, 2), torch.zeros(1, 2, 2))
    suite.update(torch.zeros(1, 4, 2, 2), torch.tensor([[[0, 4], [4, 1]]]))  # unremapped label 4
    with pytest.raises(DataError, match="2 target pixels.*remap label 4"):
        suite.compute()
    with pytest.raises(ShapeError, match="differs"):
        brats_region_dice(torch.zeros(1, 2, 2), torch.zeros(1, 2, 3))
    with pytest.raises(ConfigError, match="eps"):
        brats_region_dice(torch.zeros(1, 2, 2), torch.zeros(1, 2, 2), eps=-1.0)
    with pytest.raises(ConfigError, match="reduction"):
        soft_dice_loss(torch.zeros(1, 4, 2, 2), torch.zeros(1, 2, 2, dtype=torch.long), reduction="avg")


def test_label_map_equals_argmax_including_ties() -> None:
    g = torch.Generator().manual_seed(3)
    logits = torch.randint(0, 3, (2, 4, 5, 5), generator=g).float()  # many ties
    assert torch.equal(label_map(logits), logits.argmax(dim=1))
