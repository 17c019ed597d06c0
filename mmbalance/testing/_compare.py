"""Exact comparison of nested training states, and their serialisation, for the contract checks."""

from __future__ import annotations

import io
import math
from collections.abc import Mapping
from typing import Any

import torch

__all__ = ["differences", "serialised", "deserialised"]


def differences(a: Any, b: Any, path: str) -> list[str]:
    """Paths where two nested states (mappings, sequences, tensors, plain values) differ.

    Exact: tensors must have the same shape, dtype and values (NaN equals NaN); plain values the
    same type and value. A list entry names the path and, where short, the two sides.
    """
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)):
            return [f"{path}: {type(a).__name__} vs {type(b).__name__}"]
        if a.shape != b.shape or a.dtype != b.dtype:
            return [f"{path}: {a.dtype}{tuple(a.shape)} vs {b.dtype}{tuple(b.shape)}"]
        same = torch.equal(a, b) or (a.is_floating_point() and torch.equal(a.isnan(), b.isnan())
                                     and torch.equal(a.nan_to_num(), b.nan_to_num()))
        return [] if same else [path]
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        if set(a) != set(b):
            return [f"{path}: keys {sorted(map(str, set(a) ^ set(b)))[:5]} in one only"]
        return [d for k in a for d in differences(a[k], b[k], f"{path}.{k}")]
    if isinstance(a, list | tuple) and isinstance(b, list | tuple):
        if len(a) != len(b):
            return [f"{path}: {len(a)} vs {len(b)} items"]
        pairs = enumerate(zip(a, b, strict=True))
        return [d for i, (x, y) in pairs for d in differences(x, y, f"{path}[{i}]")]
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return []
    return [] if type(a) is type(b) and a == b else [f"{path}: {a!r} vs {b!r}"]


def serialised(obj: Any) -> bytes:
    """``torch.save`` of ``obj`` into bytes."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def deserialised(blob: bytes, *, weights_only: bool = True, map_location: Any = None) -> Any:
    """``torch.load`` of :func:`serialised` bytes."""
    return torch.load(io.BytesIO(blob), weights_only=weights_only, map_location=map_location)
