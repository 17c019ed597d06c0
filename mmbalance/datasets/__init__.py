"""Datasets: the DATASETS registry, embedded synthetic data and the paper datasets' loaders."""

from __future__ import annotations

import importlib

from mmbalance.datasets.base import (
    DatasetSpec,
    MultimodalDataset,
    TensorDictDataset,
    check_batch,
    check_dataset_class,
)
from mmbalance.registry import Registry

__all__ = [
    "DATASETS",
    "register_dataset",
    "DatasetSpec",
    "MultimodalDataset",
    "TensorDictDataset",
    "check_batch",
]

BUILTIN_DATASETS: tuple[str, ...] = ("synthetic", "food101", "mosi", "iemocap", "brats2021")


def _load_builtin_datasets() -> None:
    for module in BUILTIN_DATASETS:
        importlib.import_module(f"{__name__}.{module}")


DATASETS: Registry[type[MultimodalDataset]] = Registry(
    "dataset", MultimodalDataset, loader=_load_builtin_datasets, validate=check_dataset_class
)
register_dataset = DATASETS.register
