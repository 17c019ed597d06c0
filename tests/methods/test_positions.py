"""Per-position rows of class logits: pixel order, targets in the same order, per-sample means."""

from __future__ import annotations

import pytest
import torch

from mmbalance.errors import ShapeError
from mmbalance.methods._positions import class_rows, label_rows, per_sample


def test_classification_rows_are_unchanged():
    logits = torch.randn(3, 4)
    assert class_rows(logits) is logits
    assert torch.equal(label_rows(torch.tensor([2, 0, 1])), torch.tensor([2, 0, 1]))


def test_segmentation_rows_follow_the_label_map_order():
    # sample b, pixel (h, w) has logits (100 b + 10 h + w, -(100 b + 10 h + w)) over K = 2 classes
    b, h, w = torch.meshgrid(torch.arange(2), torch.arange(2), torch.arange(3), indexing="ij")
    code = (100 * b + 10 * h + w).float()
    logits = torch.stack([code, -code], dim=1)  # (B, K, H, W)
    rows = class_rows(logits)
    assert rows.shape == (12, 2)
    assert rows[:, 0].tolist() == [0, 1, 2, 10, 11, 12, 100, 101, 102, 110, 111, 112]
    assert torch.equal(label_rows(code.long()), rows[:, 0].long())
    with pytest.raises(ShapeError, match="must be"):
        class_rows(torch.randn(2, 3, 4))


def test_per_sample_means_over_pixels():
    values = torch.tensor([1.0, 3.0, 2.0, 2.0, 0.0, 6.0])
    torch.testing.assert_close(per_sample(values, 2), torch.tensor([2.0, 8.0 / 3]))
    torch.testing.assert_close(per_sample(values, 6), values)
    with pytest.raises(ShapeError, match="samples"):
        per_sample(values, 4)
