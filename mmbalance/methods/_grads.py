"""Gradient edits and auxiliary optimizer steps shared by the methods.

All edits run in ``on_after_backward`` (after AMP unscaling, before clipping) and stay on the
device: one ``torch._foreach_*`` call per edit, no Python loop of kernels over parameters, no host
read.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import Tensor, nn

__all__ = ["present_grads", "scale_grads_", "step_auxiliary"]


def present_grads(params: Iterable[nn.Parameter]) -> list[Tensor]:
    """The ``.grad`` tensors of ``params`` that exist (a parameter the loss did not reach has none)."""
    return [p.grad for p in params if p.grad is not None]


def scale_grads_(params: Iterable[nn.Parameter], factor: float | Tensor | Sequence[Tensor]) -> None:
    """In place ``p.grad *= factor`` for every parameter that has a gradient.

    ``factor`` is a number, a 0-d tensor on the gradients' device (no host sync), or one 0-d tensor
    per present gradient.
    """
    grads = present_grads(params)
    if not grads:
        return
    if isinstance(factor, Tensor) and factor.dim() == 0:
        factor = factor.to(grads[0].dtype)
    torch._foreach_mul_(grads, factor)


def step_auxiliary(scaler: torch.amp.GradScaler, optimizer: torch.optim.Optimizer) -> None:
    """Step an auxiliary optimizer through the run's GradScaler (unscales, skips inf steps), then
    zero it. Call from ``on_after_optimizer_step``."""
    scaler.step(optimizer)
    optimizer.zero_grad(set_to_none=True)
