"""Bilinear resizing whose backward is deterministic on CUDA.

``F.interpolate(mode="bilinear")`` has no deterministic CUDA backward (it scatters each output
pixel's gradient into four input pixels with atomic adds); under
``torch.use_deterministic_algorithms(True, warn_only=True)`` PyTorch only warns, so a seeded CUDA run
of any model that upsamples (every segmentation model and map head here) would not repeat itself.
Bilinear interpolation is linear and separable: ``resize(X) = A_H X A_Wᵀ`` per channel, with the
1-D interpolation matrices of :func:`interpolation_matrix`; two matrix products, whose backward is
deterministic. :func:`resize_bilinear` takes that path exactly where it matters (a CUDA tensor that
requires a gradient, with deterministic algorithms on) and calls ``F.interpolate`` everywhere else,
so CPU results and inference are unchanged bit for bit.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["interpolation_matrix", "resize_by_matrices", "resize_bilinear", "BilinearResize"]


def interpolation_matrix(
    size_in: int, size_out: int, *, align_corners: bool, device: torch.device, dtype: torch.dtype
) -> Tensor:
    """``(size_out, size_in)`` matrix A of 1-D linear interpolation: ``interp(x) = A @ x``.

    Bilinear interpolation is separable, so a 2-D resizing is ``A_H X A_Wᵀ`` per channel.
    """
    eye = torch.eye(size_in, device=device, dtype=dtype).unsqueeze(0)  # rows are unit signals
    return F.interpolate(eye, size=size_out, mode="linear", align_corners=align_corners)[0].transpose(0, 1)


def resize_by_matrices(x: Tensor, size: Sequence[int], *, align_corners: bool) -> Tensor:
    """``F.interpolate(x, size, mode="bilinear", align_corners=...)`` of a ``(B, C, h, w)`` tensor as
    ``A_H x A_Wᵀ`` (equal up to float rounding; deterministic backward). Half-precision inputs are
    resized in float32 outside autocast, as ``F.interpolate`` accumulates, and cast back."""
    dtype = x.dtype if x.dtype in (torch.float32, torch.float64) else torch.float32
    options = {"align_corners": align_corners, "device": x.device, "dtype": dtype}
    with torch.autocast(device_type=x.device.type, enabled=False):
        a_h = interpolation_matrix(x.shape[-2], int(size[0]), **options)
        a_w = interpolation_matrix(x.shape[-1], int(size[1]), **options)
        return torch.matmul(torch.matmul(a_h, x.to(dtype)), a_w.transpose(0, 1)).to(x.dtype)


def resize_bilinear(x: Tensor, size: Sequence[int], *, align_corners: bool) -> Tensor:
    """Bilinear resizing of ``x (B, C, h, w)`` to ``size (H, W)``; deterministic on CUDA (module
    docstring)."""
    if x.dim() != 4:
        raise ValueError(f"resize_bilinear expects a (B, C, h, w) tensor, got shape {tuple(x.shape)}")
    if x.is_cuda and x.requires_grad and torch.are_deterministic_algorithms_enabled():
        return resize_by_matrices(x, size, align_corners=align_corners)
    return F.interpolate(x, size=tuple(int(s) for s in size), mode="bilinear", align_corners=align_corners)


class BilinearResize(nn.Module):
    """``nn.Upsample(size, mode="bilinear", align_corners)`` through :func:`resize_bilinear`."""

    def __init__(self, size: Sequence[int], *, align_corners: bool) -> None:
        super().__init__()
        self.size = (int(size[0]), int(size[1]))
        self.align_corners = bool(align_corners)

    def forward(self, x: Tensor) -> Tensor:
        return resize_bilinear(x, self.size, align_corners=self.align_corners)

    def extra_repr(self) -> str:
        return f"size={self.size}, align_corners={self.align_corners}"
