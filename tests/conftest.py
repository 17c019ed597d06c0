"""Shared fixtures: a tiny hand-built two-modality problem for loop and interface tests."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mmbalance.datasets.base import DatasetSpec, TensorDictDataset
from mmbalance.models.base import Head, MultimodalModel

torch.set_num_threads(1)


class ConcatFusion(nn.Module):
    def forward(self, features):
        return torch.cat([features[m] for m in sorted(features)], dim=1)


def tiny_model(dims=(("a", 4), ("b", 3)), hidden=8, classes=3, seed=0) -> MultimodalModel:
    torch.manual_seed(seed)
    encoders = {m: nn.Sequential(nn.Linear(d, hidden), nn.ReLU()) for m, d in dims}
    head = Head(nn.Sequential(nn.Linear(hidden * len(dims), hidden), nn.ReLU()), nn.Linear(hidden, classes))
    return MultimodalModel(encoders, ConcatFusion(), head)


def tiny_splits(n=48, dims=(("a", 4), ("b", 3)), classes=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = {}
    for i, split in enumerate(("train", "val", "test")):
        y = torch.randint(0, classes, (n,), generator=g)
        tensors = {m: torch.randn(n, d, generator=g) + y[:, None].float() * (0.5 + i * 0) for m, d in dims}
        tensors["target"] = y
        out[split] = TensorDictDataset(tensors)
    spec = DatasetSpec(task="cls", modalities={m: (d,) for m, d in dims}, num_outputs=classes)
    return out, spec


@pytest.fixture
def tiny_problem():
    splits, spec = tiny_splits()
    return tiny_model(), splits, spec
