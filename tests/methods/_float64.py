"""A float64 version of the tiny two-modality problem, for checks against float64 hand values."""

from __future__ import annotations

import torch

from mmbalance.datasets.base import TensorDictDataset

from ..conftest import tiny_model, tiny_splits


def _doubled(dataset: TensorDictDataset) -> TensorDictDataset:
    tensors = dataset.tensors.items()
    return TensorDictDataset({k: v.double() if v.is_floating_point() else v for k, v in tensors})


def float64_problem():
    """``(model, splits, spec)``: :func:`tiny_model` and :func:`tiny_splits` (defaults) in float64."""
    splits, spec = tiny_splits()
    return tiny_model().to(torch.float64), {name: _doubled(ds) for name, ds in splits.items()}, spec
