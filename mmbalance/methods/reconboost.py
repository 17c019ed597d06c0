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

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mmbalance.balancer import Balancer, EpochContext, OptimizerFactory, StepContext
from mmbalance.errors import ConfigError, ShapeError
from mmbalance.methods import register_method
from mmbalance.methods._grads import step_auxiliary
from mmbalance.methods._heads import SEQUENCE_POOLS, UnimodalHeads, feature_kind
from mmbalance.methods._stages import (
    encode_modality,
    eval_mode,
    isolated_rng,
    iterate,
    stage_loader,
    stage_seed,
    target_size,
)
from mmbalance.models.base import ModelOutput, MultimodalModel
from mmbalance.tasks import Task

__all__ = ["ReconBoost", "ReconBoostConfig", "boosting_loss", "consolidation_loss", "stage_modality"]

SHARED = "shared"


@dataclass(frozen=True)
class ReconBoostConfig:
    weight1: float = 5.0  # w₁, weight of the learner's own log-likelihood (train.py --weight1; CREMA-D 5)
    weight2: float = 1.0  # w₂, reconcilement weight on the ensemble's confidence q (--weight2)
    boost_epochs: int = 4  # passes over the training split in each stage's boosting phase (--epochs_per_stage)
    correct_epochs: int = 4  # runner epochs of global rectification per stage (--correct_epoch)
    boost_rate: float = 1.0  # ρ at the start, learnt during rectification (DynamicNet.boost_rate, --boost_rate)
    boost_lr: float | None = None  # LR of the boosting optimizer (official m_lr 0.01 with SGD); None = the run's LR
    shared_head: bool = True  # one head for all modalities (--common_space True); False: a head per modality
    head_hidden: int | None = 256  # H = Linear(d, 256) -> ReLU -> Linear(256, K) (dynamic_net.Head); None: Linear
    alpha: float = 0.5  # α, weight of the memory-consolidation term (--alpha); only with consolidation_grad
    consolidation_grad: bool = False  # False = official (both operands detached: no effect, not computed)
    boost_batches: int | None = None  # cap on batches per boosting pass (None = the whole split)
    sequence_pool: str = "mean"  # pooling of (B, L, d) features for the head

    def __post_init__(self) -> None:
        def finite(name: str) -> float:
            value = getattr(self, name)
            if not (isinstance(value, int | float) and math.isfinite(value)):
                raise ValueError(f"{name} must be a finite number, got {value!r}")
            return float(value)

        if not finite("weight1") > 0:
            raise ValueError(f"weight1 must be > 0, got {self.weight1!r}")
        if not 0 <= finite("weight2") <= self.weight1:
            raise ValueError(
                f"weight2 must be in [0, weight1={self.weight1}] (above weight1 the loss is unbounded below), "
                f"got {self.weight2!r}"
            )
        for name in ("boost_epochs", "correct_epochs"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if not finite("boost_rate") > 0:
            raise ValueError(f"boost_rate must be > 0, got {self.boost_rate!r}")
        if self.boost_lr is not None and not self.boost_lr > 0:
            raise ValueError(f"boost_lr must be None or > 0, got {self.boost_lr!r}")
        if self.head_hidden is not None and (not isinstance(self.head_hidden, int) or self.head_hidden < 1):
            raise ValueError(f"head_hidden must be None or an integer >= 1, got {self.head_hidden!r}")
        if not finite("alpha") >= 0:
            raise ValueError(f"alpha must be >= 0, got {self.alpha!r}")
        if self.boost_batches is not None and (not isinstance(self.boost_batches, int) or self.boost_batches < 1):
            raise ValueError(f"boost_batches must be None or an integer >= 1, got {self.boost_batches!r}")
        if self.sequence_pool not in SEQUENCE_POOLS:
            raise ValueError(f"sequence_pool must be one of {SEQUENCE_POOLS}, got {self.sequence_pool!r}")


# -- the arithmetic, as pure functions (hand-checked in tests/methods/test_reconboost.py) -----------
def stage_modality(stage: int, modalities: tuple[str, ...]) -> str:
    """Round robin in the model's modality order (``schedule.py``, fixed mode)."""
    return modalities[stage % len(modalities)]


def boosting_loss(
    prediction: Tensor, others: Tensor | None, target: Tensor, task: Task, weight1: float, weight2: float
) -> Tensor:
    """The reconcilement loss of the learner being boosted.

    cls (official): ``mean_i [ −w₁ mean_k(y_ik log p_ik) + w₂ mean_k(y_ik q_ik log p_ik) ]`` with
    one-hot ``y``, ``p = softmax(prediction)``, ``q = softmax(others)`` (no gradient), i.e.
    ``mean_i (w₂ q_i,y − w₁) log p_i,y / K``. reg / seg (adaptation): ``mean_i (w₁ − w₂ q_i) ℓ_i / K``
    with the per-sample task loss ``ℓ_i`` of the learner and ``q_i = exp(−ℓ_i(others))`` (for
    unsmoothed CE, the same formula). ``others=None`` (no other member yet) is ``q = 1``, as the
    official empty-ensemble constant ``c0`` gives ``softmax`` of one column.
    """
    k = int(prediction.shape[1])
    if others is not None and others.shape != prediction.shape:
        raise ShapeError(f"others {tuple(others.shape)} and prediction {tuple(prediction.shape)} differ")
    if task.name == "cls":
        y = target.long().reshape(-1, 1)
        log_p = F.log_softmax(prediction.float(), dim=1).gather(1, y).squeeze(1)
        q = torch.ones_like(log_p) if others is None else F.softmax(others.detach().float(), dim=1).gather(1, y).squeeze(1)
        return ((weight2 * q - weight1) * log_p).mean() / k
    loss = task.loss(prediction.float(), target, reduction="none")
    if others is None:
        q = torch.ones_like(loss)
    else:
        with torch.no_grad():
            q = torch.exp(-task.loss(others.detach().float(), target, reduction="none"))
    return ((weight1 - weight2 * q) * loss).mean() / k


def consolidation_loss(prediction: Tensor, previous: Tensor, task_name: str) -> Tensor:
    """``MSE(softmax(prediction), softmax(previous))`` over the class dim (raw values for regression);
    ``previous`` carries no gradient. (Official: both operands detached.)"""
    if task_name == "reg":
        return F.mse_loss(prediction.float(), previous.detach().float())
    return F.mse_loss(F.softmax(prediction.float(), dim=1), F.softmax(previous.detach().float(), dim=1))


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
    tasks = frozenset({"cls", "reg", "seg"})
    min_modalities = 2
    max_modalities = None
    paper = (
        "Hua, Xu, Bao, Yang, Huang. ReconBoost: Boosting Can Achieve Modality Reconcilement. ICML 2024 "
        "(huacong/ReconBoost)"
    )
    grad_edit_scope = frozenset()

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
        self._extra_steps = 0
        # A state loaded after a stage (a resume) needs the stage's optimizer to load its state into.
        self.register_load_state_dict_post_hook(lambda module, _keys: module._rectify_after_load())

    def _rectify_after_load(self) -> None:
        if self.rectify_optimizer is None and int(self.stages_done) > 0:
            self.rectify_optimizer = self._optimizer_factory(list(self.heads.parameters()) + [self.rho])

    def _load_from_state_dict(self, state_dict: Mapping[str, Any], prefix: str, *args: Any, **kwargs: Any) -> None:
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._members = [m for m, inside in zip(self.modalities, self.in_ensemble.tolist(), strict=True) if inside]

    # -- learners -------------------------------------------------------------------------------
    def _learner(self, m: str, feature: Tensor, size: tuple[int, int] | None) -> Tensor:
        """``f_m = H(φ_m(x_m))`` on a given encoder output."""
        if self.config.shared_head:
            return self.heads({SHARED: feature}, size)[SHARED]
        if not self.heads.built:
            raise ConfigError("reconboost: the per-modality heads are built by the first boosting stage, which has not run")
        return self.heads.heads[m](feature, size)

    def _ensemble(self, features: Mapping[str, Tensor], members: list[str], size: tuple[int, int] | None) -> Tensor | None:
        """``ρ Σ_{m∈members} f_m``, or None for no member."""
        total: Tensor | None = None
        for m in members:
            out = self._learner(m, features[m], size)
            total = out if total is None else total + out
        return None if total is None else self.rho * total

    def _ensure_heads(self, model: MultimodalModel, batch: Mapping[str, Tensor]) -> None:
        """Build the heads (lazily sized) from one batch's features; check a shared head fits all."""
        with torch.no_grad(), eval_mode(model):
            features = {m: encode_modality(model, m, batch) for m in self.modalities}
        layout = {m: (feature_kind(f, m), int(f.shape[1] if f.dim() == 4 else f.shape[-1])) for m, f in features.items()}
        if self.config.shared_head and len(set(layout.values())) != 1:
            raise ShapeError(
                f"reconboost shared_head=True needs every features[m] of the same kind and width, got {layout}; "
                "use shared_head=False for a head per modality"
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
        self._members = [m for m, inside in zip(self.modalities, self.in_ensemble.tolist(), strict=True) if inside]
        self.stages_done.fill_(stage + 1)
        params = list(self.heads.parameters()) + [self.rho]
        self.rectify_optimizer = self._optimizer_factory(params)

    def boost(self, ctx: EpochContext, stage: int, modality: str) -> float:
        """Train learner ``modality`` (its encoder and the head) for ``boost_epochs`` passes with the
        reconcilement loss against the other members; returns the mean boosting loss. Runs under a
        forked RNG with a private loader (the main loop's random stream and order are untouched)."""
        cfg: ReconBoostConfig = self.config
        model, task = ctx.model, ctx.task
        others = [m for m in self._members if m != modality]
        previous = stage_modality(stage - 1, self.modalities) if stage > 0 else None
        total: Tensor | None = None
        count = 0
        with isolated_rng(ctx.device):
            loader = stage_loader(ctx.train_loader, shuffle=True, seed=stage_seed(stage))
            if not self.heads.built:
                self._ensure_heads(model, next(iterate(loader, ctx.to_device, 1)))
            params = list(model.modality_parameters(modality)) + self._head_parameters(modality)
            optimizer = self._optimizer_factory(params, lr=cfg.boost_lr)
            other_encoders = [model.encoders[m] for m in others]
            for _ in range(cfg.boost_epochs):
                for batch in iterate(loader, ctx.to_device, cfg.boost_batches):
                    size = target_size(batch)
                    prediction = self._learner(modality, encode_modality(model, modality, batch), size)
                    with torch.no_grad(), eval_mode(*other_encoders):
                        rest = self._ensemble({m: encode_modality(model, m, batch) for m in others}, others, size)
                    loss = boosting_loss(prediction, rest, batch["target"], task, cfg.weight1, cfg.weight2)
                    if cfg.consolidation_grad and previous is not None and previous != modality and cfg.alpha > 0:
                        with torch.no_grad(), eval_mode(model.encoders[previous]):
                            before = self._learner(previous, encode_modality(model, previous, batch), size)
                        loss = loss + cfg.alpha * consolidation_loss(prediction, before, task.name)
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
                    self._extra_steps += 1
                    total = loss.detach().double() if total is None else total + loss.detach().double()
                    count += 1
            optimizer.zero_grad(set_to_none=True)
        if total is None:
            raise ConfigError("reconboost: the training loader yielded no batch for the boosting phase")
        self.last_boost_loss.copy_(total / count)
        return float(self.last_boost_loss)

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
            raise ConfigError("reconboost: no rectification optimizer; on_train_epoch_start has not run a stage")
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
