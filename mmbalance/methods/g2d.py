"""``g2d``: Gradient-Guided Distillation (Rakib, Bagavathi, "G²D: Boosting Multimodal Learning with
Gradient-Guided Distillation", ICCV 2025).

Unimodal teachers (a copy of each encoder plus a linear head, trained alone before the first epoch,
then frozen; UMT's stage) guide the multimodal student with
``L = L_task + Σ_m [λ_l T² KL(softmax(l_m^T / T) ‖ softmax(l_S / T)) + λ_f MSE(f_m, f_m^T)]``: the
student's fused logits are distilled toward every teacher's logits, each encoder's features toward its
teacher's features. Sequential Modality Prioritization (SMP): every step the teachers' confidence on
the batch, ``ρ_m = Σ_i softmax(l_m^T)_i[y_i]``, ranks the modalities; the encoder of the most
confident one gets no gradient, so the weaker modality leads that update.

Port of ``rAIson-Lab/G2D`` (``student.py``: ``train``, ``distillation_loss``, ``feature_loss``;
``utils/utils.py``: ``modulate_gradients_based_on_scores_from_two_modalities``; ``teacher.py``;
``config.py``). Deviations (``methods/g2d.md``): teachers trained inside the run and selected on
validation loss (official: separate runs, best test accuracy); every encoder parameter is modulated
(official: 4-D conv weights); a tie suppresses nothing (official: ValueError); more than two
modalities (``smp_rule``), regression (MSE logit distillation, ``Σ exp(−ℓ_i)`` confidence) and
segmentation (per-pixel KL) are adaptations.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from mmbalance.balancer import OptimizerFactory, StepContext
from mmbalance.config import finite, need
from mmbalance.errors import ConfigError, ShapeError
from mmbalance.methods import register_method
from mmbalance.methods._config import ModulationWindow
from mmbalance.methods._grads import scale_grads_
from mmbalance.methods._stages import target_size
from mmbalance.methods.ogm_ge import confidence_score
from mmbalance.methods.umt import UMT, distillation_loss
from mmbalance.models.base import ModelOutput, MultimodalModel
from mmbalance.tasks import Task

__all__ = ["G2D", "G2DConfig", "logit_distillation", "smp_coefficients", "SMP_RULES"]

SMP_RULES = ("suppress_strongest", "only_weakest")


@dataclass(frozen=True)
class G2DConfig(ModulationWindow):
    logit_weight: float = 1.0  # λ_l per teacher (config.py logit_{audio,video}_loss_weight = 1.0)
    feature_weight: float = 1.0  # λ_f per teacher (config.py {audio,video}_feature_loss_weight = 1.0)
    temperature: float = 1.0  # T of the logit distillation (config.py temp_audio = temp_video = 1)
    smp: bool = True  # SMP gradient modulation (config.py modulation = 'G2D'; False = 'Normal')
    # which encoders step for M > 2 (identical for M = 2): all but the most confident, or the least only
    smp_rule: Literal["suppress_strongest", "only_weakest"] = "suppress_strongest"
    modulation_starts: int = 0  # first epoch with SMP (config.py, 0-based, inclusive)
    modulation_ends: int = 150  # last epoch with SMP (config.py: 150 of 300 epochs, inclusive)
    teacher_epochs: int | None = None  # epochs of each teacher's training; None = the run's (config.py)
    teacher_batches: int | None = None  # cap on batches per teacher epoch and validation (None = all)
    teacher_lr: float | None = None  # teachers' learning rate (None = the run's, as teacher.py)
    head_hidden: int | None = None  # teachers' heads: linear (None; AVClassifier.classifier) or an MLP

    def check(self) -> None:
        for name in ("logit_weight", "feature_weight"):
            value = getattr(self, name)
            need(self, finite(value) and value >= 0, name, "a finite number >= 0")
        need(self, finite(self.temperature) and self.temperature > 0, "temperature", "a finite number > 0")
        for name, low in (("teacher_epochs", 0), ("teacher_batches", 1), ("head_hidden", 1)):
            value = getattr(self, name)
            need(self, value is None or value >= low, name, f"None or an integer >= {low}")
        lr = self.teacher_lr
        need(self, lr is None or (finite(lr) and lr > 0), "teacher_lr", "None or a finite number > 0")


# -- the arithmetic, as pure functions (hand-checked in tests/methods/test_g2d.py) -----------------
def logit_distillation(student: Tensor, teacher: Tensor, temperature: float, task_name: str) -> Tensor:
    """``T² KL(softmax(teacher / T) ‖ softmax(student / T))`` over the class dim 1, summed over classes
    and averaged over samples (cls: ``(B, K)``, the official ``batchmean``) or over samples and pixels
    (seg: ``(B, K, H, W)``); regression: ``MSE(student, teacher)``. The teacher carries no gradient.

    Raises:
        ShapeError: the student's and the teacher's predictions differ in shape.
    """
    if student.shape != teacher.shape:
        raise ShapeError(
            f"student prediction has shape {tuple(student.shape)}, its teacher's {tuple(teacher.shape)}"
        )
    teacher = teacher.detach().float()
    if task_name == "reg":
        return F.mse_loss(student.float(), teacher)
    log_p = F.log_softmax(student.float() / temperature, dim=1)
    q = F.softmax(teacher / temperature, dim=1)
    return F.kl_div(log_p, q, reduction="none").sum(dim=1).mean() * temperature**2


def smp_coefficients(teacher_scores: Tensor, rule: str = "suppress_strongest") -> Tensor:
    """SMP gradient factors ``(M,)`` from the teachers' confidences ``ρ_m`` on the batch: 0 for the
    encoders that pause this step, 1 for those that learn. ``suppress_strongest``: the most confident
    modality pauses; ``only_weakest``: only the least confident learns. For two modalities both are
    the official rule (``ρ_a > ρ_v``: audio 0, visual 1). A tie for the deciding place pauses nothing."""
    if teacher_scores.dim() != 1 or teacher_scores.shape[0] < 2:
        shape = tuple(teacher_scores.shape)
        raise ConfigError(f"SMP compares modalities: needs scores of shape (M,) with M >= 2, got {shape}")
    if rule not in SMP_RULES:
        raise ConfigError(f"smp_rule must be one of {SMP_RULES}, got {rule!r}")
    extreme = teacher_scores.max() if rule == "suppress_strongest" else teacher_scores.min()
    chosen = teacher_scores == extreme
    unique = chosen.sum() == 1
    pause = chosen & unique if rule == "suppress_strongest" else ~chosen & unique
    return torch.where(pause, 0.0, 1.0).to(teacher_scores.dtype)


@register_method("g2d")
class G2D(UMT):
    """G²D: logit and feature distillation from unimodal teachers; the most confident teacher's
    modality pauses each step (SMP)."""

    Config = G2DConfig
    presets = {
        # Not from the paper: the 8-epoch synthetic benchmark, SMP for the first half as 150 of 300.
        "synthetic": {"modulation_ends": 3},
    }
    grad_edit_scope = frozenset({"encoders"})
    paper = "Rakib and Bagavathi, ICCV 2025 (rAIson-Lab/G2D)"

    def setup(self, model: MultimodalModel, task: Task, optimizer_factory: OptimizerFactory) -> None:
        super().setup(model, task, optimizer_factory)
        self._groups = {m: model.modality_parameters(m) for m in self.modalities}
        self._scores: Tensor | None = None

    @torch.no_grad()
    def _teacher_outputs(self, batch: Mapping[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """The frozen teachers' features and predictions on ``batch`` (one no-grad pass per modality)."""
        features = self._teacher_features(batch)
        return features, self.teacher_heads(features, target_size(batch))

    def loss_terms(self, output: ModelOutput, batch: Mapping[str, Tensor], task: Task) -> dict[str, Tensor]:
        """``task``, ``logit_kd`` (λ_l Σ_m KD of the fused prediction toward teacher m) and
        ``feature_kd`` (λ_f Σ_m MSE of features m toward teacher m); keeps the teachers' ρ_m for SMP."""
        cfg: G2DConfig = self.config
        target = batch["target"]
        teacher_features, teacher_predictions = self._teacher_outputs(batch)
        logit_kd = torch.stack([
            logit_distillation(output.prediction, teacher_predictions[m], cfg.temperature, task.name)
            for m in self.modalities
        ]).sum()
        student = {m: output.features[m] for m in self.modalities}
        scores = [confidence_score(teacher_predictions[m], target, task) for m in self.modalities]
        self._scores = torch.stack(scores)
        return {
            "task": task.loss(output.prediction, target),
            "logit_kd": cfg.logit_weight * logit_kd,
            "feature_kd": cfg.feature_weight * distillation_loss(student, teacher_features),
        }

    def on_after_backward(self, ctx: StepContext) -> None:
        """SMP: multiply each encoder's gradient by its factor (0 pauses it) inside the window."""
        cfg: G2DConfig = self.config
        if self._scores is None:
            raise ConfigError("g2d: on_after_backward ran before loss_terms computed the teachers' scores")
        coeffs = smp_coefficients(self._scores, cfg.smp_rule)
        active = cfg.smp and cfg.modulates(ctx.epoch)
        applied = coeffs if active else torch.ones_like(coeffs)
        self.epoch_means.update(coeff=applied, teacher_score=self._scores)
        if active:
            for i, m in enumerate(self.modalities):
                scale_grads_(self._groups[m], coeffs[i])

    def diagnostics(self) -> dict[str, Any]:
        """UMT's teacher diagnostics, and the epoch means of the applied SMP factor (``coeff/<m>``: the
        share of steps that encoder learned) and of the teachers' batch confidence ``teacher_score/<m>``."""
        out = super().diagnostics()
        out.update(self.epoch_means.pop())
        return out
