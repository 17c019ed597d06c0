"""CGGM's formulas as pure functions (Guo et al., NeurIPS 2024, Eq. 7, 12; official ``zrguo/CGGM``).

* :func:`batch_metric`: a head's ε on one batch (the official ``cal_coeff`` metric);
* :func:`magnitude_coefficients`: Eq. 7 without ρ, the official ``coeff`` (``src/msatrain.py``);
* :func:`direction_loss`: Eq. 12, ``L_gm``;
* :func:`sequential_sum`: the official code's order of summation (Python ``sum``, ``np.sum`` of a
  few terms), which matters where Σ Δε cancels: ``Σ Δε + 1e-8`` is then ~1e-8;
* :func:`output_gradient`, :func:`last_layer_gradient`, :func:`head_gradients`,
  :func:`fusion_gradient`: the paper-mode closed-form gradients of the output layers' weights
  (``∂L/∂W = Σ_b (∂ℓ/∂z_b) h_bᵀ``), without ``torch.autograd.grad``;
* :func:`interpolation_matrix` (:mod:`mmbalance.models.resize`), :func:`head_input_upsampling`: the
  bilinear upsampling between a 1x1 ``out_layer`` and segmentation logits, transposed exactly.

Each is hand-checked in ``tests/methods/test_cggm.py``; all run on the device without a host sync
(except :func:`head_input_upsampling`, a one-off check).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mmbalance.errors import ShapeError, UnsupportedError
from mmbalance.models.resize import interpolation_matrix
from mmbalance.tasks import ClassificationTask, RegressionTask, SegmentationTask, Task

__all__ = [
    "SUM_EPS",
    "batch_metric",
    "sequential_sum",
    "magnitude_coefficients",
    "direction_loss",
    "interpolation_matrix",
    "upcast",
    "output_gradient",
    "last_layer_gradient",
    "fusion_gradient",
    "head_gradients",
    "gradient_cosines",
    "head_input_upsampling",
]

SUM_EPS = 1e-8  # the official `diff_sum = sum(diff) + 1e-8`


def batch_metric(task: Task, logits: Tensor, target: Tensor, eps_metric: str, exact: bool) -> Tensor:
    """ε of one head on this batch: ``task.score`` (``exact=True`` where the task accepts it: exact k /
    batch in float64) or, for ``eps_metric="neg_mae"``, the negative mean absolute error in float64."""
    if eps_metric == "neg_mae":
        batch = logits.shape[0]
        return -(logits.double().reshape(batch) - target.reshape(batch).double()).abs().mean()
    return task.score(logits, target, **({"exact": True} if exact else {}))


def sequential_sum(x: Tensor) -> Tensor:
    """``x[0] + x[1] + …`` left to right for a 1-D tensor: Python's ``sum(diff)`` and numpy's
    ``np.sum`` of fewer than 8 terms, the official code's order (M tiny kernels, no host sync)."""
    total = x[0]
    for i in range(1, x.shape[0]):
        total = total + x[i]
    return total


def magnitude_coefficients(
    delta: Tensor, *, stabilize: bool = False, resolution: float = 0.0
) -> tuple[Tensor, Tensor]:
    """Eq. 7 without ρ: ``c_i = (S − Δε_i) / S``, ``S = Σ_k Δε_k + 1e-8`` (official ``coeff``).

    The official code computes this in Python floats; pass a float64 ``delta`` for its values (the
    sum is taken in its order, :func:`sequential_sum`). float32 leaves ``Σ Δε`` ~3e-8 off zero for a
    batch of 12, a coefficient off by the same factor where the official ``S`` is ~1e-8.

    Args:
        delta: ``(M,)`` metric improvements Δε.
        stabilize: the guard of ``CGGMConfig.stabilize``: where ``Σ Δε < resolution`` (no reliable
            improvement signal) every ``c_i`` is the neutral ``(M−1)/M`` (the value for equal
            improvements); otherwise negative ``c_i`` are clamped to 0 and ``c`` is rescaled to
            ``Σ c = M−1``, the official identity. So ``0 <= c_i <= M−1`` always.
        resolution: threshold of the guard (CGGM uses one sample's worth of accuracy, 1/batch).

    Returns:
        ``(c, raw)``: the coefficients used and the official raw ones (for diagnostics). Device
        tensors, no host sync.
    """
    if delta.dim() != 1 or delta.numel() < 2:
        raise ShapeError(f"delta must have shape (M,) with M >= 2, got {tuple(delta.shape)}")
    improvement = sequential_sum(delta)
    total = improvement + SUM_EPS
    raw = (total - delta) / total
    if not stabilize:
        return raw, raw
    m = delta.numel()
    clamped = raw.clamp(min=0)
    rescaled = clamped * ((m - 1) / clamped.sum().clamp(min=SUM_EPS))
    neutral = torch.full_like(raw, (m - 1) / m)
    return torch.where(improvement < resolution, neutral, rescaled), raw


