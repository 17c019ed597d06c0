"""``agm``: Adaptive Gradient Modulation (Li, Li, Hu, Lei, Li, Zhou; ICCV 2023).

Each step the model also runs with every non-empty proper subset of the modalities (the others
zeroed, eval mode), and the output is split into Shapley-style mono-modal responses ``m_i`` with
``Σ_i m_i = f(all)``. The loss is taken on ``Σ_i m_i``, and the gradient flowing back through each
response is multiplied by ``k_i = exp(α · min(r̃_i − r_i, c))``, where
``r_i = exp(M/(M−1) · (s̄ − s_i))`` compares modality i's response loss ``s_i`` with the mean, and
``r̃_i`` is the same ratio of the running means of past scores: a modality that currently does
better than its usual share is slowed, one that lags is boosted.

Port of ``lihong2303/AGM_ICCV2023`` (``model/CREMAD_net.py`` and ``model/URFunny_net.py``
``GradMod``, ``run/CREMAD_main.py`` and ``run/URFunny_main.py`` ``train``). Deviations
(``methods/agm.md``): any number of modalities through the general Shapley weights (the official
code hard-codes 2 and 3); the unused all-masked pass is skipped; scores, ratios, coefficients and
running means are float64 device tensors (the official Python doubles, without host syncs); for
three or more modalities ``p_y`` is floored only against an underflow (``URFunny_main.py`` has no
floor); outside the modulation window k = 1 instead of the last stale coefficients; regression and
segmentation use the task loss as the score.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from mmbalance.balancer import Balancer, EpochContext, OptimizerFactory, StepContext
from mmbalance.config import need
from mmbalance.errors import ConfigError
from mmbalance.methods import register_method
from mmbalance.methods._config import ModulationWindow
from mmbalance.methods._grads import present_grads, scale_grads_
from mmbalance.models.base import ModelOutput, MultimodalModel

__all__ = [
    "AGM",
    "AGMConfig",
    "shapley_coefficients",
    "agm_coefficients",
    "response_scores",
    "running_mean_update_",
    "scale_grad",
]

P_FLOOR = 1e-8  # the two-modality scripts replace p_y < 1e-8 by 1e-8 (CREMAD_main.py, AVMNIST_main.py)


@dataclass(frozen=True)
class AGMConfig(ModulationWindow):
    alpha: float = 1.0  # α: k_i = exp(α · min(r̃_i − r_i, c)) (utils/config.py --alpha)
    # c: "auto" = 10 for M = 2 (CREMAD_main.py), 7 for M >= 3 (URFunny_main.py); "none" = no cap
    # (AVMNIST_main.py, AVE_main.py, MOSEI_main.py); or a number > 0
    cap: float | Literal["auto", "none"] = "auto"
    modulation_starts: int = 0  # first modulated epoch (0-based, inclusive)
    # last modulated epoch (inclusive); official --modulation_ends 20 with 1-based epochs
    modulation_ends: int = 19
    # "input": zero the masked modalities' inputs and re-run the model (official);
    # "feature": zero their encoder features
    mask: Literal["input", "feature"] = "input"
    # if max|∂L/∂W_out| > c: clip all model gradients to norm c (official run scripts); None = off
    head_grad_clip: float | None = 1.0

    def check(self) -> None:
        need(self, self.alpha >= 0, "alpha", ">= 0")
        need(self, isinstance(self.cap, str) or self.cap > 0, "cap", "'auto', 'none' or a number > 0")
        need(self, self.head_grad_clip is None or self.head_grad_clip > 0, "head_grad_clip", "None or > 0")


# -- the arithmetic (hand-checked in tests/methods/test_agm.py) -------------------------------------
def shapley_coefficients(num_modalities: int) -> tuple[list[tuple[int, ...]], Tensor]:
    """Subsets and the matrix ``C (M, S)`` with ``m_i = Σ_T C[i, T] f(T)`` over the non-empty subsets T.

    ``m_i = Σ_{S ⊆ N∖{i}} w(|S|) [f(S ∪ {i}) − f(S)] + f(∅)/M`` with the Shapley weights
    ``w(s) = s! (M−s−1)! / M!``; the ``f(∅)`` terms cancel exactly, so the all-masked pass is not
    needed, and ``Σ_i m_i = f(N)``. M = 2 gives ``m_a = ½[f(a,v) − f(v) + f(a)]`` and M = 3 the
    1/3, 1/6 weights of ``URFunny_net.py``. The last subset is the full set N.
    """
    m = num_modalities
    if m < 2:
        raise ConfigError(f"AGM needs at least 2 modalities, got {m}")
    subsets = [t for r in range(1, m + 1) for t in itertools.combinations(range(m), r)]
    weight = [math.factorial(s) * math.factorial(m - s - 1) / math.factorial(m) for s in range(m)]
    coeff = torch.zeros(m, len(subsets), dtype=torch.float64)
    for j, t in enumerate(subsets):
        for i in range(m):
            if i in t:
                coeff[i, j] = weight[len(t) - 1]
            elif len(t) < m:
                coeff[i, j] = -weight[len(t)]
    return subsets, coeff


def response_scores(responses: Tensor, target: Tensor, task: Any, floor: float = P_FLOOR) -> Tensor:
    """``s_i`` = mean task loss of response i, ``(M,)``, detached, in float64 (the official scripts
    take ``score.item()``, a Python double). For cls the cross-entropy ``−log max(p_y, floor)``
    with ``p_y = softmax(m_i)[y]``: ``floor = 1e-8`` as the two-modality scripts; the
    three-modality script (``URFunny_main.py``) has no floor, which :class:`AGM` follows with the
    smallest positive float64 (only an underflowed ``p_y = 0`` changes, to −log 2.2e-308 = 708.4
    instead of inf). For reg/seg the task loss."""
    with torch.no_grad():
        if task.name == "cls":
            y = target.long().reshape(-1, 1)
            scores = [
                -torch.log(F.softmax(r.double(), dim=1).gather(1, y).clamp_min(floor)).mean()
                for r in responses
            ]
        else:
            scores = [task.loss(r, target).double() for r in responses]
        return torch.stack(scores)


def agm_coefficients(
    scores: Tensor, running: Tensor, alpha: float, cap: float | None
) -> tuple[Tensor, Tensor, Tensor]:
    """``(k, r, r̃)``: ``r_i = exp(M/(M−1) (s̄ − s_i))`` from this step's scores, ``r̃_i`` the same
    from the running means of past scores, ``k_i = exp(α · min(r̃_i − r_i, cap))`` (no ``min``
    for ``cap=None``). Computed in the scores' dtype (float64 in :class:`AGM`, as the official
    ``math.exp`` on Python doubles)."""
    m = scores.shape[0]
    factor = m / (m - 1)
    r = torch.exp(factor * (scores.mean() - scores))
    r_ref = torch.exp(factor * (running.mean() - running))
    gap = r_ref - r if cap is None else torch.clamp(r_ref - r, max=cap)
    return torch.exp(alpha * gap), r, r_ref


def running_mean_update_(running: Tensor, count: Tensor, scores: Tensor) -> None:
    """In place: ``count += 1``, ``running ← running · (n − 1) / n + scores / n`` with the new
    count n (the official ``train_score * (iteration - 1) / iteration + score / iteration``)."""
    count += 1
    running.copy_(running * (count - 1) / count + scores / count)


class _ScaleGrad(torch.autograd.Function):
    """Identity forward; backward multiplies the incoming gradient by ``k`` (the official full
    backward hook ``gnew * scale``)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, k: Tensor) -> Tensor:
        ctx.save_for_backward(k)
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        (k,) = ctx.saved_tensors
        return grad * k.to(grad.dtype), None


