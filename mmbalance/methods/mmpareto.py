"""``mmpareto``: MMPareto (Wei & Hu, "MMPareto: Boosting Multimodal Learning with Innocent Unimodal
Assistance", ICML 2024).

Losses: the multimodal task loss ``L_mm`` and one unimodal loss ``L_m`` per modality (own heads on
``features[m]``). For every encoder m the two gradients ``g_mm`` (of ``L_mm``) and ``g_m`` (of ``L_m``)
are captured separately. If ``cos(g_mm, g_m) > 0`` the weights are (1/2, 1/2); otherwise the
two-task MGDA min-norm weights (``MinNormSolver``). The encoder gradient becomes
``ĝ = 2 (α_mm g_mm + α_m g_m)``, rescaled per parameter tensor to ``max(‖g_mm + g_m‖, ‖ĝ‖)`` and
multiplied by γ = 1.5. Fusion, head and unimodal heads keep their plain gradients.

Port of ``GeWu-Lab/MMPareto_ICML2024:code/MMPareto.py`` (``train_epoch``) and
``code/min_norm_solvers.py`` (``_min_norm_element_from2``). Deviations (``methods/mmpareto.md``):
M + 1 backward passes instead of M + 2 (per-loss gradients from ``torch.autograd.grad``, their sum
is the summed gradient), a zero-norm guard where the official code gives NaN, inner products,
weights and norms in float64 (official: the parameter dtype), any number of modalities (each encoder
has its own two-task problem) and any task loss.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from mmbalance.balancer import OptimizerFactory, StepContext
from mmbalance.config import finite, need
from mmbalance.epoch_means import EpochMeans
from mmbalance.errors import ConfigError
from mmbalance.methods import register_method
from mmbalance.methods._config import HeadConfig
from mmbalance.methods._headed import HeadedBalancer
from mmbalance.methods._heads import head_term
from mmbalance.models.base import MultimodalModel
from mmbalance.tasks import Task

__all__ = ["MMPareto", "MMParetoConfig", "min_norm_two", "pareto_weights", "pareto_combine"]


@dataclass(frozen=True)
class MMParetoConfig(HeadConfig):
    gamma: float = 1.5  # γ, final scale of the encoder gradients (MMPareto.py: `gamma=1.5`)
    head_lr: float | None = None  # LR of the unimodal heads (None = the run's LR)
    head_hidden: int | None = None  # None: linear heads, as the official head_audio / head_video
    sequence_pool: str = "mean"  # pooling of (B, L, d) features for the heads

    def check(self) -> None:
        need(self, finite(self.gamma) and self.gamma > 0, "gamma", "a finite number > 0")


# -- the arithmetic, as pure functions (hand-checked in tests/methods/test_mmpareto.py) -------------
def min_norm_two(v1v1: Tensor, v1v2: Tensor, v2v2: Tensor) -> Tensor:
    """Weight ``c`` of ``x1`` in ``min_c ‖c x1 + (1 − c) x2‖²`` from the inner products
    (``MinNormSolver._min_norm_element_from2``): 0.999 if ``<x1,x2> ≥ ‖x1‖²``, 0.001 if
    ``<x1,x2> ≥ ‖x2‖²``, else ``(‖x2‖² − <x1,x2>) / ‖x1 − x2‖²``. Tensors, no host sync."""
    denom = v1v1 + v2v2 - 2 * v1v2
    inner = (v2v2 - v1v2) / torch.where(denom > 0, denom, 1.0)
    return torch.where(v1v2 >= v1v1, 0.999, torch.where(v1v2 >= v2v2, 0.001, inner))


def pareto_weights(g_mm: Tensor, g_m: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``(α_mm, α_m, cos)`` for two flat gradients of one encoder: (1/2, 1/2) if
    ``cos(g_mm, g_m) > 0`` (official ``this_cos > 0``), else the min-norm weights ``(c, 1 − c)``.

    The inner products, the cosine and the weights are float64 (the official weights are NumPy
    doubles): the gradients are widened before the products, transiently."""
    wide_mm, wide_m = g_mm.double(), g_m.double()
    v1v1, v1v2, v2v2 = wide_mm.dot(wide_mm), wide_mm.dot(wide_m), wide_m.dot(wide_m)
    del wide_mm, wide_m
    cos = v1v2 / (v1v1.sqrt() * v2v2.sqrt()).clamp_min(1e-8)  # F.cosine_similarity's eps
    c = torch.where(cos > 0, 0.5, min_norm_two(v1v1, v1v2, v2v2))
    return c, 1 - c, cos


