"""Buffers sized at run time follow the saved shape on load (mmbalance/methods/_lazy_buffers.py)."""

from __future__ import annotations

import torch
from torch import nn

from mmbalance.methods._lazy_buffers import follow_saved_shapes_


class _Lazy(nn.Module):
    def __init__(self):
        super().__init__()
        self.register_buffer("history", torch.zeros(2, 0, dtype=torch.float64))
        self.register_buffer("fixed", torch.zeros(3))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        follow_saved_shapes_(self, state_dict, prefix, ("history",))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


def test_an_empty_buffer_takes_the_saved_shape_dtype_and_values_inside_a_parent():
    saved = nn.ModuleDict({"inner": _Lazy()})
    saved["inner"].history = torch.arange(6, dtype=torch.float64).reshape(2, 3)
    saved["inner"].fixed.fill_(1.0)
    fresh = nn.ModuleDict({"inner": _Lazy()})
    fresh.load_state_dict(saved.state_dict())  # prefix "inner."
    assert fresh["inner"].history.dtype == torch.float64
    assert torch.equal(fresh["inner"].history, saved["inner"].history)
    assert torch.equal(fresh["inner"].fixed, torch.ones(3))
    assert "history" in dict(fresh["inner"].named_buffers())  # still a registered buffer


def test_buffers_without_a_saved_entry_are_left_alone():
    module = _Lazy()
    follow_saved_shapes_(module, {}, "", ("history",))
    assert module.history.shape == (2, 0)
