"""``reconboost``: ReconBoost (Hua, Xu, Bao, Yang, Huang, "ReconBoost: Boosting Can Achieve Modality
Reconcilement", ICML 2024).

Alternating boosting over modalities. The predictor is an ensemble ``F(x) = ρ Σ_{m∈E} f_m(x)`` of one
learner per modality, ``f_m = H(φ_m(x_m))`` (encoder m and a head H shared by all modalities). Stage s
picks modality ``m = modalities[s mod M]`` and trains its learner alone against the rest of the
ensemble with the reconcilement loss ``(1/K) mean_i (w₂ q_i − w₁) log p_m(y_i | x_i)``, where
``q_i = softmax(F_{−m}(x_i))_{y_i}`` (samples the others already get right weigh less); the learner
then (re)enters the ensemble, and a global rectification trains the whole ensemble (all member
encoders, H and ρ) with the task loss.

Port of ``huacong/ReconBoost:train.py`` / ``train_MSA.py`` (``main``: phase 1 and phase 2),
``models/dynamic_net.py`` (``DynamicNet``, ``Head``) and ``schedule.py``. In the run: every
``correct_epochs`` runner epochs form one stage; its boosting phase (``boost_epochs`` passes) runs in
``on_train_epoch_start`` and is counted in ``extra_steps``; the runner's own steps are the
rectification. Deviations (``methods/reconboost.md``): the memory-consolidation term, whose
operands are both detached in the official code (no gradient), is skipped unless
``consolidation_grad=True``; the other modalities' predictions use eval mode; regression and
segmentation use the task loss and ``q_i = exp(−ℓ_i(F_{−m}))``.
"""

from __future__ import annotations

import functools
import operator
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from mmbalance.balancer import Balancer, EpochContext, OptimizerFactory, StepContext
from mmbalance.config import finite, need
from mmbalance.errors import ConfigError, ShapeError
from mmbalance.methods import register_method
from mmbalance.methods._config import HeadConfig
from mmbalance.methods._grads import step_auxiliary
from mmbalance.methods._heads import UnimodalHeads
from mmbalance.methods._reconboost_loss import boosting_loss, consolidation_loss, stage_modality
from mmbalance.methods._stages import (
    encode_modality,
    eval_mode,
    isolated_rng,
    iterate,
    stage_loader,
    stage_seed,
    target_size,
    train_pass,
)
from mmbalance.models.base import ModelOutput, MultimodalModel
from mmbalance.models.features import feature_kind
from mmbalance.tasks import Task

__all__ = ["ReconBoost", "ReconBoostConfig", "boosting_loss", "consolidation_loss", "stage_modality"]

SHARED = "shared"


@dataclass(frozen=True)
class ReconBoostConfig(HeadConfig):
    weight1: float = 5.0  # w₁, weight of the learner's own log-likelihood (train.py --weight1; CREMA-D 5)
    weight2: float = 1.0  # w₂, reconcilement weight on the ensemble's confidence q (--weight2)
    boost_epochs: int = 4  # boosting passes over the training split per stage (--epochs_per_stage)
    correct_epochs: int = 4  # runner epochs of global rectification per stage (--correct_epoch)
    boost_rate: float = 1.0  # ρ at the start, learnt in rectification (DynamicNet.boost_rate)
    boost_lr: float | None = None  # boosting LR (official m_lr 0.01, SGD); None = the run's LR
    shared_head: bool = True  # one head for all modalities (--common_space True); False: a head per modality
    head_hidden: int | None = 256  # H: Linear(d, 256)-ReLU-Linear(256, K) (dynamic_net.Head); None: Linear
    alpha: float = 0.5  # α, weight of the memory-consolidation term (--alpha); only with consolidation_grad
    consolidation_grad: bool = False  # False = official (both operands detached: no effect, not computed)
    boost_batches: int | None = None  # cap on batches per boosting pass (None = the whole split)
    sequence_pool: str = "mean"  # pooling of (B, L, d) features for the head

    def check(self) -> None:
        need(self, finite(self.weight1) and self.weight1 > 0, "weight1", "a finite number > 0")
        bounded = finite(self.weight2) and 0 <= self.weight2 <= self.weight1
        need(self, bounded, "weight2", f"in [0, weight1={self.weight1}] (above, the loss is unbounded below)")
        need(self, self.boost_epochs >= 1, "boost_epochs", "an integer >= 1")
        need(self, self.correct_epochs >= 1, "correct_epochs", "an integer >= 1")
        need(self, finite(self.boost_rate) and self.boost_rate > 0, "boost_rate", "a finite number > 0")
        lr, batches = self.boost_lr, self.boost_batches
        need(self, lr is None or (finite(lr) and lr > 0), "boost_lr", "None or > 0")
        need(self, finite(self.alpha) and self.alpha >= 0, "alpha", "a finite number >= 0")
        need(self, batches is None or batches >= 1, "boost_batches", "None or an integer >= 1")