def pareto_combine(
    g_mm: Tensor, g_m: Tensor, sizes: list[int] | Tensor, gamma: float
) -> tuple[Tensor, Tensor, Tensor]:
    """The MMPareto encoder gradient for flat ``g_mm``, ``g_m`` (concatenations of the encoder's
    parameter gradients, tensor lengths ``sizes``: a list, or an int64 tensor on the gradients'
    device to avoid a host-to-device copy). Returns ``(new, α_mm, cos)`` with, per tensor k,
    ``new_k = γ · max(1, ‖g_mm,k + g_m,k‖ / ‖ĝ_k‖) · ĝ_k`` and ``ĝ = 2 α_mm g_mm + 2 α_m g_m``.

    ``ĝ`` and ``new`` are in the gradients' dtype (``MMPareto.py`` multiplies the float32 gradients
    by its double weights); the weights, the per-tensor norms and the factor are float64. Where
    ``‖ĝ_k‖ = 0`` the factor is 1 (the official code divides by zero and writes NaN).
    """
    a_mm, a_m, cos = pareto_weights(g_mm, g_m)
    dtype = g_mm.dtype
    combined = (2 * a_mm).to(dtype) * g_mm + (2 * a_m).to(dtype) * g_m
    lengths = sizes if isinstance(sizes, Tensor) else torch.tensor(sizes, device=g_mm.device)
    summed = (g_mm + g_m).double()  # what .grad holds: the summed-loss gradient
    norm_sum = torch.segment_reduce(summed * summed, "sum", lengths=lengths).sqrt()
    del summed
    wide = combined.double()
    norm_new = torch.segment_reduce(wide * wide, "sum", lengths=lengths).sqrt()
    del wide
    ratio = norm_sum / torch.where(norm_new > 0, norm_new, 1.0)
    factor = (torch.where((norm_new > 0) & (ratio > 1), ratio, 1.0) * gamma).to(dtype)
    new = combined * factor.repeat_interleave(lengths, output_size=combined.numel())
    return new, a_mm, cos


