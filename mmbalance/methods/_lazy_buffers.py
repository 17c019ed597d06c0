"""Buffers sized at run time, and how a state dict restores them.

Some method state has a size known only once training runs: QMF's per-sample loss history (the
training split's length, at the first epoch), MLA's projector (the shared head's input width, at
the first update). Such a buffer is registered empty in ``setup``; a state dict saved later holds
its real size, which ``nn.Module``'s loader would reject as a shape mismatch. A method calls
:func:`follow_saved_shapes_` from its ``_load_from_state_dict`` first, so the buffer takes the saved
shape and the loader then copies the values into it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["follow_saved_shapes_"]


def follow_saved_shapes_(
    module: nn.Module, state_dict: Mapping[str, Any], prefix: str, names: Iterable[str]
) -> None:
    """Re-create each buffer ``module.<name>`` whose saved entry ``state_dict[prefix + name]`` has a
    different shape: zeros of the saved shape and dtype, on the buffer's device (the values are
    copied by the loader afterwards). Buffers without a saved entry are left alone."""
    for name in names:
        saved = state_dict.get(prefix + name)
        current = getattr(module, name)
        if isinstance(saved, Tensor) and saved.shape != current.shape:
            setattr(module, name, torch.zeros_like(saved, device=current.device))
