"""``ogm_ge``: On-the-fly Gradient Modulation with Generalization Enhancement (Peng et al., CVPR 2022).

Each step, per-modality confidence scores ``s_u = Σ_i p(y_i | x_i^u)`` give discrepancy ratios
``ρ_u = mean_{v≠u} s_u / s_v``; the encoder gradient of every modality with ``ρ_u > 1`` is scaled by
``k_u = 1 − tanh(α ρ_u)`` (Eq. 10), and GE adds Gaussian noise ``N(0, std(g)²)`` to every modulated
encoder gradient, within the epochs ``[modulation_starts, modulation_ends]``.

Port of ``GeWu-Lab/OGM-GE_CVPR2022:main.py`` (``train_epoch``). Deviations (details in
``methods/ogm_ge.md``): unimodal predictions come from our own linear heads on detached encoder
features instead of slices of a concat fusion head; by default every encoder parameter is modulated
(``params="conv"`` restores the official 4-D-weights-only rule); more than two modalities use the
authors' pairwise-average ratio (OGM-GE#16); regression/segmentation use ``s_u = Σ_i exp(−ℓ_i)``;
scores, ratios, coefficients and the noise scale are computed in float64.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mmbalance.balancer import OptimizerFactory, StepContext
from mmbalance.config import need
from mmbalance.errors import ConfigError
from mmbalance.methods import register_method
from mmbalance.methods._config import HeadConfig, ModulationWindow
from mmbalance.methods._grads import present_grads
from mmbalance.methods._headed import HeadedBalancer
from mmbalance.methods._heads import head_term
from mmbalance.models.base import ModelOutput, MultimodalModel

__all__ = [
    "OGMGE",
    "OGMGEConfig",
    "ogm_coefficients",
    "confidence_score",
    "pairwise_ratios",
    "gaussian_enhance_",
]

SCORES = ("confidence", "task")
PARAM_RULES = ("all", "conv")


@dataclass(frozen=True)
class OGMGEConfig(HeadConfig, ModulationWindow):
    alpha: float = 0.1  # α, Eq. 10: k_u = 1 − tanh(α ρ_u) (README default; 0.8 for CREMA-D)
    ge: bool = True  # GE: add N(0, std(g)²) to modulated gradients (--modulation OGM_GE; False = OGM)
    modulation_starts: int = 0  # first epoch with modulation (0-based, inclusive; main.py default 0)
    modulation_ends: int = 50  # last epoch with modulation (inclusive; main.py default 50)
    params: str = "all"  # "all" encoder parameters, or "conv": only 4-D weights (official rule)
    # s_u: "confidence" Σ p(y|x^u) (cls; Σ exp(−ℓ) for reg/seg) or "task" (task.score)
    score: str = "confidence"
    head_lr: float | None = None  # LR of the unimodal heads (None = the run's LR)
    head_hidden: int | None = None  # None: linear heads, like the official split of a linear fusion head
    sequence_pool: str = "mean"  # pooling of (B, L, d) features for the heads

    def check(self) -> None:
        need(self, self.alpha >= 0, "alpha", ">= 0")
        need(self, self.params in PARAM_RULES, "params", f"one of {PARAM_RULES}")
        need(self, self.score in SCORES, "score", f"one of {SCORES}")


# -- the arithmetic, as pure functions (hand-checked in tests/methods/test_ogm_ge.py) ---------------
def confidence_score(prediction: Tensor, target: Tensor, task: Any) -> Tensor:
    """Σ over the batch of the probability of the target: ``Σ_i softmax(out)_i[y_i]`` for cls (the
    official score), ``Σ_i exp(−ℓ_i)`` with the per-sample task loss otherwise (equal to the former
    for unsmoothed cross-entropy). A float64 0-d tensor (``main.py`` sums the probabilities in the
    parameter dtype: a float64 model gives the official value exactly), no host sync."""
    if task.name == "cls":
        p = F.softmax(prediction.double(), dim=1).gather(1, target.long().reshape(-1, 1))
        return p.sum()
    return torch.exp(-task.loss(prediction, target, reduction="none").double()).sum()


def pairwise_ratios(scores: Tensor, eps: float = 1e-12) -> Tensor:
    """``ρ_u = mean_{v≠u} s_u / s_v`` for ``scores`` of shape ``(M,)``; for M = 2 this is the
    official ``ρ_v = s_v / s_a``, ``ρ_a = 1 / ρ_v``. Scores are clamped at ``eps`` (no 0/0)."""
    s = scores.clamp_min(eps)
    m = s.shape[0]
    if m < 2:
        raise ConfigError(f"OGM ratios need at least 2 modalities, got {m}")
    ratio = s[:, None] / s[None, :]  # [u, v] = s_u / s_v
    return (ratio.sum(dim=1) - 1.0) / (m - 1)  # drop the diagonal (s_u / s_u = 1)


def ogm_coefficients(ratios: Tensor, alpha: float) -> Tensor:
    """Eq. 10: ``k_u = 1 − tanh(α ρ_u)`` where ``ρ_u > 1``, else 1."""
    return torch.where(ratios > 1, 1 - torch.tanh(alpha * ratios), torch.ones_like(ratios))


def gaussian_enhance_(
    grads: list[Tensor], coefficients: Tensor, noise: bool = True, lengths: Tensor | None = None
) -> None:
    """In place: ``g ← k·g + N(0, std(g)²)`` for every tensor (std of the unscaled gradient,
    unbiased, + 1e-8 as ``main.py``; a one-element tensor has std 0). ``noise=False``: ``g ← k·g``.

    The per-tensor mean, std and ``std + 1e-8`` are computed in float64 (``main.py``:
    ``grad.std().item() + 1e-8``, a Python double); ``k·g`` and the noise are in the gradients' dtype
    (float32 for half-precision gradients), one ``randn_like`` over the concatenated gradients.

    ``coefficients`` is 0-d (one k for every tensor) or ``(len(grads),)`` (one k per tensor), so
    all modalities are enhanced in one go. Per-tensor statistics come from one concatenation and
    segmented reductions: a fixed number of kernels however many parameters there are.
    ``lengths`` (the tensors' sizes, int64 on their device) may be passed to avoid a
    host-to-device copy per call.
    """
    if not grads:
        return
    per_tensor = coefficients.reshape(-1).expand(len(grads)) if coefficients.dim() == 0 else coefficients
    if per_tensor.shape != (len(grads),):
        raise ConfigError(
            f"coefficients must be 0-d or have shape ({len(grads)},), got {tuple(coefficients.shape)}"
        )
    if not noise:
        torch._foreach_mul_(grads, list(per_tensor.to(grads[0].dtype).unbind()))
        return
    sizes = [g.numel() for g in grads]
    flat = torch.cat([g.reshape(-1) for g in grads])
    flat = flat.to(torch.promote_types(flat.dtype, torch.float32))
    n = flat.numel()
    if lengths is None:
        lengths = torch.tensor(sizes, device=flat.device)
    wide = flat.double()
    counts = lengths.double()
    mean = torch.segment_reduce(wide, "sum", lengths=lengths) / counts
    centred = wide - mean.repeat_interleave(lengths, output_size=n)
    var = torch.segment_reduce(centred * centred, "sum", lengths=lengths) / (counts - 1).clamp_min(1)
    std = (var.sqrt() + 1e-8).to(flat.dtype)
    scaled = flat * per_tensor.to(flat.dtype).repeat_interleave(lengths, output_size=n)
    enhanced = torch.addcmul(scaled, torch.randn_like(flat), std.repeat_interleave(lengths, output_size=n))
    torch._foreach_copy_(grads, [c.view(g.shape) for c, g in zip(enhanced.split(sizes), grads, strict=True)])


@register_method("ogm_ge")
class OGMGE(HeadedBalancer):
    """OGM-GE: slow the dominant modality's encoder by its confidence ratio, plus gradient noise."""

    Config = OGMGEConfig
    presets = {
        "cremad": {"alpha": 0.8},  # README "Tips"
        "vggsound": {"alpha": 0.1},  # README "Tips" and default modulation setting
    }
    paper = "Peng et al., CVPR 2022 (GeWu-Lab/OGM-GE_CVPR2022)"
    grad_edit_scope = frozenset({"encoders"})

    def setup(self, model: MultimodalModel, task: Any, optimizer_factory: OptimizerFactory) -> None:
        super().setup(model, task, optimizer_factory)
        cfg: OGMGEConfig = self.config
        groups: dict[str, list[nn.Parameter]] = {}
        for m in self.modalities:
            params = model.modality_parameters(m)
            if cfg.params == "conv":
                params = [p for p in params if p.dim() == 4]
                if not params:
                    raise ConfigError(
                        f"ogm_ge params='conv' modulates only 4-D conv weights, but modality {m!r}'s "
                        "encoder has none; use params='all'"
                    )
            groups[m] = params
        self._groups = groups
        self._lengths: dict[tuple[Any, ...], tuple[Tensor, Tensor]] = {}
        self._scores: Tensor | None = None

    # -- training step ----------------------------------------------------------------------------
    def loss_terms(self, output: ModelOutput, batch: Mapping[str, Tensor], task: Any) -> dict[str, Tensor]:
        target = batch["target"]
        unimodal = self.unimodal_predictions(output, batch)
        terms = {"task": task.loss(output.prediction, target)}
        scores = []
        for m in self.modalities:
            # one per-sample loss serves the head's training term and the reg/seg confidence
            per_sample = task.loss(unimodal[m], target, reduction="none")
            terms[head_term(m)] = per_sample.mean()
            with torch.no_grad():  # scores in float64 (see confidence_score)
                if self.config.score == "task":
                    scores.append(task.score(unimodal[m].detach(), target).double())
                elif task.name == "cls":
                    scores.append(confidence_score(unimodal[m].detach(), target, task))
                else:
                    scores.append(torch.exp(-per_sample.detach().double()).sum())
        self._scores = torch.stack(scores)
        return terms

    def coefficients(self, ratios: Tensor) -> Tensor:
        """``k_u`` from the ratios ``ρ_u`` (Eq. 10); a variant of the method overrides only this."""
        return ogm_coefficients(ratios, self.config.alpha)

    def on_after_backward(self, ctx: StepContext) -> None:
        cfg: OGMGEConfig = self.config
        if self._scores is None:
            raise ConfigError("ogm_ge: on_after_backward ran before loss_terms computed the unimodal scores")
        ratios = pairwise_ratios(self._scores)
        coeffs = self.coefficients(ratios)
        self.epoch_means.update(coeff=coeffs, ratio=ratios, score=self._scores)
        if not cfg.modulates(ctx.epoch):
            return
        grads: list[Tensor] = []
        counts: list[int] = []
        for m in self.modalities:
            present = present_grads(self._groups[m])
            grads += present
            counts.append(len(present))
        if not grads:
            return
        key = (grads[0].device, tuple(g.numel() for g in grads), tuple(counts))
        if key not in self._lengths:  # sizes and modality index of the present gradients, on their device
            index = torch.repeat_interleave(torch.arange(len(counts)), torch.tensor(counts))
            self._lengths[key] = (torch.tensor(key[1], device=key[0]), index.to(key[0]))
        lengths, index = self._lengths[key]
        gaussian_enhance_(grads, coeffs[index], noise=cfg.ge, lengths=lengths)

    def diagnostics(self) -> dict[str, float]:
        """Epoch means of k_u (``coeff/<m>``), ρ_u (``ratio/<m>``) and s_u (``score/<m>``, batch sum)."""
        return self.epoch_means.pop()
