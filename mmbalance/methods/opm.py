"""``opm``: On-the-fly Prediction Modulation (Wei, Hu, Du, Wen, TPAMI 2024).

Each training step, per-modality confidence scores ``s_u = Σ_i p(y_i | x_i^u)`` give discrepancy
ratios ``ρ_u``; every modality with ``ρ_u > 1`` gets the drop probability
``q_u = clip(q_base · (1 + λ · tanh(ρ_u − 1)), 0, 1)`` (the others 0). With probability ``p_exe`` per
batch, each sample's feature of modality u is dropped (zeroed before fusion) with probability
``q_u``, and all fusion inputs are rescaled by ``1 / (1 − θ)``, ``θ = Σ_u d_u q_u / Σ_u d_u``, so the
dominant modality weighs less in the feed-forward pass. No drop in the warm-up epochs.

Port of ``GeWu-Lab/BML_TPAMI2024:code/models/Classifier.py`` (``calcu_q``, ``Modality_drop``) and
``code/main.py`` (``train``, warm-up). Deviations (details in ``methods/opm.md``): unimodal
predictions come from our own linear heads on detached encoder features (as ``ogm_ge``), not from
slices of a concat fusion layer; more than two modalities use the pairwise-average ratio of
OGM-GE#16; regression and segmentation use ``s_u = Σ_i exp(−ℓ_i)``; ``d_u`` is the per-sample
size of modality u's feature.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor

from mmbalance.balancer import EpochContext, OptimizerFactory
from mmbalance.config import finite, need
from mmbalance.methods import register_method
from mmbalance.methods._config import HeadConfig
from mmbalance.methods._headed import HeadedBalancer
from mmbalance.methods._stages import target_size
from mmbalance.methods.ogm_ge import confidence_score, pairwise_ratios
from mmbalance.models.base import ModelOutput, MultimodalModel

__all__ = ["OPM", "OPMConfig", "drop_probabilities", "rescale_factor", "keep_mask"]

_PREDICTIONS = "opm.unimodal"  # ModelOutput.extras key of the heads' predictions


@dataclass(frozen=True)
class OPMConfig(HeadConfig):
    q_base: float = 0.5  # q_base, base drop probability of a dominant modality (train_opm.sh --q_base)
    lam: float = 0.5  # λ: q = q_base · (1 + λ · tanh(ρ − 1)) (train_opm.sh --lam)
    p_exe: float = 0.7  # probability that a batch is modulated at all (train_opm.sh --p_exe)
    warmup_epochs: int = 6  # epochs without dropping (main.py: warm_up = epoch <= 5)
    score: Literal["confidence", "task"] = "confidence"  # s_u: Σ p(y|x^u) (Σ exp(−ℓ) reg/seg) or task.score
    head_lr: float | None = None  # LR of the unimodal heads (None = the run's LR)
    head_hidden: int | None = None  # None: linear heads, like the official split of a linear fusion head
    sequence_pool: str = "mean"  # pooling of (B, L, d) features for the heads

    def check(self) -> None:
        need(self, 0.0 <= self.q_base <= 1.0, "q_base", "in [0, 1]")
        need(self, finite(self.lam) and self.lam >= 0, "lam", "a finite number >= 0")
        need(self, 0.0 <= self.p_exe <= 1.0, "p_exe", "in [0, 1]")
        need(self, self.warmup_epochs >= 0, "warmup_epochs", "an integer >= 0")


# -- the arithmetic, as pure functions (hand-checked in tests/methods/test_opm.py) ------------------
def drop_probabilities(ratios: Tensor, q_base: float, lam: float) -> Tensor:
    """``calcu_q``: ``q_u = clip(q_base · (1 + λ · tanh(ρ_u − 1)), 0, 1)`` where ``ρ_u > 1``, else 0."""
    q = (q_base * (1 + lam * torch.tanh(ratios - 1))).clamp(0.0, 1.0)
    return torch.where(ratios > 1, q, torch.zeros_like(q))


def rescale_factor(q: Tensor, sizes: Tensor) -> Tensor:
    """``1 / (1 − θ)`` with ``θ = Σ_u d_u q_u / Σ_u d_u``, the expected dropped share of the fusion
    input (``Modality_drop.execute_drop``). θ < 1 whenever some modality has q = 0, which the ratio
    rule guarantees (the lowest-scoring modality has ρ ≤ 1)."""
    sizes = sizes.to(q.dtype)
    theta = (sizes * q).sum() / sizes.sum()
    return 1.0 / (1.0 - theta)


def keep_mask(q: Tensor, batch_size: int, p_exe: float) -> tuple[Tensor, Tensor]:
    """``(keep (B, M) bool, executed 0-d bool)``: with probability ``p_exe`` the batch is modulated
    and sample i keeps modality u with probability ``1 − q_u``; otherwise every modality is kept.
    Drawn on ``q``'s device from the global RNG (no host sync)."""
    executed = torch.rand((), device=q.device) < p_exe
    keep = torch.rand(batch_size, q.shape[0], device=q.device) >= q
    return keep | ~executed, executed


