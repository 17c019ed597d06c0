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
import functools
import math
import operator
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader

from mmbalance.balancer import Balancer, EpochContext, OptimizerFactory
from mmbalance.config import finite, need
from mmbalance.errors import ShapeError
from mmbalance.methods import register_method
from mmbalance.methods._config import HeadConfig
from mmbalance.methods._heads import UnimodalHeads
from mmbalance.methods._precision import upcast
from mmbalance.methods._stages import (
    eval_mode,
    isolated_rng,
    iterate,
    mean_loss,
    stage_loader,
    stage_seed,
    target_size,
    train_pass,
)
from mmbalance.models.base import ModelOutput, MultimodalModel
from mmbalance.tasks import Task

__all__ = ["UMT", "UMTConfig", "distillation_loss"]


@dataclass(frozen=True)
class UMTConfig(HeadConfig):
    scaling: float = 10.0  # λ, weight of the summed feature-distillation MSE (BalanceBenchmark `scaling`)
    teacher_epochs: int | None = None  # epochs of each teacher's unimodal training; None = the run's epochs
    # cap on batches per teacher epoch and validation pass (None = whole splits)
    teacher_batches: int | None = None
    teacher_lr: float | None = None  # teachers' learning rate (None = the run's lr; same optimizer type)
    head_hidden: int | None = None  # teachers' heads: linear (None) or 2-layer MLP of this width

    def check(self) -> None:
        need(self, finite(self.scaling) and self.scaling >= 0, "scaling", "a finite number >= 0")
        epochs, batches, lr = self.teacher_epochs, self.teacher_batches, self.teacher_lr
        need(self, epochs is None or epochs >= 0, "teacher_epochs", "None or an integer >= 0")
        need(self, batches is None or batches >= 1, "teacher_batches", "None or an integer >= 1")
        need(self, lr is None or (finite(lr) and lr > 0), "teacher_lr", "None or > 0")


def distillation_loss(student: Mapping[str, Tensor], teacher: Mapping[str, Tensor]) -> Tensor:
    """``sum_m mean((student_m - teacher_m)^2)`` over every element of each feature.

    Raises:
        ShapeError: a modality's student and teacher features differ in shape.
    """
    if not student:
        raise ShapeError("no features to distil; expected at least one modality")
    terms = []
    for m, s in student.items():
        t = teacher[m]
        if s.shape != t.shape:
            raise ShapeError(f"features[{m!r}] has shape {tuple(s.shape)}, its teacher's {tuple(t.shape)}")
        terms.append(F.mse_loss(upcast(s), upcast(t)))
    return functools.reduce(operator.add, terms)  # summed left to right, in modality order


@register_method("umt")
class UMT(Balancer):
    """Distil frozen unimodal teachers' features into the multimodal encoders."""

    Config = UMTConfig
    paper = "Du et al., ICML 2023"

    def setup(self, model: MultimodalModel, task: Task, optimizer_factory: OptimizerFactory) -> None:
        super().setup(model, task, optimizer_factory)
        self._optimizer_factory = optimizer_factory
        # Teachers start from the encoders' initial weights (same architecture, so the features align).
        self.teachers = nn.ModuleDict({m: copy.deepcopy(model.encoders[m]) for m in self.modalities})
        self.teachers.requires_grad_(False)
        self.teachers.eval()
        # Teachers' heads, trained with their encoder in stage 1 (their optimizer is per teacher).
        self.teacher_heads = UnimodalHeads.for_task(
            self.modalities, task, hidden=self.config.head_hidden, detach=False
        )
        self.register_buffer("teachers_trained", torch.zeros((), dtype=torch.bool))
        # Best validation loss of each teacher; inf until trained (no NaN: state dicts compare exactly).
        inf = torch.full((len(self.modalities),), math.inf, dtype=torch.float64)
        self.register_buffer("teacher_val_loss", inf)
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
        with isolated_rng(ctx.device):
            for index, m in enumerate(self.modalities):
                loader = stage_loader(ctx.train_loader, shuffle=True, seed=stage_seed(index))
                if not self.teacher_heads.built:
                    with torch.no_grad(), eval_mode(self.teachers):
                        first = next(iterate(loader, ctx.to_device, 1))
                        self.teacher_heads(self._teacher_features(first), target_size(first))
                self._train_teacher(ctx, index, m, loader)
        self.teachers_trained.fill_(True)

    def _train_teacher(self, ctx: EpochContext, index: int, m: str, loader: DataLoader) -> None:
        """Teacher ``m``: train, restore its best-validation-loss epoch, freeze."""
        cfg, task, cap = self.config, ctx.task, self.config.teacher_batches
        encoder, head = self.teachers[m], self.teacher_heads.heads[m]

        def loss_fn(batch: dict[str, Tensor]) -> Tensor:
            feature = encoder(batch[m])
            feature = feature[0] if isinstance(feature, tuple) else feature
            return task.loss(head(feature, target_size(batch)), batch["target"])

        params = list(encoder.parameters()) + list(head.parameters())
        state = params + list(encoder.buffers())
        for p in params:
            p.requires_grad_(True)
        optimizer = self._optimizer_factory(params, lr=cfg.teacher_lr)
        best, best_state = math.inf, None
        for _ in range(ctx.num_epochs if cfg.teacher_epochs is None else cfg.teacher_epochs):
            encoder.train()
            head.train()
            self._extra_steps += train_pass(loss_fn, optimizer, loader, ctx.to_device, cap)
            with eval_mode(encoder, head):
                val = mean_loss(loss_fn, ctx.val_loader, ctx.to_device, cap)
            if val < best:
                best, best_state = val, [t.detach().clone() for t in state]
        if best_state is not None:
            with torch.no_grad():
                torch._foreach_copy_(state, best_state)
            self.teacher_val_loss[index] = best
        for p in params:
            p.requires_grad_(False)
            p.grad = None
        encoder.eval()

    @torch.no_grad()
    def _teacher_features(self, batch: Mapping[str, Tensor]) -> dict[str, Tensor]:
        out = {}
        for m in self.modalities:
            f = self.teachers[m](batch[m])
            out[m] = f[0] if isinstance(f, tuple) else f
        return out

    # -- stage 2 ------------------------------------------------------------------------------------
    def loss_terms(self, output: ModelOutput, batch: Mapping[str, Tensor], task: Task) -> dict[str, Tensor]:
        """Task loss plus ``λ * sum_m MSE(features_m, teacher_m)`` (one no-grad teacher forward per
        modality)."""
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
