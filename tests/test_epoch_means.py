"""EpochMeans: epoch means, and the epoch's extremes with ``reduction="min"`` / ``"max"``."""

from __future__ import annotations

import pytest
import torch

from mmbalance.epoch_means import EpochMeans


def _feed(means: EpochMeans) -> None:
    means.update(B=torch.tensor([1.0, -2.0]), L=torch.tensor(0.5))
    means.update(B=torch.tensor([3.0, -7.0]), L=torch.tensor(-1.5))
    means.update(B=torch.tensor([-4.0, 6.0]), L=torch.tensor(2.5))


@pytest.mark.parametrize(
    "reduction, expected",
    [
        # means: (1 + 3 - 4) / 3 = 0, (-2 - 7 + 6) / 3 = -1, (0.5 - 1.5 + 2.5) / 3 = 0.5
        ("mean", {"B/a": 0.0, "B/b": -1.0, "L": 0.5}),
        ("min", {"B/a": -4.0, "B/b": -7.0, "L": -1.5}),
        ("max", {"B/a": 3.0, "B/b": 6.0, "L": 2.5}),
    ],
)
def test_reductions_by_hand(reduction, expected):
    means = EpochMeans(("a", "b"), reduction=reduction)
    _feed(means)
    assert means.pop() == expected
    assert means.pop() == {}  # reset: the next epoch starts empty
    means.update(B=torch.tensor([5.0, 5.0]), L=torch.tensor(1.0))
    assert means.compute() == {"B/a": 5.0, "B/b": 5.0, "L": 1.0}  # no value of the last epoch kept


def test_first_update_is_copied_not_aliased():
    value = torch.tensor([1.0, 2.0], dtype=torch.float64)
    means = EpochMeans(("a", "b"), reduction="max")
    means.update(B=value)
    means.update(B=torch.tensor([3.0, 0.0]))
    assert value.tolist() == [1.0, 2.0]


def test_unknown_reduction_is_an_error():
    with pytest.raises(ValueError, match="reduction must be one of .* got 'median'"):
        EpochMeans(("a",), reduction="median")