@register_method("reconboost")
class ReconBoost(Balancer):
    """Alternating per-modality boosting with reconcilement, plus global rectification of the ensemble."""

    Config = ReconBoostConfig
    presets = {
        # README commands / train.py
        "cremad": {"weight1": 5.0, "weight2": 1.0},
        "ave": {"weight1": 4.0, "weight2": 1.0},
        "modelnet40": {"weight1": 4.0, "weight2": 1.0},
        # train_MSA.py defaults; MHead = Linear(128, 3)
        "mosi": {"weight1": 1.0, "weight2": 0.25, "head_hidden": None},
        "mosei": {"weight1": 1.0, "weight2": 0.25, "head_hidden": None},
        # Not from the paper: the synthetic benchmark trains 8 epochs, so one-epoch stages (same 1:1
        # boosting : rectification ratio as the official 4 : 4) let every modality be boosted repeatedly.
        "synthetic": {"boost_epochs": 1, "correct_epochs": 1},
    }
    paper = "Hua et al., ICML 2024 (huacong/ReconBoost)"
    def setup(self, model: MultimodalModel, task: Task, optimizer_factory: OptimizerFactory) -> None:
        super().setup(model, task, optimizer_factory)
        cfg: ReconBoostConfig = self.config
        self._optimizer_factory = optimizer_factory
        # Segmentation maps get a 1x1-conv head: the official MLP head is for pooled vectors.
        hidden = None if task.name == "seg" else cfg.head_hidden
        names = (SHARED,) if cfg.shared_head else self.modalities
        self.heads = UnimodalHeads(names, task.name, int(task.num_outputs), hidden=hidden,
                                   sequence_pool=cfg.sequence_pool, detach=False)
        self.rho = nn.Parameter(torch.tensor(float(cfg.boost_rate)))  # ρ, the ensemble's boost rate
        self.register_buffer("in_ensemble", torch.zeros(len(self.modalities), dtype=torch.bool))
        self.register_buffer("stages_done", torch.zeros((), dtype=torch.long))
        self.register_buffer("last_boost_loss", torch.full((), float("nan"), dtype=torch.float64))
        self._members: list[str] = []  # host mirror of in_ensemble (read every step without a sync)
        self.rectify_optimizer: torch.optim.Optimizer | None = None
        self.register_load_state_dict_post_hook(lambda module, _keys: module._after_load())
        self._extra_steps = 0

    def _load_from_state_dict(
        self, state_dict: Mapping[str, Any], prefix: str, *args: Any, **kwargs: Any
    ) -> None:
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._sync_members()

    def _after_load(self) -> None:
        """After a state-dict load (the heads are built from it by then): a balancer resumed inside
        a stage gets the stage's rectification optimizer, for the saved optimizer state to load into."""
        if self.rectify_optimizer is None and int(self.stages_done) > 0:
            self.rectify_optimizer = self._rectify_optimizer()

    def _rectify_optimizer(self) -> torch.optim.Optimizer:
        """A fresh optimizer of the run's type over the ensemble head(s) and ρ."""
        return self._optimizer_factory(list(self.heads.parameters()) + [self.rho])

    def _sync_members(self) -> None:
        """Refresh the host list of members from ``in_ensemble`` (one device read)."""
        inside = self.in_ensemble.tolist()
        self._members = [m for m, member in zip(self.modalities, inside, strict=True) if member]

    # -- learners -------------------------------------------------------------------------------
    def _learner(self, m: str, feature: Tensor, size: tuple[int, int] | None) -> Tensor:
        """``f_m = H(φ_m(x_m))`` on a given encoder output."""
        if self.config.shared_head:
            return self.heads({SHARED: feature}, size)[SHARED]
        if not self.heads.built:
            raise ConfigError(
                "reconboost: the per-modality heads are built by the first boosting stage, which has not run"
            )
        return self.heads.heads[m](feature, size)

    def _ensemble(
        self, features: Mapping[str, Tensor], members: list[str], size: tuple[int, int] | None
    ) -> Tensor | None:
        """``ρ Σ_{m∈members} f_m`` (summed in member order), or None for no member."""
        if not members:
            return None
        learners = (self._learner(m, features[m], size) for m in members)
        return self.rho * functools.reduce(operator.add, learners)

    def _ensure_heads(self, model: MultimodalModel, batch: Mapping[str, Tensor]) -> None:
        """Build the heads (lazily sized) from one batch's features; check a shared head fits all."""
        with torch.no_grad(), eval_mode(model):
            features = {m: encode_modality(model, m, batch) for m in self.modalities}
        layout = {m: (feature_kind(f, m), int(f.shape[1] if f.dim() == 4 else f.shape[-1]))
                  for m, f in features.items()}
        if self.config.shared_head and len(set(layout.values())) != 1:
            raise ShapeError(
                "reconboost shared_head=True needs every features[m] of the same kind and width, "
                f"got {layout}; use shared_head=False for a head per modality"
            )
        if not self.heads.built:
            with torch.no_grad():
                if self.config.shared_head:
                    self.heads({SHARED: features[self.modalities[0]]}, target_size(batch))
                else:
                    self.heads(features, target_size(batch))

    def _head_parameters(self, m: str) -> list[nn.Parameter]:
        return list(self.heads.heads[SHARED if self.config.shared_head else m].parameters())

    # -- stages ---------------------------------------------------------------------------------
    def on_train_epoch_start(self, ctx: EpochContext) -> None:
        """At the first epoch of every stage (every ``correct_epochs`` epochs): the boosting phase
        for the stage's modality, which then enters the ensemble, and a fresh rectification
        optimizer (ensemble head + ρ), as the official code builds one per stage."""
        if ctx.epoch % self.config.correct_epochs != 0:
            return
        stage = ctx.epoch // self.config.correct_epochs
        modality = stage_modality(stage, self.modalities)
        self.boost(ctx, stage, modality)
        self.in_ensemble[self.modalities.index(modality)] = True
        self._sync_members()
        self.stages_done.fill_(stage + 1)
        self.rectify_optimizer = self._rectify_optimizer()

    def boost(self, ctx: EpochContext, stage: int, modality: str) -> float:
        """Train learner ``modality`` (its encoder and the head) for ``boost_epochs`` passes with the
        reconcilement loss against the other members; returns the mean boosting loss. Runs under a
        forked RNG with a private loader (the main loop's random stream and order are untouched)."""
        cfg: ReconBoostConfig = self.config
        losses: list[Tensor] = []
        with isolated_rng(ctx.device):
            loader = stage_loader(ctx.train_loader, shuffle=True, seed=stage_seed(stage))
            if not self.heads.built:
                self._ensure_heads(ctx.model, next(iterate(loader, ctx.to_device, 1)))
            params = list(ctx.model.modality_parameters(modality)) + self._head_parameters(modality)
            optimizer = self._optimizer_factory(params, lr=cfg.boost_lr)
            loss_fn = self._boosting_loss_fn(ctx, stage, modality, losses)
            for _ in range(cfg.boost_epochs):
                self._extra_steps += train_pass(loss_fn, optimizer, loader, ctx.to_device, cfg.boost_batches)
            optimizer.zero_grad(set_to_none=True)  # leave no gradient for the main loop to accumulate onto
        if not losses:
            raise ConfigError("reconboost: the training loader yielded no batch for the boosting phase")
        self.last_boost_loss.copy_(functools.reduce(operator.add, losses) / len(losses))
        return float(self.last_boost_loss)

    def _boosting_loss_fn(
        self, ctx: EpochContext, stage: int, modality: str, record: list[Tensor]
    ) -> Callable[[dict[str, Tensor]], Tensor]:
        """The boosting phase's loss of one batch: the reconcilement loss of ``modality``'s learner
        against the other members' ensemble (appended, detached in float64, to ``record``, as the
        official ``stage_loss``), plus the consolidation term towards the previous stage's learner
        when ``consolidation_grad``."""
        cfg: ReconBoostConfig = self.config
        model, task = ctx.model, ctx.task
        others = [m for m in self._members if m != modality]
        other_encoders = [model.encoders[m] for m in others]
        previous = stage_modality(stage - 1, self.modalities) if stage > 0 else None
        consolidate = cfg.consolidation_grad and previous not in (None, modality) and cfg.alpha > 0

        def loss_fn(batch: dict[str, Tensor]) -> Tensor:
            size = target_size(batch)
            prediction = self._learner(modality, encode_modality(model, modality, batch), size)
            with torch.no_grad(), eval_mode(*other_encoders):
                rest = self._ensemble({m: encode_modality(model, m, batch) for m in others}, others, size)
            loss = boosting_loss(prediction, rest, batch["target"], task, cfg.weight1, cfg.weight2)
            record.append(loss.detach().double())
            if consolidate:
                with torch.no_grad(), eval_mode(model.encoders[previous]):
                    before = self._learner(previous, encode_modality(model, previous, batch), size)
                loss = loss + cfg.alpha * consolidation_loss(prediction, before, task.name)
            return loss

        return loss_fn

    # -- rectification (the runner's steps) ---------------------------------------------------------
    def forward_step(self, model: MultimodalModel, batch: Mapping[str, Tensor]) -> ModelOutput:
        """The ensemble ``ρ Σ_{m∈E} f_m``: only member encoders run (the model's fusion is unused)."""
        if not self._members:
            raise ConfigError(
                "reconboost: the ensemble is empty; on_train_epoch_start must run the first boosting stage "
                "before training steps"
            )
        features = {m: encode_modality(model, m, batch) for m in self._members}
        prediction = self._ensemble(features, self._members, target_size(batch))
        assert prediction is not None
        return ModelOutput(prediction, features, None, {})

    def loss_terms(self, output: ModelOutput, batch: Mapping[str, Tensor], task: Task) -> dict[str, Tensor]:
        """Global rectification: the task loss of the ensemble (all member encoders, head, ρ)."""
        return {"task": task.loss(output.prediction, batch["target"])}

    def on_after_optimizer_step(self, ctx: StepContext) -> None:
        """Step the rectification optimizer of the head and ρ (the encoders are the runner's)."""
        if self.rectify_optimizer is None:
            raise ConfigError(
                "reconboost: no rectification optimizer; on_train_epoch_start has not run a stage"
            )
        step_auxiliary(ctx.scaler, self.rectify_optimizer)

    def predict(self, output: ModelOutput) -> Tensor:
        """The ensemble on ``output.features``."""
        if not self._members:
            raise ConfigError("reconboost: the ensemble is empty; nothing has been trained")
        size = tuple(output.prediction.shape[-2:]) if output.prediction.dim() == 4 else None
        prediction = self._ensemble(output.features, self._members, size)
        assert prediction is not None
        return prediction

    def inference_state_dict(self) -> dict[str, Any]:
        """Heads, ρ and the membership are the test-time predictor's own parts."""
        out = dict(self.heads.state_dict(prefix="heads."))
        out["rho"], out["in_ensemble"] = self.rho.detach(), self.in_ensemble
        return out

    def diagnostics(self) -> dict[str, float]:
        """Stages done, ensemble size, ρ and the last stage's mean boosting loss."""
        return {
            "stages": float(self.stages_done),
            "members": float(len(self._members)),
            "boost_rate": float(self.rho.detach()),
            "boost_loss": float(self.last_boost_loss),
        }
