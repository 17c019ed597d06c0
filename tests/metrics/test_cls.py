"""Classification metrics against scikit-learn, torchmetrics and hand-computed confusion matrices."""

from __future__ import annotations

import pytest
import torch
from sklearn.metrics import accuracy_score, f1_score
from torchmetrics.functional.classification import multiclass_f1_score

from mmbalance.errors import ConfigError, DataError, ShapeError
from mmbalance.metrics.cls import ClassificationMetrics, confusion_matrix, f1_from_confusion


def one_hot_logits(labels: list[int], num_classes: int) -> torch.Tensor:
    return torch.nn.functional.one_hot(torch.tensor(labels), num_classes).float()


def sklearn_reference(pred: torch.Tensor, target: torch.Tensor) -> dict[str, float]:
    y_pred, y_true = pred.numpy(), target.numpy()
    return {
        "acc": accuracy_score(y_true, y_pred),
        "f1_macro": f1_score(y_true, y_pred, average="macro"),
        "f1_weighted": f1_score(y_true, y_pred, average="weighted"),
    }


@pytest.mark.parametrize("seed,num_classes,n", [(0, 2, 40), (1, 4, 97), (2, 7, 30)])
def test_matches_sklearn_on_random_data(seed: int, num_classes: int, n: int) -> None:
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, num_classes, generator=g)
    target = torch.randint(0, num_classes, (n,), generator=g)
    suite = ClassificationMetrics(num_classes)
    suite.update(logits, target)
    got = suite.compute()
    assert set(got) == {"acc", "f1_macro", "f1_weighted"}
    for key, value in sklearn_reference(logits.argmax(1), target).items():
        assert got[key] == pytest.approx(value, abs=1e-12), key


def test_hand_computed_confusion_and_f1() -> None:
    # truth 0,0,1,1,2 ; prediction 0,1,1,1,0
    cm, invalid = confusion_matrix(torch.tensor([0, 1, 1, 1, 0]), torch.tensor([0, 0, 1, 1, 2]), 3)
    assert cm.tolist() == [[1, 1, 0], [0, 2, 0], [1, 0, 0]]
    assert int(invalid) == 0
    # per-class F1: class 0 = 2/(2+1+1) = 0.5, class 1 = 4/(4+1) = 0.8, class 2 = 0
    assert float(f1_from_confusion(cm, "macro")) == pytest.approx((0.5 + 0.8 + 0.0) / 3)
    assert float(f1_from_confusion(cm, "weighted")) == pytest.approx((2 * 0.5 + 2 * 0.8 + 1 * 0.0) / 5)


def test_macro_f1_skips_classes_absent_from_truth_and_prediction() -> None:
    # class 3 of 4 never occurs: sklearn and torchmetrics both leave it out of the macro mean
    target = torch.tensor([0, 1, 2, 2, 1, 0])
    pred = torch.tensor([0, 1, 2, 1, 1, 2])
    suite = ClassificationMetrics(4)
    suite.update(one_hot_logits(pred.tolist(), 4), target)
    got = suite.compute()
    assert got["f1_macro"] == pytest.approx(f1_score(target.numpy(), pred.numpy(), average="macro"))
    assert got["f1_macro"] == pytest.approx(
        float(multiclass_f1_score(pred, target, num_classes=4, average="macro"))
    )


def test_single_class_perfect_and_imperfect() -> None:
    suite = ClassificationMetrics(3)
    suite.update(one_hot_logits([1, 1, 1], 3), torch.tensor([1, 1, 1]))
    assert suite.compute() == {"acc": 1.0, "f1_macro": 1.0, "f1_weighted": 1.0}
    # one true class, predictions split between it and another class: matches sklearn's defaults
    suite.reset()
    pred = [1, 1, 0, 2]
    suite.update(one_hot_logits(pred, 3), torch.tensor([1, 1, 1, 1]))
    got = suite.compute()
    ref = sklearn_reference(torch.tensor(pred), torch.tensor([1, 1, 1, 1]))
    assert got == pytest.approx(ref)
    assert got["f1_weighted"] == pytest.approx(2 * 2 / (2 * 2 + 2))  # only class 1 has support


def test_accumulation_equals_one_update() -> None:
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(50, 5, generator=g)
    target = torch.randint(0, 5, (50,), generator=g)
    whole, parts = ClassificationMetrics(5), ClassificationMetrics(5)
    whole.update(logits, target)
    for lo, hi in ((0, 7), (7, 8), (8, 31), (31, 50)):
        parts.update(logits[lo:hi], target[lo:hi].view(-1, 1))  # (B, 1) targets are accepted
    assert torch.equal(whole.confusion, parts.confusion)
    assert whole.compute() == parts.compute()


def test_reset_forgets_samples() -> None:
    suite = ClassificationMetrics(2)
    suite.update(one_hot_logits([0, 0], 2), torch.tensor([1, 1]))
    suite.reset()
    suite.update(one_hot_logits([1], 2), torch.tensor([1]))
    assert suite.compute()["acc"] == 1.0


def test_errors_name_the_problem() -> None:
    suite = ClassificationMetrics(3)
    with pytest.raises(DataError, match="no samples"):
        suite.compute()
    with pytest.raises(ShapeError, match=r"\(B, 3\).*\(4, 2\)"):
        suite.update(torch.zeros(4, 2), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ShapeError, match=r"\(4,\).*\(5,\)"):
        suite.update(torch.zeros(4, 3), torch.zeros(5, dtype=torch.long))
    with pytest.raises(DataError, match="float32"):
        suite.update(torch.zeros(4, 3), torch.zeros(4))
    suite.update(torch.zeros(3, 3), torch.tensor([0, 3, -1]))  # out of range: reported at compute()
    with pytest.raises(DataError, match=r"2 of 3 targets.*\[0, 3\)"):
        suite.compute()
    with pytest.raises(ConfigError, match="num_classes"):
        ClassificationMetrics(1)
    with pytest.raises(ConfigError, match="average"):
        f1_from_confusion(torch.eye(2), "micro")
