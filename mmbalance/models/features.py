"""Encoder features as the heads and blocks built on them see them, and modules initialised from a
private generator.

* :func:`feature_kind` / :func:`pool_features`: a feature ``(B, d)`` is a vector, ``(B, L, d)`` a
  sequence (pooled over L: ``mean``, or the ``first`` / ``last`` token), ``(B, C, h, w)`` a map
  (global average pooling);
* :func:`build_with_generator`: a module built on the meta device and initialised with PyTorch's
  default Linear/Conv2d initialisation drawn from a given ``torch.Generator``, so that heads and
  blocks a method adds (unimodal heads, MMTM) draw nothing from the global RNG and the model's
  training stays bit-identical to ``joint`` where the method does not touch it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from mmbalance.errors import ConfigError, ShapeError

__all__ = ["feature_kind", "pool_features", "build_with_generator", "SEQUENCE_POOLS", "FEATURE_KINDS"]

SEQUENCE_POOLS = ("mean", "first", "last")
FEATURE_KINDS = ("vector", "sequence", "map")


def feature_kind(feature: Tensor, modality: str = "?") -> str:
    """``"vector"`` for ``(B, d)``, ``"sequence"`` for ``(B, L, d)``, ``"map"`` for ``(B, C, h, w)``.

    Raises:
        ShapeError: any other number of dimensions.
    """
    kinds = {2: "vector", 3: "sequence", 4: "map"}
    if not isinstance(feature, Tensor) or feature.dim() not in kinds:
        shape = tuple(feature.shape) if isinstance(feature, Tensor) else type(feature).__name__
        raise ShapeError(
            f"features[{modality!r}] has shape {shape}; expected (B, d), (B, L, d) or (B, C, h, w)"
        )
    return kinds[feature.dim()]


def pool_features(feature: Tensor, sequence_pool: str = "mean") -> Tensor:
    """``(B, d)`` summary of a vector, sequence (pool over L) or map (global average) feature."""
    kind = feature_kind(feature)
    if kind == "vector":
        return feature
    if kind == "sequence":
        if sequence_pool == "mean":
            return feature.mean(dim=1)
        if sequence_pool == "first":
            return feature[:, 0]
        if sequence_pool == "last":
            return feature[:, -1]
        raise ConfigError(f"sequence_pool must be one of {SEQUENCE_POOLS}, got {sequence_pool!r}")
    return feature.mean(dim=(2, 3))


def _reset_with_generator(module: nn.Module, generator: torch.Generator) -> None:
    """PyTorch's default Linear/Conv init (Kaiming-uniform a=sqrt(5), fan-in bias), drawn from
    ``generator`` instead of the global RNG."""
    for layer in module.modules():
        if isinstance(layer, nn.Linear | nn.Conv2d):
            with torch.no_grad():
                nn.init.kaiming_uniform_(layer.weight, a=math.sqrt(5), generator=generator)
                if layer.bias is not None:
                    fan_in = layer.weight[0].numel()
                    bound = 1.0 / math.sqrt(fan_in) if fan_in > 0 else 0.0
                    nn.init.uniform_(layer.bias, -bound, bound, generator=generator)


def build_with_generator(
    factory: Callable[[], nn.Module], generator: torch.Generator, device: Any, dtype: torch.dtype
) -> nn.Module:
    """``factory()`` built on the meta device, then materialised on ``device`` with PyTorch's default
    Linear/Conv2d initialisation drawn from ``generator``: nothing is drawn from the global RNG, and
    the initial weights do not depend on the device."""
    with torch.device("meta"):
        module = factory()
    module = module.to_empty(device="cpu").to(dtype=dtype)
    _reset_with_generator(module, generator)
    return module.to(device=device)