@register_method("opm")
class OPM(HeadedBalancer):
    """OPM: drop the dominant modality's features before fusion, with a probability from its ratio."""

    Config = OPMConfig
    presets = {
        # code/scripts/train_opm.sh (Kinetics-Sounds, concat fusion; main.py warm-up of 6 epochs)
        "kinetics_sounds": {"q_base": 0.5, "lam": 0.5, "p_exe": 0.7, "warmup_epochs": 6},
        # Not from the paper: the 8-epoch synthetic benchmark, warm-up scaled from 6 of 100 epochs.
        "synthetic": {"warmup_epochs": 1},
    }
    paper = "Wei et al., TPAMI 2024 (GeWu-Lab/BML_TPAMI2024)"

    def setup(self, model: MultimodalModel, task: Any, optimizer_factory: OptimizerFactory) -> None:
        super().setup(model, task, optimizer_factory)
        self._epoch = 0
        self._sizes: dict[tuple[Any, ...], Tensor] = {}

    def on_train_epoch_start(self, ctx: EpochContext) -> None:
        """Remember the epoch: the warm-up decides in ``forward_step``, which has no epoch argument."""
        self._epoch = ctx.epoch

    def _drops(self) -> bool:
        return self._epoch >= self.config.warmup_epochs and self.config.p_exe > 0

    def _scores(self, predictions: Mapping[str, Tensor], target: Tensor) -> Tensor:
        task, ordered = self.task, [predictions[m] for m in self.modalities]
        with torch.no_grad():
            if self.config.score == "task":
                return torch.stack([task.score(p.float(), target).float() for p in ordered])
            return torch.stack([confidence_score(p, target, task) for p in ordered])

    def _feature_sizes(self, features: Mapping[str, Tensor]) -> Tensor:
        """``d_u``: per-sample size of each feature, on its device (cached per shape)."""
        first = features[self.modalities[0]]
        key = (first.device, *(tuple(features[m].shape[1:]) for m in self.modalities))
        if key not in self._sizes:
            sizes = [features[m][0].numel() for m in self.modalities]
            self._sizes[key] = torch.tensor(sizes, device=first.device)
        return self._sizes[key]

    def forward_step(self, model: MultimodalModel, batch: Mapping[str, Tensor]) -> ModelOutput:
        """Encode; score each modality with its head (detached features); drop and rescale the
        fusion inputs (training only, after warm-up). ``output.features`` keeps the encoder outputs."""
        cfg: OPMConfig = self.config
        features, extras = model.encode(batch)
        predictions = self.heads(features, target_size(batch))
        extras[_PREDICTIONS] = predictions
        scores = self._scores(predictions, batch["target"])
        ratios = pairwise_ratios(scores)
        q = drop_probabilities(ratios, cfg.q_base, cfg.lam)
        batch_size = features[self.modalities[0]].shape[0]
        if not self._drops():
            zero = torch.zeros_like(q)
            self.epoch_means.update(q=q, ratio=ratios, score=scores, dropped=zero, executed=zero.sum())
            return model.fuse(features, extras)
        keep, executed = keep_mask(q, batch_size, cfg.p_exe)
        scale = torch.where(executed, rescale_factor(q, self._feature_sizes(features)), torch.ones_like(q[0]))
        fused_in = {}
        for i, m in enumerate(self.modalities):
            f = features[m]
            factor = keep[:, i].to(f.dtype) * scale.to(f.dtype)
            fused_in[m] = f * factor.reshape((-1,) + (1,) * (f.dim() - 1))
        dropped = (~keep).float().mean(dim=0)
        self.epoch_means.update(q=q, ratio=ratios, score=scores, dropped=dropped, executed=executed.float())
        out = model.fuse(fused_in, extras)
        out.features = features
        return out

    def unimodal_predictions(self, output: ModelOutput, batch: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """The heads' predictions computed in ``forward_step`` (each head runs once per step)."""
        return output.extras[_PREDICTIONS]

    def diagnostics(self) -> dict[str, float]:
        """Epoch means of ``q/<m>``, ``ratio/<m>``, ``score/<m>`` (batch sum), ``dropped/<m>`` (share of
        samples whose feature was dropped) and ``executed`` (share of modulated batches)."""
        return self.epoch_means.pop()
