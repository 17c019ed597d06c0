"""``Task.score(..., exact=True)``: k / n as a correctly rounded float64 (the CGGM code's
``accuracy_score``), while the default path stays float32 and unchanged for every other caller."""

from __future__ import annotations

import torch

from mmbalance.tasks import ClassificationTask, RegressionTask, SegmentationTask


def _logits_with_hits(target: torch.Tensor, hits: int, classes: int = 3) -> torch.Tensor:
    """Logits whose argmax equals ``target`` in the first ``hits`` samples, and not afterwards."""
    predicted = target.clone()
    predicted[hits:] = (target[hits:] + 1) % classes
    return torch.nn.functional.one_hot(predicted, classes).float()


def test_classification_exact_is_k_over_n_in_float64():
    target = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1, 2, 0, 1, 2])
    task = ClassificationTask(3)
    for hits in range(13):
        logits = _logits_with_hits(target, hits)
        exact = task.score(logits, target, exact=True)
        assert exact.dtype == torch.float64 and exact.dim() == 0
        assert exact.item() == hits / 12  # Python's float64 division: the official value, bit for bit
        default = task.score(logits, target)
        assert default.dtype == torch.float32
        assert torch.equal(default, (logits.argmax(1) == target).float().mean())  # unchanged path
    # 5/12 is not a float32 number: the float32 path is off by ~1e-8, the exact path is not
    logits = _logits_with_hits(target, 5)
    assert task.score(logits, target).item() != 5 / 12


def test_regression_sign_accuracy_exact_counts_zero_labels_negative():
    # zeros are negative on both sides (train_eval_senti: y > 0); hits: samples 0, 1, 2, 4, 6, 7, 9
    pred = torch.tensor([0.5, -1.0, 0.0, 2.0, -0.1, 1.0, 0.3, -2.0, 0.2, -0.4, 0.7, 0.1]).reshape(12, 1)
    target = torch.tensor([1.0, 0.0, -2.0, -1.0, 0.0, -0.5, 2.5, -0.1, -3.0, -1.0, 0.0, -2.0])
    task = RegressionTask()
    exact = task.score(pred, target, exact=True)
    assert exact.dtype == torch.float64 and exact.item() == 7 / 12
    assert task.score(pred, target).dtype == torch.float32


def test_regression_neg_mae_exact_in_float64():
    pred = torch.tensor([[0.1], [0.2], [0.3]], dtype=torch.float32)
    target = torch.tensor([0.0, 0.0, 0.0], dtype=torch.float64)
    exact = RegressionTask(score="neg_mae").score(pred, target, exact=True)
    # float32 inputs widened exactly: -(fl32(0.1) + fl32(0.2) + fl32(0.3)) / 3 in float64
    hand = -(float(pred[0, 0]) + float(pred[1, 0]) + float(pred[2, 0])) / 3
    assert exact.dtype == torch.float64 and abs(exact.item() - hand) < 1e-16


def test_segmentation_exact_is_the_float32_dice_as_float64():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 4, 6, 6, generator=g)
    target = torch.randint(0, 4, (2, 6, 6), generator=g)
    task = SegmentationTask()
    default = task.score(logits, target)
    exact = task.score(logits, target, exact=True)
    assert default.dtype == torch.float32 and exact.dtype == torch.float64
    assert exact.item() == default.item()
