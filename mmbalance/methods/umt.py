"""``umt``: Uni-Modal Teacher (Du, Teng, Li, Liu, Yuan, Wang, Yuan, Zhao, "On Uni-Modal Feature
Learning in Supervised Multi-Modal Learning", ICML 2023; first as "Improving Multi-Modal Learning
with Uni-Modal Teachers", arXiv 2106.11059).

Stage 1 (inside the run, before the first epoch): for each modality, a unimodal model — a copy of
that encoder plus a head — is trained alone on the training split; its best-validation-loss epoch is
kept and frozen. Stage 2: the multimodal model trains with
``L = L_task + λ * sum_m MSE(φ_m(x_m), φ_m^teacher(x_m))``, distilling each teacher's features into the
corresponding encoder, so that joint training cannot neglect uni-modal features.

No official code; the loss and λ = 10 follow BalanceBenchmark ``balancemm/trainer/UMT_trainer.py``.
Teachers stay in eval mode (the re-implementation runs them in train mode: dropout noise in the
target, BatchNorm statistics drifting). Details in ``methods/umt.md``.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mmbalance.balancer import Balancer, EpochContext, OptimizerFactory
from mmbalance.errors import ShapeError
from mmbalance.methods import register_method
from mmbalance.methods._heads import UnimodalHeads
from mmbalance.methods._stages import (
    eval_mode,
    isolated_rng,
    iterate,
    mean_loss,
    stage_loader,
    stage_seed,
    target_size,
)
from mmbalance.models.base import ModelOutput, MultimodalModel
from mmbalance.tasks import Task

__all__ = ["UMT", "UMTConfig", "distillation_loss"]


@dataclass(frozen=True)
class UMTConfig:
    scaling: float = 10.0  # λ, weight of the summed feature-distillation MSE (BalanceBenchmark `scaling`)
    teacher_epochs: int | None = None  # epochs of each teacher's unimodal training; None = the run's epochs
    teacher_batches: int | None = None  # cap on batches per teacher epoch and validation pass (None = whole splits)
    teacher_lr: float | None = None  # teachers' learning rate (None = the run's lr; same optimizer type)
    head_hidden: int | None = None  # teachers' heads: linear (None) or 2-layer MLP of this width

    def __post_init__(self) -> None:
        if not (self.scaling >= 0 and math.isfinite(self.scaling)):
            raise ValueError(f"scaling must be a finite number >= 0, got {self.scaling!r}")
        if self.teacher_epochs is not None and (not isinstance(self.teacher_epochs, int) or self.teacher_epochs < 0):
            raise ValueError(f"teacher_epochs must be None or an integer >= 0, got {self.teacher_epochs!r}")
        if self.teacher_batches is not None and (not isinstance(self.teacher_batches, int) or self.teacher_batches < 1):
            raise ValueError(f"teacher_batches must be None or an integer >= 1, got {self.teacher_batches!r}")
        if self.teacher_lr is not None and not self.teacher_lr > 0:
            raise ValueError(f"teacher_lr must be None or > 0, got {self.teacher_lr!r}")
        if self.head_hidden is not None and (not isinstance(self.head_hidden, int) or self.head_hidden < 1):
            raise ValueError(f"head_hidden must be None or an integer >= 1, got {self.head_hidden!r}")


def distillation_loss(student: Mapping[str, Tensor], teacher: Mapping[str, Tensor]) -> Tensor:
    """``sum_m mean((student_m - teacher_m)^2)`` over every element of each feature.

    Raises:
        ShapeError: a modality's student and teacher features differ in shape.
    """
    total: Tensor | None = None
    for m, s in student.items():
        t = teacher[m]
        if s.shape != t.shape:
            raise ShapeError(f"features[{m!r}] has shape {tuple(s.shape)}, its teacher's {tuple(t.shape)}")
        term = F.mse_loss(s.float(), t.float())
        total = term if total is None else total + term
    if total is None:
        raise ShapeError("no features to distil; expected at least one modality")
    return total


@register_method("umt")
class UMT(Balancer):
    """Distil frozen unimodal teachers' features into the multimodal encoders."""

    Config = UMTConfig
    tasks = frozenset({"cls", "reg", "seg"})
    paper = "Du et al. On Uni-Modal Feature Learning in Supervised Multi-Modal Learning. ICML 2023"

    def setup(self, model: MultimodalModel, task: Task, optimizer_factory: OptimizerFactory) -> None:
        super().setup(model, task, optimizer_factory)
        self._optimizer_factory = optimizer_factory
        # Teachers start from the encoders' initial weights (same architecture, so the features align).
        self.teachers = nn.ModuleDict({m: copy.deepcopy(model.encoders[m]) for m in self.modalities})
        self.teachers.requires_grad_(False)
        self.teachers.eval()
        self.teacher_heads = UnimodalHeads.for_task(self.modalities, task, hidden=self.config.head_hidden, detach=False)
        self.register_buffer("teachers_trained", torch.zeros((), dtype=torch.bool))
        # Best validation loss of each teacher; inf until trained (no NaN: state dicts compare exactly).
        self.register_buffer("teacher_val_loss", torch.full((len(self.modalities),), math.inf, dtype=torch.float64))
        self._extra_steps = 0
        # Heads built from a loaded state start trainable: trained teachers' heads are frozen again.
        self.register_load_state_dict_post_hook(lambda module, _keys: module._freeze_trained_teachers())

    def _freeze_trained_teachers(self) -> None:
        if bool(self.teachers_trained):
            self.teacher_heads.requires_grad_(False)

    def train(self, mode: bool = True) -> UMT:
        """Teachers stay in eval mode whatever the balancer's mode (frozen targets)."""
        super().train(mode)
        if "teachers" in self._modules:
            self.teachers.eval()
        return self

    # -- stage 1 ------------------------------------------------------------------------------------
    def on_train_epoch_start(self, ctx: EpochContext) -> None:
        """Before the first epoch: train the unimodal teachers (once per run)."""
        if ctx.epoch == 0 and not bool(self.teachers_trained):
            self.train_teachers(ctx)

    def train_teachers(self, ctx: EpochContext) -> None:
        """Train each teacher (encoder copy + head) alone for ``teacher_epochs``; keep its
        best-validation-loss epoch; freeze it. Isolated from the main run's RNG and loader."""
        cfg, task, cap = self.config, ctx.task, self.config.teacher_batches
        epochs = ctx.num_epochs if cfg.teacher_epochs is None else cfg.teacher_epochs
        with isolated_rng(ctx.device):
            for index, m in enumerate(self.modalities):
                encoder, loader = self.teachers[m], stage_loader(ctx.train_loader, shuffle=True, seed=stage_seed(index))
                if not self.teacher_heads.built:
                    with torch.no_grad(), eval_mode(self.teachers):
                        first = next(iterate(loader, ctx.to_device, 1))
                        self.teacher_heads(self._teacher_features(first), target_size(first))
                head = self.teacher_heads.heads[m]

                def loss_fn(batch: dict[str, Tensor], encoder: nn.Module = encoder, head: nn.Module = head, m: str = m) -> Tensor:
                    feature = encoder(batch[m])
                    feature = feature[0] if isinstance(feature, tuple) else feature
                    return task.loss(head(feature, target_size(batch)), batch["target"])

                params = list(encoder.parameters()) + list(head.parameters())
                for p in params:
                    p.requires_grad_(True)
                optimizer = self._optimizer_factory(params, lr=cfg.teacher_lr)
                best, best_state = math.inf, None
                for _ in range(epochs):
                    encoder.train()
                    head.train()
                    for batch in iterate(loader, ctx.to_device, cap):
                        optimizer.zero_grad(set_to_none=True)
                        loss_fn(batch).backward()
                        optimizer.step()
                        self._extra_steps += 1
                    with eval_mode(encoder, head):
                        val = mean_loss(loss_fn, ctx.val_loader, ctx.to_device, cap)
                    if val < best:
                        best = val
                        best_state = [p.detach().clone() for p in params] + [b.detach().clone() for b in encoder.buffers()]
                if best_state is not None:
                    with torch.no_grad():
                        for dst, src in zip(list(params) + list(encoder.buffers()), best_state, strict=True):
                            dst.copy_(src)
                    self.teacher_val_loss[index] = best
                for p in params:
                    p.requires_grad_(False)
                    p.grad = None
                encoder.eval()
        self.teachers_trained.fill_(True)

    @torch.no_grad()
    def _teacher_features(self, batch: Mapping[str, Tensor]) -> dict[str, Tensor]:
        out = {}
        for m in self.modalities:
            f = self.teachers[m](batch[m])
            out[m] = f[0] if isinstance(f, tuple) else f
        return out

    # -- stage 2 ------------------------------------------------------------------------------------
    def loss_terms(self, output: ModelOutput, batch: Mapping[str, Tensor], task: Task) -> dict[str, Tensor]:
        """Task loss plus ``λ * sum_m MSE(features_m, teacher_m)`` (one no-grad teacher forward per modality)."""
        teacher = self._teacher_features(batch)
        student = {m: output.features[m] for m in self.modalities}
        return {
            "task": task.loss(output.prediction, batch["target"]),
            "distill": self.config.scaling * distillation_loss(student, teacher),
        }

    def diagnostics(self) -> dict[str, float]:
        losses = [v if math.isfinite(v) else math.nan for v in self.teacher_val_loss.tolist()]
        out = {f"teacher_val_loss/{m}": v for m, v in zip(self.modalities, losses, strict=True)}
        out["teachers_trained"] = float(self.teachers_trained)
        return out
