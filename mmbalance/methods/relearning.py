"""``relearning``: Diagnosing & Re-learning (Wei, Li, Feng, Hu; ECCV 2024).

After every ``reinit_epoch``-th epoch (at most ``reinit_num`` times) each modality's learning state is
diagnosed from the separability of its encoder features: k-means with k = number of classes on the
training features and on the validation features, the purity of each clustering, and
``gap_m = |purity_train − purity_val|``. Each encoder is then softly re-initialised toward its initial
weights, ``θ_m ← α_m θ_m^init + (1 − α_m) θ_m`` with ``α_m = tanh(λ · gap_m)``: a modality whose
representation separates the training data much better than unseen data (over-trained) is pulled back
further. Training itself is plain joint training.

Port of ``GeWu-Lab/Diagnosing_Relearning_ECCV2024:code/ours.py`` (``main``, ``get_feature``,
``reinit_score``, ``purity_score``, ``reinit``) and ``code/script/ours.sh``. Deviations
(``methods/relearning.md``): k-means is our seeded torch port of scikit-learn's on the device
(:mod:`mmbalance.methods._kmeans`); regression is diagnosed on the sign of the target (k = 2).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

from mmbalance.balancer import Balancer, EpochContext, OptimizerFactory
from mmbalance.config import finite, need
from mmbalance.errors import ConfigError
from mmbalance.methods import register_method
from mmbalance.methods._config import HeadConfig
from mmbalance.methods._kmeans import kmeans, minmax_scale, purity
from mmbalance.methods._stages import eval_mode, isolated_rng, iterate, stage_loader, stage_seed
from mmbalance.models.base import MultimodalModel
from mmbalance.models.features import pool_features

__all__ = ["Relearning", "RelearningConfig", "reinit_due", "reinit_strength", "soft_reinit_"]


@dataclass(frozen=True)
class RelearningConfig(HeadConfig):
    move_lambda: float = 3.0  # λ: α_m = tanh(λ · gap_m) (--move_lambda)
    reinit_epoch: int = 20  # diagnose after every reinit_epoch-th 0-based epoch, not 0 (--reinit_epoch)
    reinit_num: int = 3  # at most this many diagnoses and re-initialisations (--reinit_num)
    n_init: int = 1  # k-means restarts: KMeans' default n_init="auto" (1 with k-means++, scikit-learn >= 1.4)
    kmeans_seed: int = 0  # seed of every k-means run (KMeans(random_state=0))
    sequence_pool: str = "mean"  # pooling of (B, L, d) features into the clustered vectors

    def check(self) -> None:
        need(self, finite(self.move_lambda) and self.move_lambda >= 0, "move_lambda", "a finite number >= 0")
        need(self, self.reinit_epoch >= 1, "reinit_epoch", "an integer >= 1")
        need(self, self.reinit_num >= 0, "reinit_num", "an integer >= 0")
        need(self, self.n_init >= 1, "n_init", "an integer >= 1")


# -- the arithmetic, as pure functions (hand-checked in tests/methods/test_relearning.py) -------------
def reinit_due(finished_epoch: int, reinit_epoch: int) -> bool:
    """Whether a diagnosis follows 0-based epoch ``finished_epoch``: ``epoch % reinit_epoch == 0 and
    epoch > 0`` (``ours.py``), i.e. after epochs R, 2R, 3R, ..."""
    return finished_epoch > 0 and finished_epoch % reinit_epoch == 0


def reinit_strength(purity_train: float, purity_val: float, move_lambda: float) -> float:
    """``α = tanh(λ · |purity_train − purity_val|)``."""
    return math.tanh(move_lambda * abs(purity_train - purity_val))


@torch.no_grad()
def soft_reinit_(params: list[nn.Parameter], initial: list[Tensor], alpha: float) -> None:
    """In place ``θ ← α θ_init + (1 − α) θ`` for every parameter (one ``_foreach`` pass each)."""
    torch._foreach_mul_(params, 1.0 - alpha)
    torch._foreach_add_(params, initial, alpha=alpha)


@register_method("relearning")
class Relearning(Balancer):
    """Diagnose each encoder by train/val clustering purity; softly re-initialise it accordingly."""

    Config = RelearningConfig
    presets = {
        "cremad": {"move_lambda": 3.0, "reinit_epoch": 20, "reinit_num": 3},  # code/script/ours.sh, 90 epochs
        "synthetic": {"reinit_epoch": 2, "reinit_num": 2},  # not from the paper: 8 epochs, after 2 and 4
    }
    tasks = frozenset({"cls", "reg"})
    paper = "Wei et al., ECCV 2024 (GeWu-Lab/Diagnosing_Relearning_ECCV2024)"

    def setup(self, model: MultimodalModel, task: Any, optimizer_factory: OptimizerFactory) -> None:
        """Keep a copy of every encoder's initial parameters (a buffer, so it is saved and follows the
        device), as the official ``init_para.pkl`` saved right after the model is built."""
        super().setup(model, task, optimizer_factory)
        self.num_clusters = int(task.num_outputs) if task.name == "cls" else 2
        self._params = {m: model.modality_parameters(m) for m in self.modalities}
        for m, params in self._params.items():
            self.register_buffer(f"init_{m}", torch.cat([p.detach().reshape(-1) for p in params]).clone())
        self.diagnoses = 0  # the official flag_reinit: due epochs seen so far
        self._stats: dict[str, float] = {}

    def initial_parameters(self, modality: str) -> list[Tensor]:
        """Views of the stored initial parameters of ``modality``'s encoder, shaped like the parameters."""
        params = self._params[modality]
        flat = getattr(self, f"init_{modality}")
        return [v.view_as(p) for v, p in zip(flat.split([p.numel() for p in params]), params, strict=True)]

    # -- epoch level ------------------------------------------------------------------------------------
    def on_train_epoch_start(self, ctx: EpochContext) -> None:
        """After a due epoch (the previous one), diagnose and re-initialise, before this epoch trains."""
        cfg: RelearningConfig = self.config
        if not reinit_due(ctx.epoch - 1, cfg.reinit_epoch):
            return
        self.diagnoses += 1
        if self.diagnoses > cfg.reinit_num:
            return
        with isolated_rng(ctx.device):
            train_loader = stage_loader(ctx.train_loader, shuffle=False, seed=stage_seed(ctx.epoch))
            train = self._features(ctx, train_loader)
            val = self._features(ctx, ctx.val_loader)
        stats: dict[str, float] = {}
        for m in self.modalities:
            p_train = self._purity(*train, m)
            p_val = self._purity(*val, m)
            alpha = reinit_strength(p_train, p_val, cfg.move_lambda)
            soft_reinit_(self._params[m], self.initial_parameters(m), alpha)
            stats.update({f"purity_train/{m}": p_train, f"purity_val/{m}": p_val, f"alpha/{m}": alpha})
        self._stats = stats

    @torch.no_grad()
    def _features(self, ctx: EpochContext, loader: DataLoader) -> tuple[dict[str, Tensor], Tensor]:
        """Pooled encoder features ``{m: (N, d)}`` and cluster labels ``(N,)`` (class ids, or the sign of a
        regression target) of a loader, model in eval mode (``get_feature``)."""
        feats: dict[str, list[Tensor]] = {m: [] for m in self.modalities}
        labels: list[Tensor] = []
        with eval_mode(ctx.model):
            for batch in iterate(loader, ctx.to_device, None):
                features, _ = ctx.model.encode(batch)
                for m in self.modalities:
                    feats[m].append(pool_features(features[m], self.config.sequence_pool).float())
                target = batch["target"].reshape(-1)
                labels.append(target.long() if self.task.name == "cls" else (target > 0).long())
        if not labels:
            raise ConfigError("relearning: a diagnosis loader (train or val) yields no batch")
        return {m: torch.cat(v) for m, v in feats.items()}, torch.cat(labels)

    def _purity(self, feats: Mapping[str, Tensor], labels: Tensor, modality: str) -> float:
        x = minmax_scale(feats[modality].double())
        generator = torch.Generator(device=x.device).manual_seed(self.config.kmeans_seed)
        clusters, _ = kmeans(x, self.num_clusters, generator, n_init=self.config.n_init)
        return purity(labels, clusters)

    # -- state and diagnostics ----------------------------------------------------------------------------
    def host_state(self) -> dict[str, Any]:
        return {"diagnoses": self.diagnoses}

    def load_host_state(self, state: Mapping[str, Any]) -> None:
        self.diagnoses = int(state["diagnoses"])

    def diagnostics(self) -> dict[str, float]:
        """Purities, their gap's α per modality at a re-initialisation, and the re-initialisations so far."""
        out = {**self._stats, "reinits": float(min(self.diagnoses, self.config.reinit_num))}
        self._stats = {}
        return out
