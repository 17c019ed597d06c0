"""Entropy-gated late fusion of unimodal logits (MLA's test-time rule), as pure functions.

Port of ``calculate_entropy`` / ``calculate_gating_weights`` in
``Cecile-hi/Multimodal-Learning-with-Alternating-Unimodal-Adaptation:main.py``: a modality whose
prediction is more certain (lower entropy of its softmax) gets a larger weight,
``w_m = exp(max_j H_j − H_m) / Σ_j exp(max_j H_j − H_j)``, and the fused logits are ``Σ_m w_m f_m``.
:func:`entropy_weights` gates each sample (each pixel for maps); :func:`batch_entropy_weights` is the
released code's rule, whose softmax runs over the batch dimension and which gives one weight per
modality for the whole batch. Hand-checked in ``tests/methods/test_mla.py``.
"""

from __future__ import annotations

import functools
import operator
from collections.abc import Mapping

import torch
from torch import Tensor

from mmbalance.errors import ShapeError
from mmbalance.methods._precision import upcast

__all__ = ["entropy_weights", "batch_entropy_weights", "fuse_logits"]


def _entropy(logits: Tensor, dim: int) -> Tensor:
    """Elementwise ``−p log p`` of ``softmax(logits, dim)``, in the logits' dtype (at least float32)."""
    log_p = torch.log_softmax(upcast(logits), dim=dim)
    return -(log_p.exp() * log_p)


def _gates(entropies: Tensor, dim: int | None) -> Tensor:
    """``exp(max H − H_m)`` normalised over the modality dim 0 (``dim=None``: ``entropies`` is ``(M,)``)."""
    top = entropies.max() if dim is None else entropies.max(dim=dim).values
    gates = torch.exp(top - entropies)
    return gates / gates.sum(dim=0)


def entropy_weights(logits: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Per-sample (per-pixel for maps) ``w_m = exp(max_j H_j − H_m) / Σ_j exp(max_j H_j − H_j)``
    with ``H_m = −Σ_k p_k log p_k`` over the class dim 1: low entropy, high weight.
    Shapes ``(B, 1)`` or ``(B, 1, H, W)``."""
    entropies = torch.stack([_entropy(f, 1).sum(dim=1, keepdim=True) for f in logits.values()])
    return dict(zip(logits, _gates(entropies, 0).unbind(0), strict=True))


def batch_entropy_weights(logits: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The released ``calculate_gating_weights``: softmax over the **batch** dim 0, entropy summed
    over the whole tensor, one scalar weight per modality for the whole batch (0-d tensors)."""
    entropies = torch.stack([_entropy(f, 0).sum() for f in logits.values()])
    return dict(zip(logits, _gates(entropies, None).unbind(0), strict=True))


def fuse_logits(logits: Mapping[str, Tensor], weights: Mapping[str, Tensor | float]) -> Tensor:
    """``Σ_m w_m f_m`` (weights broadcast over the class dim), summed in modality order.

    Raises:
        ShapeError: no modality's logits.
    """
    if not logits:
        raise ShapeError("fuse_logits needs at least one modality's logits, got none")
    terms = []
    for m, f in logits.items():
        w = weights[m]
        f = upcast(f)
        terms.append(f * (w.to(f.dtype) if isinstance(w, Tensor) else float(w)))
    return functools.reduce(operator.add, terms)