@register_method("mmpareto")
class MMPareto(HeadedBalancer):
    """Per-encoder Pareto combination of the multimodal and unimodal gradients.

    The unimodal heads read the encoder features without detaching them (``heads_detach = False``):
    their losses are MMPareto's unimodal tasks and reach the encoders."""

    Config = MMParetoConfig
    paper = "Wei and Hu, ICML 2024 (GeWu-Lab/MMPareto_ICML2024)"
    grad_edit_scope = frozenset({"encoders"})
    heads_detach = False

    def setup(self, model: MultimodalModel, task: Task, optimizer_factory: OptimizerFactory) -> None:
        super().setup(model, task, optimizer_factory)
        self._encoder_params = {m: model.modality_parameters(m) for m in self.modalities}
        self._shared_params = list(model.shared_parameters())
        self._pending: list[tuple[str, list[nn.Parameter], Tensor, Tensor, list[int]]] = []
        self._lengths: dict[
            tuple[tuple[int, ...], torch.device], Tensor
        ] = {}  # tensor sizes on the device, built once
        self._inv_scale: Tensor | None = None
        self.epoch_means = EpochMeans(self.modalities, finite_only=True)  # fp16 steps the scaler skips

    # -- training step ----------------------------------------------------------------------------
    def backward(self, terms: Mapping[str, Tensor], scaler: torch.amp.GradScaler) -> None:
        """M + 1 backward passes: ``g_m`` of each (scaled) unimodal loss w.r.t. its encoder and head,
        then ``g_mm`` of the (scaled) multimodal loss w.r.t. the whole model. Every parameter's
        ``.grad`` gets the plain sum (what one backward of the summed loss gives); the per-loss
        encoder gradients are kept, flattened, for :meth:`on_after_backward`."""
        names = ["task", *(head_term(m) for m in self.modalities)]
        missing = [n for n in names if n not in terms]
        if missing:
            raise ConfigError(f"mmpareto needs the loss terms {names}; missing {missing}")
        self._pending = []
        unimodal: dict[str, tuple[Tensor | None, ...]] = {}
        for m in self.modalities:
            head_params = list(self.heads.heads[m].parameters())
            grads = torch.autograd.grad(
                scaler.scale(terms[head_term(m)]),
                self._encoder_params[m] + head_params,
                retain_graph=True,
                allow_unused=True,
            )
            n = len(self._encoder_params[m])
            unimodal[m] = grads[:n]
            _accumulate(head_params, grads[n:])
        all_encoder = [p for m in self.modalities for p in self._encoder_params[m]]
        multimodal = torch.autograd.grad(
            scaler.scale(terms["task"]), all_encoder + self._shared_params, allow_unused=True
        )
        _accumulate(self._shared_params, multimodal[len(all_encoder) :])
        offset = 0
        for m in self.modalities:
            params = self._encoder_params[m]
            g_mm, g_m = multimodal[offset : offset + len(params)], unimodal[m]
            offset += len(params)
            reached = [
                (p, a, b) for p, a, b in zip(params, g_mm, g_m, strict=True) if a is not None or b is not None
            ]
            if not reached:
                continue
            used = [p for p, _, _ in reached]
            flat_mm = torch.cat(
                [(a if a is not None else torch.zeros_like(p)).reshape(-1) for p, a, _ in reached]
            )
            flat_m = torch.cat(
                [(b if b is not None else torch.zeros_like(p)).reshape(-1) for p, _, b in reached]
            )
            sizes = [p.numel() for p in used]
            summed = flat_mm + flat_m
            _accumulate(used, [v.view_as(p) for v, p in zip(summed.split(sizes), used, strict=True)])
            self._pending.append((m, used, flat_mm, flat_m, sizes))
        # 1/scale (device tensor, no sync) to bring the kept per-loss gradients to the unscaled units
        # of .grad after the runner's scaler.unscale_.
        self._inv_scale = (
            scaler.scale(torch.ones((), device=terms["task"].device)).reciprocal()
            if scaler.is_enabled()
            else None
        )

    def on_after_backward(self, ctx: StepContext) -> None:
        """Replace each encoder's summed gradient with the MMPareto gradient (after AMP unscaling)."""
        if not self._pending:
            raise ConfigError("mmpareto: on_after_backward ran without the per-loss gradients of backward()")
        rows: dict[str, Tensor] = {}
        for m, params, flat_mm, flat_m, sizes in self._pending:
            key = (tuple(sizes), flat_mm.device)
            if key not in self._lengths:
                self._lengths[key] = torch.tensor(sizes, device=flat_mm.device)
            new, a_mm, cos = pareto_combine(flat_mm, flat_m, self._lengths[key], self.config.gamma)
            if self._inv_scale is not None:
                new = new * self._inv_scale
            grads = [p.grad for p in params]
            torch._foreach_copy_(grads, [v.view_as(g) for v, g in zip(new.split(sizes), grads, strict=True)])
            rows[m] = torch.stack([cos, (cos <= 0).to(cos.dtype), a_mm])  # float64
        self._pending = []
        if rows:  # a modality whose encoder the losses did not reach counts as zeros
            zero = torch.zeros(3, dtype=torch.float64, device=next(iter(rows.values())).device)
            stats = torch.stack([rows.get(m, zero) for m in self.modalities]).detach()  # (M, 3)
            self.epoch_means.update(cos=stats[:, 0], conflict=stats[:, 1], alpha_mm=stats[:, 2])

    def diagnostics(self) -> dict[str, float]:
        """Epoch means per modality: ``cos/<m>`` = cos(g_mm, g_m), ``conflict/<m>`` = share of steps
        with cos ≤ 0 (min-norm weights), ``alpha_mm/<m>`` = weight of the multimodal gradient."""
        return self.epoch_means.pop()


def _accumulate(params: list[Any], grads: tuple[Tensor | None, ...] | list[Tensor]) -> None:
    """``p.grad += g`` (or ``p.grad = g``) for every gradient that is not None."""
    for p, g in zip(params, grads, strict=True):
        if g is None:
            continue
        if p.grad is None:
            p.grad = g
        else:
            p.grad.add_(g)
