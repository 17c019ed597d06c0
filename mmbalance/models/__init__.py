"""Models: MultimodalModel and the MODELS registry of builders (one file each)."""

from __future__ import annotations

import importlib

from mmbalance.models.base import Head, ModelBuilder, ModelOutput, MultimodalModel
from mmbalance.registry import Registry

__all__ = [
    "MODELS", "register_model", "MultimodalModel", "ModelOutput", "Head", "ModelBuilder", "BUILTIN_MODELS"
]

BUILTIN_MODELS: tuple[str, ...] = ("small", "mult", "vit_bert", "deeplab")


def _load_builtin_models() -> None:
    for module in BUILTIN_MODELS:
        importlib.import_module(f"{__name__}.{module}")


MODELS: Registry[type[ModelBuilder]] = Registry("model", ModelBuilder, loader=_load_builtin_models)
register_model = MODELS.register
