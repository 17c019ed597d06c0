"""``g_blending``: Gradient-Blending (Wang, Tran, Feiszli, "What Makes Training Multi-Modal
Classification Networks Hard?", CVPR 2020, arXiv 1905.12681).

One head per modality on its encoder's features, plus the fusion head; the training loss is
``L = w_fusion * L_fusion + sum_m w_m * L_m``. The weights minimise the overfitting-to-generalisation
ratio: each candidate (every unimodal model, and the multimodal model) is copied and trained for N
epochs; with losses on the training (T) and validation (V) splits before (n) and after (n+N),
``G = L^V_n - L^V_{n+N}``, ``O = (L^V_{n+N} - L^T_{n+N}) - (L^V_n - L^T_n)`` and ``w ∝ G / O^2``,
normalised to sum 1. Online: re-estimated every super-epoch; offline: once, at the start.

No official code exists; this port follows the paper and the MultiBench / BalanceBenchmark
re-implementations. Deviations (negative gains get weight 0 instead of ``abs``; O floored; the
validation split, never test; estimation isolated from the main run's RNG) are in
``methods/g_blending.md``.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor
from torch.utils.data import DataLoader

from mmbalance.balancer import EpochContext, OptimizerFactory
from mmbalance.config import finite, need
from mmbalance.errors import ConfigError
from mmbalance.methods import register_method
from mmbalance.methods._config import HeadConfig
from mmbalance.methods._headed import HeadedBalancer
from mmbalance.methods._heads import UnimodalHeads, head_term
from mmbalance.methods._stages import (
    encode_modality,
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

__all__ = ["GBlending", "GBlendingConfig", "gblend_weights", "FUSION"]

FUSION = "fusion"  # key of the multimodal (fusion-head) loss among the blend weights
ESTIMATORS = ("delta", "final")


@dataclass(frozen=True)
class GBlendingConfig(HeadConfig):
    # online: re-estimate every super_epoch; offline: once at epoch 0; fixed: use `weights`
    mode: Literal["online", "offline", "fixed"] = "online"
    # n, epochs between re-estimations (BalanceBenchmark super_epoch; MultiBench gb_epoch 20)
    super_epoch: int = 10
    # N, epochs each candidate copy trains; None = the super-epoch, cut at the run's end
    estimate_epochs: int | None = None
    # delta: paper, w ∝ ΔG/ΔO²; final: MultiBench delta=False, w ∝ L^V_{n+N}/O_{n+N}²
    estimator: Literal["delta", "final"] = "delta"
    min_overfit: float = 1e-4  # floor on |O| (MultiBench's clamp), keeps w finite when O ≈ 0
    # cap on batches per estimation epoch and loss pass (None = whole splits)
    estimate_batches: int | None = None
    # mode=fixed: {modality | "fusion": w}; {} = uniform
    weights: Mapping[str, float] = field(default_factory=dict)
    head_hidden: int | None = None  # unimodal heads: linear (None) or 2-layer MLP of this width
    head_lr: float | None = None  # unimodal heads' learning rate (None = the run's lr)

    def check(self) -> None:
        need(self, self.super_epoch >= 1, "super_epoch", "an integer >= 1")
        epochs, batches = self.estimate_epochs, self.estimate_batches
        need(self, epochs is None or epochs >= 1, "estimate_epochs", "None or an integer >= 1")
        need(self, finite(self.min_overfit) and self.min_overfit > 0, "min_overfit", "a finite number > 0")
        need(self, batches is None or batches >= 1, "estimate_batches", "None or an integer >= 1")
        for key, w in self.weights.items():
            if not (finite(w) and w >= 0):
                raise ValueError(f"weights[{key!r}] must be a finite number >= 0, got {w!r}")
        need(self, not self.weights or sum(self.weights.values()) > 0, "weights", "not all 0")
        fixed_only = f"{{}}: only used with mode='fixed', not {self.mode!r}"
        need(self, not self.weights or self.mode == "fixed", "weights", fixed_only)


def gblend_weights(
    train_before: Sequence[float],
    val_before: Sequence[float],
    train_after: Sequence[float],
    val_after: Sequence[float],
    *,
    estimator: str = "delta",
    min_overfit: float = 1e-4,
) -> tuple[list[float] | None, list[float], list[float]]:
    """Blend weights from each candidate's losses before (n) and after (n+N) its short training.

    ``delta`` (paper): ``G = L^V_n - L^V_{n+N}``, ``O = (L^V_{n+N} - L^T_{n+N}) - (L^V_n - L^T_n)``,
    ``w = max(G, 0) / max(|O|, min_overfit)^2``. ``final`` (MultiBench ``delta=False``):
    ``G = L^V_{n+N}``, ``O = L^V_{n+N} - L^T_{n+N}``, ``w = G / max(O, min_overfit)^2``.
    Weights are normalised to sum 1.

    Returns:
        ``(weights, G, O)``; ``weights`` is ``None`` when no candidate has a positive weight (no
        candidate generalised better after training), in which case the caller keeps its weights.
    """
    n = len(train_before)
    if not (len(val_before) == len(train_after) == len(val_after) == n) or n == 0:
        raise ConfigError(
            "train_before, val_before, train_after, val_after must have one loss per candidate, got lengths "
            f"{len(train_before)}, {len(val_before)}, {len(train_after)}, {len(val_after)}"
        )
    if estimator not in ESTIMATORS:
        raise ConfigError(f"estimator must be one of {ESTIMATORS}, got {estimator!r}")
    gains, overfits, raw = [], [], []
    for lt0, lv0, lt1, lv1 in zip(train_before, val_before, train_after, val_after, strict=True):
        if estimator == "delta":
            g = lv0 - lv1
            o = (lv1 - lt1) - (lv0 - lt0)
            w = max(g, 0.0) / max(abs(o), min_overfit) ** 2
        else:
            g = lv1
            o = lv1 - lt1
            w = g / max(o, min_overfit) ** 2
        gains.append(g)
        overfits.append(o)
        raw.append(w)
    total = sum(raw)
    if not (total > 0 and math.isfinite(total)):
        return None, gains, overfits
    return [w / total for w in raw], gains, overfits


@register_method("g_blending")
class GBlending(HeadedBalancer):
    """Gradient-Blending: per-modality heads and OGR-optimal loss weights, re-estimated on validation."""

    Config = GBlendingConfig
    paper = "Wang et al., CVPR 2020"
    presets = {
        # Not from the paper: the 8-epoch synthetic benchmark's budget (two estimates of one epoch each).
        "synthetic": {"super_epoch": 4, "estimate_epochs": 1},
    }

    heads_detach = False  # each unimodal loss trains its encoder (L = Σ w_m L_m + w_fusion L_fusion)

    def setup(self, model: MultimodalModel, task: Task, optimizer_factory: OptimizerFactory) -> None:
        super().setup(model, task, optimizer_factory)
        cfg = self.config
        if FUSION in self.modalities:
            raise ConfigError(
                f"g_blending reserves the weight key {FUSION!r}; a modality has that name: {self.modalities}"
            )
        self.candidates: tuple[str, ...] = (*self.modalities, FUSION)
        self._optimizer_factory = optimizer_factory
        if cfg.mode == "fixed" and cfg.weights:
            unknown = set(cfg.weights) - set(self.candidates)
            missing = set(self.candidates) - set(cfg.weights)
            if unknown or missing:
                raise ConfigError(
                    f"weights must have exactly the keys {list(self.candidates)} "
                    f"(modalities and {FUSION!r}); "
                    f"unknown {sorted(unknown)}, missing {sorted(missing)}"
                )
            initial = [float(cfg.weights[c]) for c in self.candidates]
        else:
            initial = [1.0 / len(self.candidates)] * len(self.candidates)
        k = len(self.candidates)
        # float64, as the re-implementations' Python-float weights; applied in each loss's dtype
        self.register_buffer("blend_weights", torch.tensor(initial, dtype=torch.float64))
        # G and O of the last estimate (zeros before the first; `estimates` counts them).
        self.register_buffer("last_gain", torch.zeros(k, dtype=torch.float64))
        self.register_buffer("last_overfit", torch.zeros(k, dtype=torch.float64))
        self.register_buffer("estimates", torch.zeros((), dtype=torch.long))
        self.register_buffer("degenerate_estimates", torch.zeros((), dtype=torch.long))
        self._extra_steps = 0

    # -- the step -----------------------------------------------------------------------------------
    def loss_terms(self, output: ModelOutput, batch: Mapping[str, Tensor], task: Task) -> dict[str, Tensor]:
        """``w_fusion * L_fusion`` and ``w_m * L_m`` for every modality (heads read un-detached
        features). Each weight is cast to its loss's dtype, as a Python-float weight times a loss
        tensor is in the re-implementations: a float32 loss gets the float32-rounded weight, a
        float64 loss the exact one."""
        target = batch["target"]
        predictions = self.unimodal_predictions(output, batch)
        w = self.blend_weights
        fused = task.loss(output.prediction, target)
        terms = {"task": w[-1].to(fused.dtype) * fused}
        for i, m in enumerate(self.modalities):
            loss = task.loss(predictions[m], target)
            terms[head_term(m)] = w[i].to(loss.dtype) * loss
        return terms

    # -- weight estimation ----------------------------------------------------------------------------
    def on_train_epoch_start(self, ctx: EpochContext) -> None:
        """Re-estimate the weights at epoch 0 (offline) or every ``super_epoch`` epochs (online)."""
        cfg = self.config
        if cfg.mode == "fixed":
            return
        due = ctx.epoch == 0 if cfg.mode == "offline" else ctx.epoch % cfg.super_epoch == 0
        if due:
            self.estimate(ctx)

    def estimate(self, ctx: EpochContext) -> list[float]:
        """Train a copy of each candidate for N epochs, measure G and O, update the blend weights.

        Runs under a forked RNG with private loaders, so the main run's random stream is untouched.
        Returns the weights in use afterwards (the previous ones if the estimate is degenerate).
        """
        cfg = self.config
        epochs = cfg.estimate_epochs or max(1, min(cfg.super_epoch, ctx.num_epochs - ctx.epoch))
        losses: list[tuple[float, float, float, float]] = []
        with isolated_rng(ctx.device):
            train_eval = stage_loader(ctx.train_loader, shuffle=False, seed=stage_seed(ctx.epoch))
            for index, candidate in enumerate(self.candidates):
                train = stage_loader(ctx.train_loader, shuffle=True, seed=stage_seed(ctx.epoch, index + 1))
                losses.append(self._measure(candidate, ctx, train, train_eval, epochs))
        weights, gains, overfits = gblend_weights(
            *zip(*losses, strict=True), estimator=cfg.estimator, min_overfit=cfg.min_overfit
        )
        self.last_gain.copy_(torch.tensor(gains, dtype=torch.float64))
        self.last_overfit.copy_(torch.tensor(overfits, dtype=torch.float64))
        self.estimates += 1
        if weights is None:
            self.degenerate_estimates += 1
        else:
            self.blend_weights.copy_(torch.tensor(weights, dtype=torch.float64))
        return self.blend_weights.tolist()

    def _measure(
        self, candidate: str, ctx: EpochContext, train: DataLoader, train_eval: DataLoader, epochs: int
    ) -> tuple[float, float, float, float]:
        """``(L^T_n, L^V_n, L^T_{n+N}, L^V_{n+N})`` of a copy of ``candidate`` trained for ``epochs``."""
        task, cap = ctx.task, self.config.estimate_batches
        model: MultimodalModel = copy.deepcopy(ctx.model)
        heads: UnimodalHeads = copy.deepcopy(self.heads)
        if not heads.built:
            with torch.no_grad(), eval_mode(model):
                first = next(iterate(train_eval, ctx.to_device, 1))
                heads(model.encode(first)[0], target_size(first))
        if candidate == FUSION:
            params = [p for p in model.parameters() if p.requires_grad]

            def loss_fn(batch: dict[str, Tensor]) -> Tensor:
                return task.loss(model(batch).prediction, batch["target"])

        else:
            head = heads.heads[candidate]
            params = list(model.modality_parameters(candidate)) + list(head.parameters())

            def loss_fn(batch: dict[str, Tensor]) -> Tensor:
                feature = encode_modality(model, candidate, batch)
                return task.loss(head(feature, target_size(batch)), batch["target"])

        def losses() -> tuple[float, float]:
            """(training, validation) loss of the candidate in eval mode."""
            with eval_mode(model, heads):
                train_loss = mean_loss(loss_fn, train_eval, ctx.to_device, cap)
                return train_loss, mean_loss(loss_fn, ctx.val_loader, ctx.to_device, cap)

        optimizer = self._optimizer_factory(params)
        before = losses()
        model.train()
        heads.train()
        for _ in range(epochs):
            self._extra_steps += train_pass(loss_fn, optimizer, train, ctx.to_device, cap)
        after = losses()
        return before[0], before[1], after[0], after[1]

    def diagnostics(self) -> dict[str, float]:
        out: dict[str, float] = {}
        estimated = int(self.estimates) > 0
        for i, c in enumerate(self.candidates):
            out[f"w/{c}"] = float(self.blend_weights[i])
            out[f"gain/{c}"] = float(self.last_gain[i]) if estimated else math.nan
            out[f"overfit/{c}"] = float(self.last_overfit[i]) if estimated else math.nan
        out["estimates"] = float(self.estimates)
        out["degenerate_estimates"] = float(self.degenerate_estimates)
        return out
