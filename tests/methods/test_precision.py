"""The statistics dtype of the methods (mmbalance/methods/_precision.py)."""

from __future__ import annotations

import torch

from mmbalance.methods._precision import upcast


def test_upcast_keeps_float32_and_float64_and_lifts_half_precision():
    x32, x64 = torch.ones(2), torch.ones(2, dtype=torch.float64)
    assert upcast(x32) is x32 and upcast(x64) is x64  # no copy, no rounding of a float64 model
    for half in (torch.float16, torch.bfloat16):
        assert upcast(torch.ones(2, dtype=half)).dtype == torch.float32
