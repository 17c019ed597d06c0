"""The dtype in which methods compute their statistics from model outputs.

The official implementations compute losses, confidences and entropies in the dtype of the model
(float32 in practice; float64 when a user checks a method step by step on a float64 model) and keep
scalar bookkeeping in Python floats (float64). mmbalance does the same: :func:`upcast` keeps a
float32 or float64 tensor as it is and lifts AMP half-precision outputs (bf16, fp16) to float32, so
a float64 model is never silently rounded to float32; per-epoch and per-estimate statistics are
accumulated in float64 by the callers.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["upcast"]


def upcast(x: Tensor) -> Tensor:
    """``x`` itself if it is float32 or float64, else ``x.float()`` (AMP half-precision outputs)."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()