def direction_loss(coefficients: Tensor, cosines: Tensor) -> Tensor:
    """Eq. 12: ``L_gm = (1/M) Σ_i (|c_i| − c_i cos_i)`` (>= 0 for |cos| <= 1).

    In the official order and precision, ``(np.sum(np.abs(coeff)) − (c_0 cos_0 + c_1 cos_1 + …)) / M``:
    ``Σ|c|`` summed in the coefficients' dtype (float64, the official Python floats), everything
    else in the cosines' dtype (the parameters'; the official float coefficients times a tensor are
    rounded to it). Differentiable in ``cosines``.
    """
    if coefficients.shape != cosines.shape or coefficients.dim() != 1:
        raise ShapeError(
            f"coefficients {tuple(coefficients.shape)} and cosines {tuple(cosines.shape)} must both be (M,)"
        )
    products = coefficients.to(cosines.dtype) * cosines
    magnitude = sequential_sum(coefficients.abs()).to(cosines.dtype)
    return (magnitude - sequential_sum(products)) / coefficients.numel()


def upcast(x: Tensor) -> Tensor:
    """Half-precision (AMP) tensors to float32; float32/float64 unchanged."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def output_gradient(task: Task, prediction: Tensor, target: Tensor) -> Tensor:
    """``∂ task.loss(prediction, target) / ∂ prediction`` in closed form, differentiable in graph.

    Mean reduction (the training loss). cls: ``(softmax(z) − q) / B`` with ``q`` the (label-smoothed)
    one-hot target; reg: ``sign(z − y) / B`` (L1) or ``2 (z − y) / B`` (MSE); seg: the full
    ``SegLoss`` (class-weighted CE normalised by the target pixels' weights, plus the batch soft
    Dice over the foreground classes). Same shape as ``prediction``.

    Raises:
        UnsupportedError: a task type with no closed form here.
    """
    if isinstance(task, ClassificationTask):
        batch, classes = prediction.shape
        probs = torch.softmax(upcast(prediction), dim=1)
        q = F.one_hot(target.reshape(batch).long(), classes).to(probs.dtype)
        if task.label_smoothing:
            q = q * (1 - task.label_smoothing) + task.label_smoothing / classes
        return (probs - q) / batch
    if isinstance(task, RegressionTask):
        batch = prediction.shape[0]
        pred = upcast(prediction)
        diff = pred.reshape(batch) - target.reshape(batch).to(pred.dtype)
        g = torch.sign(diff) if task.loss_name == "l1" else 2 * diff
        return (g / batch).reshape(prediction.shape)
    if isinstance(task, SegmentationTask):
        return _seg_output_gradient(task, upcast(prediction), target.long())
    raise UnsupportedError(
        f"direction='paper' needs the closed-form gradient of the task loss; task {type(task).__name__!r} "
        "has none (supported: ClassificationTask, RegressionTask, SegmentationTask)"
    )


def _seg_output_gradient(task: SegmentationTask, logits: Tensor, target: Tensor) -> Tensor:
    classes = logits.shape[1]
    probs = torch.softmax(logits, dim=1)
    onehot = F.one_hot(target, classes).movedim(-1, 1).to(probs.dtype)  # (B, C, H, W)
    grad = torch.zeros_like(probs)
    if task.ce_weight:
        if task.class_weights is None:
            w_pix = torch.ones_like(target, dtype=probs.dtype)
        else:
            w_pix = torch.tensor(task.class_weights, device=logits.device, dtype=probs.dtype)[target]
        grad = grad + task.ce_weight * w_pix.unsqueeze(1) * (probs - onehot) / w_pix.sum()
    if task.dice_weight:
        fg_p, fg_t = probs[:, 1:], onehot[:, 1:]
        inter = (fg_p * fg_t).sum()
        denom = fg_p.sum() + fg_t.sum() + task.dice_smooth
        d_prob = torch.zeros_like(probs)
        d_prob[:, 1:] = -2 * task.dice_weight * (fg_t / denom - inter / denom**2)
        grad = grad + probs * (d_prob - (probs * d_prob).sum(dim=1, keepdim=True))  # softmax Jacobian
    return grad


def last_layer_gradient(output_grad: Tensor, hidden: Tensor, *, align_corners: bool | None = None) -> Tensor:
    """``∂L/∂W`` of the output layer ``z = W h + b``: ``Σ_b g_b h_bᵀ`` (the 1/B is inside ``g``).

    Args:
        output_grad: ``(B, C)`` (cls/reg; ``(B,)`` for reg is accepted) or ``(B, C, H, W)`` (seg).
        hidden: the output layer's input, ``(B, d)`` or ``(B, d, h, w)``. For maps the logits may be
            bilinearly upsampled from ``(h, w)`` to ``(H, W)`` after the 1x1 layer; the upsampling's
            transpose is applied to ``output_grad`` (``align_corners`` as the model's upsampling).

    Returns:
        ``(C, d)``, the flattened shape of the output layer's weight.
    """
    if hidden.dim() == 2:
        g = output_grad.reshape(output_grad.shape[0], -1)
        return g.transpose(0, 1) @ hidden.to(g.dtype)
    if hidden.dim() != 4 or output_grad.dim() != 4:
        raise ShapeError(
            f"map gradients need output_grad (B, C, H, W) and hidden (B, d, h, w), got "
            f"{tuple(output_grad.shape)} and {tuple(hidden.shape)}"
        )
    big, small = output_grad.shape[-2:], hidden.shape[-2:]
    g = output_grad
    if tuple(big) != tuple(small):
        if align_corners is None:
            raise ShapeError(
                f"logits {tuple(big)} differ from the hidden map {tuple(small)}: pass align_corners"
            )
        a_h = interpolation_matrix(
            small[0], big[0], align_corners=align_corners, device=g.device, dtype=g.dtype
        )
        a_w = interpolation_matrix(
            small[1], big[1], align_corners=align_corners, device=g.device, dtype=g.dtype
        )
        g = torch.einsum("bcHW,Hh,Ww->bchw", g, a_h, a_w)
    return torch.einsum("bchw,bdhw->cd", g, hidden.to(g.dtype))


def fusion_gradient(
    task: Task, prediction: Tensor, head_input: Tensor, target: Tensor, align_corners: bool | None
) -> Tensor:
    """Flattened ``∂L_task/∂W_F`` of the fusion ``out_layer`` in closed form; differentiable when
    grad mode is on (paper mode's L_gm reaches W_F, its bias, the fusion and the encoders)."""
    return last_layer_gradient(
        output_gradient(task, prediction, target), upcast(head_input), align_corners=align_corners
    ).flatten()


@torch.no_grad()
def head_gradients(task: Task, logits: list[Tensor], hidden: list[Tensor], target: Tensor) -> Tensor:
    """``(M, K)`` flattened closed-form ``∂L_i/∂W_i`` of the heads' output layers (constants: L_gm
    never moves the heads, as in the official code). For cls/reg the M heads are done in one batch:
    the concatenated batch rescales every gradient by 1/M, which no cosine sees."""
    if isinstance(task, SegmentationTask):
        return torch.stack(
            [
                last_layer_gradient(output_gradient(task, z, target), upcast(h), align_corners=True).flatten()
                for z, h in zip(logits, hidden, strict=True)
            ]
        )
    m, batch = len(logits), logits[0].shape[0]
    g = output_gradient(task, torch.cat(logits), target.reshape(batch).repeat(m))
    h = upcast(torch.stack(hidden))  # (M, B, d)
    return torch.bmm(g.reshape(m, batch, -1).transpose(1, 2).to(h.dtype), h).flatten(1)


def gradient_cosines(
    task: Task, output_prediction: Tensor, head_input: Tensor, target: Tensor,
    logits: list[Tensor], hidden: list[Tensor], align_corners: bool | None,
) -> Tensor:
    """``(M,)`` Eq. 12's sim: ``cos(∂L_i/∂W_i, ∂L/∂W_F)`` of the heads' and the fusion head's
    output-layer weights, in closed form; differentiable in the fusion gradient when grad mode is on."""
    g_fusion = fusion_gradient(task, output_prediction, head_input, target, align_corners)
    return F.cosine_similarity(head_gradients(task, logits, hidden, target), g_fusion.unsqueeze(0), dim=1)


@torch.no_grad()
def head_input_upsampling(
    out_layer: nn.Module, head_input: Tensor, prediction: Tensor
) -> tuple[bool, bool | None]:
    """Whether ``prediction == [upsample](out_layer(head_input))`` (the closed form's premise), and
    the bilinear upsampling's ``align_corners`` (None when there is none). One host sync: call once."""
    pred = prediction.float()
    z = out_layer(head_input).float()
    if z.dim() == 2 and z.numel() == pred.numel():
        z = z.reshape(pred.shape)  # regression (B, 1) vs (B,)
    if z.shape == pred.shape:
        if torch.allclose(z, pred, rtol=1e-3, atol=1e-4):
            return True, None
    elif z.dim() == 4 and pred.dim() == 4 and z.shape[:2] == pred.shape[:2]:
        for ac in (True, False):
            up = F.interpolate(z, size=pred.shape[-2:], mode="bilinear", align_corners=ac)
            if torch.allclose(up, pred, rtol=1e-3, atol=1e-4):
                return True, ac
    return False, None
