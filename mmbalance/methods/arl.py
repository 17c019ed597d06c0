"""``arl``: Asymmetric Representation Learning (Wei, Luo, Luo; "Improving Multimodal Learning via
Imbalanced Learning", ICCV 2025).

Each modality's prediction alone comes from the model's own fusion and head with the other
modalities zeroed (no extra parameters); the loss is ``L_mm + w Σ_m L_m`` (w = 1 during the warm-up
epochs ``<= start``, then γ). After the warm-up every encoder's gradient is scaled by ``1 + ω_m``:
the dependence on modality m (its share ``c_m`` of the mean absolute unimodal logits) is pushed
toward the inverse of its variance (its share of the prediction entropy ``H_m``, floored at 0.3 · 2/M):
``ω = softmax(T · [w_m Π_{n≠m} c_n]_m)`` with ``w_m ∝ 1 / H_m``.

Port of ``shicaiwei123/ICCV2025-ARL:main_arl_variance.py`` (``train_epoch``),
``models/backbone.py`` (``GradScale``, ``ResNet.forward``) and ``models/fusion_modules.py``
(``ConcatFusion_AUXI``). Deviations (``methods/arl.md``): the released loop computes ω but never
passes it to ``GradScale``, which keeps the warm-up value 0.5 (ICCV2025-ARL#3); we apply ω as the
paper describes (``coefficients="released"`` keeps the constant ``1 + 1/M``), from the current
step's predictions; the gradient is scaled on the encoder parameters (the same numbers as scaling
it at the encoder output); more than two modalities use the product of the other shares;
segmentation uses per-pixel entropies. Regression has no prediction entropy: cls and seg only.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from mmbalance.balancer import Balancer, EpochContext, StepContext
from mmbalance.config import finite, need
from mmbalance.errors import ConfigError
from mmbalance.methods import register_method
from mmbalance.methods._config import MethodConfig
from mmbalance.methods._grads import scale_grads_
from mmbalance.methods._heads import head_term
from mmbalance.methods._shared_unimodal import shared_unimodal_predictions
from mmbalance.models.base import ModelOutput, MultimodalModel

__all__ = ["ARL", "ARLConfig", "logit_shares", "inverse_entropy_weights", "arl_coefficients"]


@dataclass(frozen=True)
class ARLConfig(MethodConfig):
    gamma: float = 1.0  # γ: weight of the unimodal losses after the warm-up (--gamma default)
    temperature: float = 8.0  # T: temperature of the coefficient softmax (--T default)
    start: int = 5  # warm-up: ARL acts from epoch start + 1 (0-based; --start, `epoch > args.start`)
    entropy_floor: float = 0.3  # clamp of the normalised entropies for M = 2 (torch.clamp(H_n, 0.3)); × 2/M
    coefficients: Literal["variance", "released"] = "variance"  # ω from the paper, or the released 1/M

    def check(self) -> None:
        need(self, finite(self.gamma) and self.gamma >= 0, "gamma", "a finite number >= 0")
        need(self, finite(self.temperature) and self.temperature >= 0, "temperature", "a finite number >= 0")
        need(self, self.start >= -1, "start", "an integer >= -1 (-1: no warm-up)")
        need(self, finite(self.entropy_floor) and 0 <= self.entropy_floor < 1, "entropy_floor", "in [0, 1)")


# -- the arithmetic, as pure functions (hand-checked in tests/methods/test_arl.py) -----------------
def _per_class(logits: Tensor) -> Tensor:
    """``(B, K)`` or ``(B, K, H, W)`` -> ``(N, K)`` rows (one per sample or pixel)."""
    return logits.movedim(1, -1).reshape(-1, logits.shape[1]).float()


def logit_shares(logits: Mapping[str, Tensor] | list[Tensor]) -> Tensor:
    """``c_m = Σ_k mean_i |out_m[i, k]|``, normalised over the modalities to sum to 1: ``(M,)``."""
    values = list(logits.values()) if isinstance(logits, Mapping) else list(logits)
    magnitude = torch.stack([_per_class(x).abs().mean(dim=0).sum() for x in values])
    return magnitude / magnitude.sum().clamp_min(1e-12)


def inverse_entropy_weights(logits: Mapping[str, Tensor] | list[Tensor], floor: float) -> Tensor:
    """``w_m ∝ 1 / max(H_m / Σ_n H_n, floor)`` with ``H_m`` the mean prediction entropy of modality m
    (over samples, or pixels): ``(M,)``, summing to 1."""
    values = list(logits.values()) if isinstance(logits, Mapping) else list(logits)
    entropies = []
    for x in values:
        log_p = F.log_softmax(_per_class(x), dim=1)
        entropies.append(-(log_p.exp() * log_p).sum(dim=1).mean())
    h = torch.stack(entropies)
    inverse = 1.0 / (h / h.sum().clamp_min(1e-12)).clamp_min(max(floor, 1e-12))
    return inverse / inverse.sum()


def arl_coefficients(shares: Tensor, weights: Tensor, temperature: float) -> Tensor:
    """``ω = softmax(T · [w_m Π_{n≠m} c_n]_m)``; for two modalities the official
    ``softmax([c_v w_a T, c_a w_v T])``."""
    m = shares.shape[0]
    diagonal = torch.eye(m, dtype=torch.bool, device=shares.device)
    others = torch.where(diagonal, torch.ones_like(shares), shares)  # row m: c with c_m replaced by 1
    return torch.softmax(temperature * weights * others.prod(dim=1), dim=0)


@register_method("arl")
class ARL(Balancer):
    """ARL: unimodal losses through the shared fusion, encoder gradients scaled by 1 + ω_m."""

    Config = ARLConfig
    presets = {
        "cremad": {"gamma": 4.0, "temperature": 8.0},  # cramed_arl.sh
        "ave": {"gamma": 5.0, "temperature": 4.0},  # ave_arl.sh
        "kineticsound": {"gamma": 3.0, "temperature": 4.0},  # ks_arl.sh
        "vggsound": {"gamma": 1.0, "temperature": 4.0},  # vggsound_arl.sh (its main_arl.py is not released)
        "synthetic": {"start": 0},  # warm-up of 5 in 100 epochs, scaled to the benchmark's 6-8: one epoch
    }
    tasks = frozenset({"cls", "seg"})
    grad_edit_scope = frozenset({"encoders"})
    paper = "Wei et al., ICCV 2025 (shicaiwei123/ICCV2025-ARL)"

    def setup(self, model: MultimodalModel, task: Any, optimizer_factory: Any) -> None:
        super().setup(model, task, optimizer_factory)
        self._params = {m: model.modality_parameters(m) for m in self.modalities}
        self._epoch = 0
        self._omega: Tensor | None = None

    def on_train_epoch_start(self, ctx: EpochContext) -> None:
        self._epoch = ctx.epoch

    @property
    def active(self) -> bool:
        """Whether the current epoch is past the warm-up (``epoch > start``)."""
        return self._epoch > self.config.start

    def loss_terms(self, output: ModelOutput, batch: Mapping[str, Tensor], task: Any) -> dict[str, Tensor]:
        """``task``: L_mm; ``unimodal/<m>``: w·L_m of the zero-padded pass (w = γ after the warm-up,
        else 1). Computes ω from the detached unimodal logits."""
        cfg: ARLConfig = self.config
        target = batch["target"]
        predictions = shared_unimodal_predictions(self.model, output.features)
        weight = cfg.gamma if self.active else 1.0
        terms = {"task": task.loss(output.prediction, target)}
        for m in self.modalities:
            terms[head_term(m)] = weight * task.loss(predictions[m], target)
        with torch.no_grad():
            detached = [predictions[m].detach() for m in self.modalities]
            shares = logit_shares(detached)
            # the floor keeps its ratio to the uniform share 1/M: 0.3 of 1/2 for two modalities
            weights = inverse_entropy_weights(detached, cfg.entropy_floor * 2 / len(self.modalities))
            if cfg.coefficients == "variance":
                self._omega = arl_coefficients(shares, weights, cfg.temperature)
            else:
                self._omega = torch.full_like(shares, 1.0 / len(self.modalities))
        self.epoch_means.update(omega=self._omega, share=shares, inverse_entropy=weights)
        return terms

    def on_after_backward(self, ctx: StepContext) -> None:
        """After the warm-up: every encoder gradient of modality m times ``1 + ω_m``."""
        if not self.active:
            return
        if self._omega is None:
            raise ConfigError("arl: on_after_backward ran before loss_terms computed the coefficients")
        factors = 1.0 + self._omega
        for i, m in enumerate(self.modalities):
            scale_grads_(self._params[m], factors[i])

    def diagnostics(self) -> dict[str, float]:
        """Epoch means of ω_m (``omega/<m>``), the logit shares c_m (``share/<m>``) and the
        inverse-entropy weights w_m (``inverse_entropy/<m>``)."""
        return self.epoch_means.pop()
