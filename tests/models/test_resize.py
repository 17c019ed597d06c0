"""Bilinear resizing: ``F.interpolate`` itself off CUDA, the same values through matrices (whose
backward is deterministic) on CUDA in deterministic mode (``gpu``)."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F

from mmbalance.models.resize import BilinearResize, interpolation_matrix, resize_bilinear, resize_by_matrices

F64 = torch.float64
CPU = torch.device("cpu")


def test_interpolation_matrix_by_hand():
    # 2 -> 3 samples, align_corners=True: the ends are kept, the middle is their mean
    a = interpolation_matrix(2, 3, align_corners=True, device=CPU, dtype=F64)
    assert torch.equal(a, torch.tensor([[1.0, 0.0], [0.5, 0.5], [0.0, 1.0]], dtype=F64))
    # align_corners=False: output pixel centres at (i + 0.5) * 2/3 - 0.5 = -1/6, 1/2, 7/6, clamped
    # at the borders: [1, 0], [1/2, 1/2], [0, 1]
    a = interpolation_matrix(2, 3, align_corners=False, device=CPU, dtype=F64)
    assert torch.allclose(a, torch.tensor([[1.0, 0.0], [0.5, 0.5], [0.0, 1.0]], dtype=F64))


@pytest.mark.parametrize("align_corners", [True, False])
@pytest.mark.parametrize("size", [(9, 7), (3, 2), (6, 5)])  # up, down, mixed
def test_matrices_equal_interpolate_values_and_gradients(align_corners, size):
    x = torch.randn(2, 3, 6, 4, dtype=F64, generator=torch.Generator().manual_seed(0), requires_grad=True)
    weight = torch.randn(2, 3, *size, dtype=F64, generator=torch.Generator().manual_seed(1))
    expected = F.interpolate(x, size=size, mode="bilinear", align_corners=align_corners)
    (grad_expected,) = torch.autograd.grad((expected * weight).sum(), x)
    got = resize_by_matrices(x, size, align_corners=align_corners)
    (grad_got,) = torch.autograd.grad((got * weight).sum(), x)
    assert torch.allclose(got, expected, atol=1e-12)
    assert torch.allclose(grad_got, grad_expected, atol=1e-12)


def test_half_precision_is_resized_in_float32_and_cast_back():
    x = torch.randn(1, 2, 5, 4, generator=torch.Generator().manual_seed(2)).to(torch.bfloat16)
    got = resize_by_matrices(x, (9, 7), align_corners=False)
    expected = F.interpolate(x.float(), size=(9, 7), mode="bilinear", align_corners=False).to(torch.bfloat16)
    # within one bf16 rounding of the float32 result (weights rounded to bf16 miss it by several)
    assert got.dtype == torch.bfloat16 and torch.allclose(got.float(), expected.float(), rtol=2**-8, atol=0)


def test_off_cuda_it_is_interpolate_bit_for_bit():
    x = torch.randn(2, 3, 5, 5, requires_grad=True)
    expected = F.interpolate(x, size=(10, 10), mode="bilinear", align_corners=False)
    assert torch.equal(resize_bilinear(x, (10, 10), align_corners=False), expected)
    module = BilinearResize((10, 10), align_corners=True)
    upsample = torch.nn.Upsample(size=(10, 10), mode="bilinear", align_corners=True)
    assert torch.equal(module(x), upsample(x))
    assert "size=(10, 10), align_corners=True" in repr(module)
    with pytest.raises(ValueError, match=r"\(B, C, h, w\) tensor, got shape \(3, 5, 5\)"):
        resize_bilinear(x[0], (10, 10), align_corners=False)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_backward_is_deterministic_in_deterministic_mode():
    """Twice the same backward gives the same bits, and PyTorch raises no nondeterminism warning;
    the values equal ``F.interpolate``'s up to float rounding."""
    device = torch.device("cuda")
    x = torch.randn(8, 16, 40, 40, device=device, requires_grad=True)
    weight = torch.randn(8, 16, 160, 160, device=device)
    was = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        grads = []
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # a nondeterministic kernel would warn
            for _ in range(2):
                out = resize_bilinear(x, (160, 160), align_corners=True)
                (grad,) = torch.autograd.grad((out * weight).sum(), x)
                grads.append(grad)
    finally:
        torch.use_deterministic_algorithms(was)
    assert torch.equal(grads[0], grads[1])
    expected = F.interpolate(x, size=(160, 160), mode="bilinear", align_corners=True)
    assert torch.allclose(out, expected, atol=1e-5)