def scale_grad(x: Tensor, k: Tensor) -> Tensor:
    """``x`` in the forward pass, ``k · ∂L/∂x`` in the backward pass (``k`` a 0-d tensor)."""
    return _ScaleGrad.apply(x, k)


@register_method("agm")
class AGM(Balancer):
    """AGM: Shapley mono-modal responses with adaptively scaled gradients."""

    Config = AGMConfig
    presets = {
        "cremad": {
            "alpha": 1.5,
            "modulation_ends": 1499,
        },  # authors' setting, lihongcs/AGM#3 (continuous modulation)
        "avmnist": {"alpha": 2.5, "cap": "none"},  # README training command; AVMNIST_main.py has no cap
    }
    paper = "Li et al., ICCV 2023 (lihong2303/AGM_ICCV2023)"
    grad_edit_scope = frozenset({"encoders", "fusion", "head"})  # the conditional clip rescales all

    def setup(self, model: MultimodalModel, task: Any, optimizer_factory: OptimizerFactory) -> None:
        super().setup(model, task, optimizer_factory)
        m = len(self.modalities)
        self._subsets, coeff = shapley_coefficients(m)
        self.register_buffer("shapley", coeff, persistent=False)  # float64, cast to the outputs' dtype
        cap = self.config.cap
        if cap == "auto":
            cap = 10.0 if m == 2 else 7.0
        self.cap: float | None = None if cap == "none" else float(cap)
        self.p_floor = P_FLOOR if m == 2 else torch.finfo(torch.float64).tiny  # see response_scores
        # r̃ reference: running mean of past s_i, and the step count (float64, as Python doubles)
        self.register_buffer("running_score", torch.zeros(m, dtype=torch.float64))
        self.register_buffer("num_scores", torch.zeros((), dtype=torch.float64))
        self._epoch = 0
        self._params = [p for p in model.parameters() if p.requires_grad]
        self._out_weight = model.out_layer.weight

    def on_train_epoch_start(self, ctx: EpochContext) -> None:
        self._epoch = ctx.epoch

    # -- the masked passes ------------------------------------------------------------------------
    def _subset_outputs(self, model: MultimodalModel, batch: Mapping[str, Tensor]) -> list[Tensor]:
        """``f(T)`` for every non-empty proper subset T (eval mode, with gradient), in the order of
        ``self._subsets[:-1]``."""
        was_training = model.training
        model.eval()
        outs = []
        if self.config.mask == "input":
            for t in self._subsets[:-1]:
                kept = {self.modalities[i] for i in t}
                masked = {
                    k: (v if k not in self.modalities or k in kept else torch.zeros_like(v))
                    for k, v in batch.items()
                }
                outs.append(model(masked).prediction)
        else:
            features, extras = model.encode(batch)
            for t in self._subsets[:-1]:
                kept = {self.modalities[i] for i in t}
                masked = {m: (f if m in kept else torch.zeros_like(f)) for m, f in features.items()}
                outs.append(model.fuse(masked, extras).prediction)
        model.train(was_training)
        return outs

    def forward_step(self, model: MultimodalModel, batch: Mapping[str, Tensor]) -> ModelOutput:
        """Full pass (train mode) + masked passes; ``prediction = Σ_i scale_grad(m_i, k_i)``."""
        full = model(batch)
        outputs = self._subset_outputs(model, batch) + [full.prediction]
        stacked = torch.stack(outputs)  # (S, B, ...)
        coeff = self.shapley.to(stacked.dtype)
        responses = torch.einsum("ms,s...->m...", coeff, stacked)  # (M, B, ...)
        scores = response_scores(responses.detach(), batch["target"], self.task, self.p_floor)
        k, r, r_ref = agm_coefficients(scores, self.running_score, self.config.alpha, self.cap)
        if not self.config.modulates(self._epoch):
            k = torch.ones_like(k)
        # running mean of the scores, updated after the coefficients (as the official order)
        running_mean_update_(self.running_score, self.num_scores, scores)
        prediction = scale_grad(responses[0], k[0])
        for i in range(1, responses.shape[0]):
            prediction = prediction + scale_grad(responses[i], k[i])
        self.epoch_means.update(coeff=k, ratio=r, ratio_ref=r_ref, score=scores)
        return ModelOutput(prediction, full.features, full.head_input, full.extras)

    def on_after_backward(self, ctx: StepContext) -> None:
        """The official conditional clip: when any element of the fusion head's last-layer
        gradient exceeds ``head_grad_clip`` in magnitude, clip the whole model gradient to that
        norm (``clip_grad_norm_`` arithmetic, decided on the device)."""
        c = self.config.head_grad_clip
        if c is None or self._out_weight.grad is None:
            return
        exceed = self._out_weight.grad.abs().amax() > c
        total = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(present_grads(self._params))))
        scale_grads_(
            self._params, torch.where(exceed, (c / (total + 1e-6)).clamp(max=1.0), torch.ones_like(total))
        )

    def diagnostics(self) -> dict[str, float]:
        """Epoch means of k_i (``coeff/<m>``), r_i (``ratio/<m>``), r̃_i (``ratio_ref/<m>``) and s_i
        (``score/<m>``)."""
        return self.epoch_means.pop()
