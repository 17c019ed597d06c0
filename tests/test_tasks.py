"""Task objects: loss reductions and shapes, the official CGGM SegLoss, score, metric suites."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mmbalance.errors import ConfigError, ShapeError
from mmbalance.metrics.seg import brats_region_dice
from mmbalance.tasks import (
    METRIC_HIGHER_IS_BETTER,
    ClassificationTask,
    RegressionTask,
    SegmentationTask,
    make_task,
)

CGGM_WEIGHTS = torch.tensor([0.2, 0.3, 0.25, 0.25])


def official_segloss(
    logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor, alpha: float = 0.5
) -> torch.Tensor:
    """CGGM ``src/eval_metrics.py:SegLoss.forward`` re-typed (one-hot, whole-batch sums), on CPU."""
    probs = F.softmax(logits, dim=1).flatten(2)[:, 1:]
    onehot = F.one_hot(target, 4).permute(0, 3, 1, 2).flatten(2)[:, 1:].float()
    dice = 2.0 * torch.sum(probs * onehot) / (torch.sum(probs) + torch.sum(onehot) + 0.01)
    ce = F.cross_entropy(logits, target, weight=weight)
    return (1 - alpha) * ce + (1 - dice) * alpha


def batch_for(task_name: str, batch: int = 6, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    if task_name == "cls":
        return torch.randn(batch, 3, generator=g), torch.randint(0, 3, (batch,), generator=g)
    if task_name == "reg":
        return torch.randn(batch, 1, generator=g), torch.empty(batch).uniform_(-3, 3, generator=g)
    target = torch.randint(0, 4, (batch, 6, 6), generator=g)
    target[0] = 0  # a slice without tumour
    return torch.randn(batch, 4, 6, 6, generator=g), target


@pytest.mark.parametrize("name,classes", [("cls", 3), ("reg", 1), ("seg", 4)])
def test_reductions_and_metric_keys(name: str, classes: int) -> None:
    task = make_task(name, classes)
    prediction, target = batch_for(name)
    per_sample = task.loss(prediction, target, reduction="none")
    assert per_sample.shape == (6,)
    assert task.loss(prediction, target, reduction="sum") == pytest.approx(float(per_sample.sum()), rel=1e-6)
    mean = task.loss(prediction, target)
    assert mean.shape == ()
    if name != "seg":  # seg's "mean" is a batch-level ratio, see test_seg_mean_is_official_segloss
        assert mean == pytest.approx(float(per_sample.mean()), rel=1e-6)
    score = task.score(prediction, target)
    assert score.shape == () and score.device == prediction.device
    suite = task.metrics()
    suite.update(prediction, target)
    metrics = suite.compute()
    assert task.primary_metric in metrics
    assert set(metrics) <= set(METRIC_HIGHER_IS_BETTER)
    with pytest.raises(ConfigError, match="reduction.*'avg'"):
        task.loss(prediction, target, reduction="avg")


def test_classification_loss_and_score() -> None:
    task = ClassificationTask(3)
    logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 3.0, 0.0], [0.0, 0.0, 1.0], [1.0, 0.0, 0.0]])
    target = torch.tensor([0, 1, 1, 2])
    assert float(task.score(logits, target)) == pytest.approx(0.5)
    assert float(task.score(logits, target.view(-1, 1))) == pytest.approx(0.5)  # (B, 1) is not broadcast
    assert task.loss(logits, target) == pytest.approx(float(F.cross_entropy(logits, target)))
    assert task.predict_labels(logits).tolist() == [0, 1, 2, 0]
    with pytest.raises(ShapeError, match=r"\(4,\) or \(4, 1\)"):
        task.score(logits, torch.zeros(4, 2, dtype=torch.long))
    with pytest.raises(ShapeError, match=r"\(B, 3\)"):
        task.loss(torch.zeros(4, 5), target)
    with pytest.raises(ConfigError, match="num_outputs"):
        ClassificationTask(1)


def test_regression_loss_and_scores() -> None:
    pred = torch.tensor([[0.5], [-1.0], [0.0], [2.0]])
    target = torch.tensor([1.0, -2.0, 0.0, -1.0])
    l1 = RegressionTask()
    assert l1.loss(pred, target) == pytest.approx((0.5 + 1.0 + 0.0 + 3.0) / 4)
    assert l1.loss(pred, target, "none").tolist() == pytest.approx([0.5, 1.0, 0.0, 3.0])
    assert RegressionTask(loss="mse").loss(pred, target) == pytest.approx((0.25 + 1.0 + 0.0 + 9.0) / 4)
    # sign accuracy, zeros negative (CGGM): (T,T) (F,F) (F,F) (T,F) -> 3/4
    assert float(l1.score(pred, target)) == pytest.approx(0.75)
    assert float(RegressionTask(score="neg_mae").score(pred, target)) == pytest.approx(-4.5 / 4)
    with pytest.raises(ShapeError, match=r"\(B,\) or \(B, 1\).*\(4, 3\)"):
        l1.loss(torch.zeros(4, 3), target)
    with pytest.raises(ShapeError, match=r"\(4,\) or \(4, 1\)"):
        l1.loss(pred, torch.zeros(5))
    with pytest.raises(ConfigError, match="'huber'"):
        RegressionTask(loss="huber")


def test_seg_mean_is_official_segloss() -> None:
    task = SegmentationTask()
    logits, target = batch_for("seg", batch=3, seed=4)
    expected = official_segloss(logits, target, CGGM_WEIGHTS)
    assert task.loss(logits, target) == pytest.approx(float(expected), abs=1e-6)
    unweighted = SegmentationTask(class_weights=None)
    expected_plain = official_segloss(logits, target, torch.ones(4))
    assert unweighted.loss(logits, target) == pytest.approx(float(expected_plain), abs=1e-6)


def test_seg_per_sample_loss_is_the_loss_of_each_sample_alone() -> None:
    task = SegmentationTask()
    logits, target = batch_for("seg", batch=4, seed=5)
    per_sample = task.loss(logits, target, reduction="none")
    alone = torch.stack([task.loss(logits[i : i + 1], target[i : i + 1]) for i in range(4)])
    assert torch.allclose(per_sample, alone, atol=1e-6)
    alone_official = torch.stack(
        [official_segloss(logits[i : i + 1], target[i : i + 1], CGGM_WEIGHTS) for i in range(4)]
    )
    assert torch.allclose(per_sample, alone_official, atol=1e-6)


def test_seg_loss_backward_and_score() -> None:
    task = SegmentationTask()
    logits, target = batch_for("seg", seed=6)
    logits.requires_grad_(True)
    task.loss(logits, target).backward()
    assert logits.grad is not None and torch.isfinite(logits.grad).all()
    expected = brats_region_dice(logits.detach().argmax(1), target).mean()
    assert float(task.score(logits.detach(), target)) == pytest.approx(float(expected))
    assert task.predict_labels(logits.detach()).shape == target.shape


def test_seg_configuration_errors() -> None:
    with pytest.raises(ConfigError, match="num_outputs must be 4, got 3"):
        SegmentationTask(num_outputs=3)
    with pytest.raises(ConfigError, match="class_weights must have 4"):
        SegmentationTask(class_weights=(1.0, 1.0))
    with pytest.raises(ConfigError, match="class_weights must all be > 0"):
        SegmentationTask(class_weights=(0.2, 0.0, 0.4, 0.4))
    with pytest.raises(ConfigError, match="dice_weight must be >= 0"):
        SegmentationTask(dice_weight=-0.5)
    with pytest.raises(ShapeError, match=r"\(B, 4, \*spatial\)"):
        SegmentationTask().loss(torch.zeros(2, 3, 4, 4), torch.zeros(2, 4, 4, dtype=torch.long))
    with pytest.raises(ShapeError, match=r"\(2, 4, 4\)"):
        SegmentationTask().loss(torch.zeros(2, 4, 4, 4), torch.zeros(2, 4, 5, dtype=torch.long))
    with pytest.raises(ConfigError, match="'det'"):
        make_task("det", 2)


def test_every_task_primary_metric_has_a_direction() -> None:
    for task in (ClassificationTask(2), RegressionTask(), SegmentationTask()):
        assert task.primary_metric in METRIC_HIGHER_IS_BETTER
    assert METRIC_HIGHER_IS_BETTER["mae"] is False and METRIC_HIGHER_IS_BETTER["dice_mean"] is True
