"""``pmr``: Prototypical Modal Rebalance (Fan, Xu, Wang, Wang, Guo; CVPR 2023).

Class prototypes ``c_m^k`` (mean encoder feature of modality m over the samples of class k) are
recomputed at every epoch start from ~10 % of the training batches, with an EMA from the third
epoch on. Prototypical logits ``−‖z_m − c_m^k‖`` give a per-modality confidence
``s_m = Σ_i softmax(−d_m)_i[y_i]``; the slower modality (``ρ_m < 1``) gets the extra loss
``α · CE(−d_m, y)``, which accelerates its encoder without touching the dominant one.

Port of ``fanyunfeng-bit/Modal-Imbalance-PMR:main_Prototype_grad.py`` (``train_epoch``,
``calculate_prototype``, ``main``). Deviations (``methods/pmr.md``): prototypes of classes absent
from the sampled batches keep their previous value instead of becoming NaN; the 10 % subset is drawn
by a private seeded loader so the main loop's shuffling is untouched; prototypes always come from
the training split (the official AVE and CGMNIST runs read the validation and test splits);
prototypes, distances, scores and the ratio are float64 (official: float32 buffers); more than two
modalities use the pairwise-average ratio of OGM-GE#16. Classification only (prototypes need class
labels).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from mmbalance.balancer import Balancer, EpochContext, OptimizerFactory
from mmbalance.config import need
from mmbalance.errors import ConfigError, ShapeError
from mmbalance.methods import register_method
from mmbalance.methods._config import ModulationWindow
from mmbalance.methods._stages import eval_mode, iterate, stage_loader
from mmbalance.methods.ogm_ge import pairwise_ratios
from mmbalance.models.base import ModelOutput, MultimodalModel
from mmbalance.models.features import SEQUENCE_POOLS, pool_features

__all__ = ["PMR", "PMRConfig", "class_prototypes", "prototype_logits", "pmr_weights"]


@dataclass(frozen=True)
class PMRConfig(ModulationWindow):
    alpha: float = 1.0  # α: weight of the slower modality's prototypical CE (--alpha)
    # μ: c ← (1 − μ) c_new + μ c_old from the third prototype update on (--momentum_coef)
    momentum_coef: float = 0.2
    # first epoch with the prototype loss (0-based, inclusive; --modulation_starts)
    modulation_starts: int = 0
    modulation_ends: int = 100  # last epoch with the prototype loss (inclusive; --modulation_ends)
    # share of training batches per prototype update (official: len // 10, at least 1)
    proto_fraction: float = 0.1
    sequence_pool: str = "mean"  # pooling of (B, L, d) features into the embedding z_m

    def check(self) -> None:
        need(self, self.alpha >= 0, "alpha", ">= 0")
        need(self, 0.0 <= self.momentum_coef < 1.0, "momentum_coef", "in [0, 1)")
        need(self, 0.0 < self.proto_fraction <= 1.0, "proto_fraction", "in (0, 1]")
        need(self, self.sequence_pool in SEQUENCE_POOLS, "sequence_pool", f"one of {SEQUENCE_POOLS}")


# -- the arithmetic (hand-checked in tests/methods/test_pmr.py) -------------------------------------
def class_prototypes(embeddings: Tensor, labels: Tensor, num_classes: int) -> tuple[Tensor, Tensor]:
    """Per-class sums and counts, in float64: ``(K, d)`` sums of ``embeddings (N, d)`` by
    ``labels (N,)``, and ``(K,)`` counts. A one-hot matmul (deterministic on every device, unlike
    ``index_add_``)."""
    onehot = F.one_hot(labels.long(), num_classes).double()  # (N, K)
    return onehot.t() @ embeddings.double(), onehot.sum(dim=0)


def prototype_logits(embedding: Tensor, prototypes: Tensor) -> Tensor:
    """``−‖z_i − c_k‖₂`` for ``embedding (B, d)`` and ``prototypes (K, d)``: ``(B, K)`` float64.

    Each distance is the root of the summed squared differences (``EU_dist``: ``sqrt(dot(x − c,
    x − c))``), never ``‖z‖² + ‖c‖² − 2 z·c``, which cancels catastrophically for features close to
    a prototype (``torch.cdist``'s default for batches over 25)."""
    z, c = embedding.double().unsqueeze(0), prototypes.double().unsqueeze(0)
    return -torch.cdist(z, c, compute_mode="donot_use_mm_for_euclid_dist").squeeze(0)


def pmr_weights(scores: Tensor, alpha: float) -> Tensor:
    """Loss weights of the prototypical CE: α for every modality with ``ρ_m < 1`` (slower than the
    others), 0 otherwise. For two modalities this is the official ``(β, λ) = (0, α)`` if
    ``s_a / s_v > 1``, ``(α, 0)`` if ``< 1``, ``(0, 0)`` on a tie."""
    ratios = pairwise_ratios(scores)
    return torch.where(ratios < 1, torch.full_like(ratios, alpha), torch.zeros_like(ratios))


def _make_prototype_buffers(module: PMR, state_dict: Mapping[str, Any], prefix: str, *args: Any) -> None:
    """Load pre-hook: create prototype buffers of the saved shapes (a fresh balancer has none)."""
    for m in module.modalities:
        key = f"{prefix}proto_{m}"
        current = module._proto(m)
        if key in state_dict and (current is None or current.shape != state_dict[key].shape):
            module.register_buffer(f"proto_{m}", torch.empty_like(state_dict[key]))


@register_method("pmr")
class PMR(Balancer):
    """PMR: accelerate the slower modality with a prototype-based cross-entropy."""

    Config = PMRConfig
    presets = {
        # bash.sh, main_Prototype_grad.py, concat fusion
        "cremad": {"alpha": 2.0, "momentum_coef": 0.0, "modulation_ends": 70},
        # AVE: calculate_prototype passes over a whole loader (the official one is the validation
        # loader; ours is always the training split, see methods/pmr.md)
        "ave": {"alpha": 2.0, "momentum_coef": 0.0, "modulation_ends": 70, "proto_fraction": 1.0},
        "cgmnist": {"alpha": 1.0, "momentum_coef": 0.0, "modulation_ends": 60},
    }
    tasks = frozenset({"cls"})
    paper = "Fan et al., CVPR 2023 (fanyunfeng-bit/Modal-Imbalance-PMR)"

    def setup(self, model: MultimodalModel, task: Any, optimizer_factory: OptimizerFactory) -> None:
        super().setup(model, task, optimizer_factory)
        self.num_classes = int(task.num_outputs)
        self._epoch = 0
        self._updates = 0  # prototype updates so far (the EMA starts at the third)
        self.proto_batches = 0  # forward-only batches spent on prototypes (cost record)
        self.register_load_state_dict_pre_hook(_make_prototype_buffers)

    def host_state(self) -> dict[str, int]:
        """The epoch and the number of prototype updates so far (the EMA starts at the third)."""
        return {"epoch": self._epoch, "updates": self._updates, "proto_batches": self.proto_batches}

    def load_host_state(self, state: Mapping[str, Any]) -> None:
        self._epoch, self._updates = int(state["epoch"]), int(state["updates"])
        self.proto_batches = int(state["proto_batches"])

    # -- prototypes -------------------------------------------------------------------------------
    def _proto(self, m: str) -> Tensor | None:
        return getattr(self, f"proto_{m}", None)

    @torch.no_grad()
    def on_train_epoch_start(self, ctx: EpochContext) -> None:
        """Recompute the prototypes (eval mode, no grad) from a random ``proto_fraction`` of the
        training batches, as ``calculate_prototype`` does before epoch 0 and after every epoch. The
        batches come from a private shuffled loader with its own seeded generator, so the runner's
        loader and the global RNG are untouched."""
        self._epoch = ctx.epoch
        seed = (torch.initial_seed() + 1_000_003 * (ctx.epoch + 1)) % (2**63)
        loader = stage_loader(ctx.train_loader, shuffle=True, seed=seed)
        n_batches = max(1, math.floor(len(loader) * self.config.proto_fraction + 1e-9))
        sums: dict[str, Tensor] = {}
        counts: Tensor | None = None
        with eval_mode(ctx.model):
            for batch in iterate(loader, ctx.to_device, n_batches):
                features, _ = ctx.model.encode(batch)
                for m in self.modalities:
                    z = pool_features(features[m], self.config.sequence_pool)
                    s, c = class_prototypes(z, batch["target"], self.num_classes)
                    sums[m] = s if m not in sums else sums[m] + s
                counts = c if counts is None else counts + c
        self.proto_batches += min(n_batches, len(loader))
        if counts is None:
            raise ConfigError("pmr: the training loader yields no batch; prototypes need at least one")
        seen = (counts > 0)[:, None]
        ema = self._updates >= 2 and self.config.momentum_coef > 0
        for m in self.modalities:
            new = sums[m] / counts.clamp_min(1)[:, None]
            old = self._proto(m)
            if old is None or old.shape != new.shape:
                old = torch.zeros_like(new)
            new = torch.where(seen, new, old)  # unseen classes keep their previous prototype
            if ema:
                mu = self.config.momentum_coef
                new = (1 - mu) * new + mu * old
            self.register_buffer(f"proto_{m}", new)
        self._updates += 1

    # -- training step ----------------------------------------------------------------------------
    def loss_terms(self, output: ModelOutput, batch: Mapping[str, Tensor], task: Any) -> dict[str, Tensor]:
        target = batch["target"]
        terms = {"task": task.loss(output.prediction, target)}
        cfg: PMRConfig = self.config
        if not cfg.modulates(self._epoch):
            return terms
        losses, scores = [], []
        for m in self.modalities:
            proto = self._proto(m)
            if proto is None:
                raise ConfigError("pmr: prototypes are computed in on_train_epoch_start, which has not run")
            z = pool_features(output.features[m], cfg.sequence_pool)
            if z.shape[-1] != proto.shape[-1]:
                raise ShapeError(
                    f"pmr: features[{m!r}] have width {z.shape[-1]}, prototypes {proto.shape[-1]}"
                )
            logits = prototype_logits(z, proto)
            losses.append(F.cross_entropy(logits, target.long()))
            with torch.no_grad():
                scores.append(F.softmax(logits, dim=1).gather(1, target.long().reshape(-1, 1)).sum())
        weights = pmr_weights(torch.stack(scores), cfg.alpha)  # scores, ratios, weights: float64
        terms["proto"] = (weights * torch.stack(losses)).sum().to(output.prediction.dtype)
        self.epoch_means.update(proto_weight=weights, ratio=pairwise_ratios(torch.stack(scores)))
        return terms

    def diagnostics(self) -> dict[str, float]:
        """Epoch means of the prototype-loss weight (``proto_weight/<m>``) and ratio ρ_m
        (``ratio/<m>``), and the prototype batches so far (``proto_batches``)."""
        return {"proto_batches": float(self.proto_batches), **self.epoch_means.pop()}
