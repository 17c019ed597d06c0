"""``sample_valuation``: sample-level modality valuation and re-sampling (Wei, Feng, Wang, Hu; CVPR 2024).

From epoch ``warmup`` on, every epoch starts by valuing each modality's contribution to training
samples with Shapley values of masked passes (:mod:`mmbalance.methods._shapley`), then emphasises the
low-contribution modality by re-sampling: duplicates of a sample that keep only that modality (the
others' encoder features zeroed before fusion) are trained on during the epoch.

* ``level="sample"``: every training sample is valued; sample i gets 1, 2 or 3 duplicates keeping
  modality m when ``φ_i^m`` lies in (0.4, 1), (−0.1, 0.4) or below −0.1 (none from 1 up);
* ``level="modality"``: a random ``part_ratio`` share of the training set is valued; with its mean
  contributions ``φ̄``, ``⌊d · N⌋`` random samples are duplicated keeping the modality of lowest ``φ̄``,
  ``d = α · (2/3) · (max φ̄ − min φ̄)`` (``func="linear"``).

Port of ``GeWu-Lab/Valuate-and-Enhance-Multimodal-Cooperation``: ``code/sample_level.py`` and
``code/modality_level.py`` (``execute_modulation``, ``main``), ``code/datasets/dataloader.py``
(``AV_KS_Dataset_sample_level``, ``AV_KS_Dataset_modality_level``), ``code/models/models.py`` (the
``drop`` argument). Deviations (``methods/sample_valuation.md``): the duplicates join the runner's batches
in ``⌈D / S⌉``-row chunks (:mod:`mmbalance.methods._resampling`) instead of a rebuilt loader; more than
two modalities use the M-player Shapley value and the max-min spread; regression is valued by sign
agreement.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Subset

from mmbalance.balancer import Balancer, EpochContext, OptimizerFactory
from mmbalance.config import finite, need
from mmbalance.errors import ConfigError
from mmbalance.methods import register_method
from mmbalance.methods._config import MethodConfig
from mmbalance.methods._resampling import ResampledRows, fetch_rows
from mmbalance.methods._shapley import keep_rows, valuate
from mmbalance.methods._stages import isolated_rng, stage_seed
from mmbalance.models.base import ModelOutput, MultimodalModel

__all__ = ["SampleValuation", "SampleValuationConfig", "sample_copies", "resample_share", "sample_level_plan"]

_RESAMPLED = "sample_valuation.resampled"  # ModelOutput.extras key: (prediction, target) of the duplicates


@dataclass(frozen=True)
class SampleValuationConfig(MethodConfig):
    level: Literal["sample", "modality"] = "sample"  # --modulation: sample_level.py / modality_level.py
    warmup: int = 5  # plain epochs before re-sampling starts (--warmup, both scripts)
    part_ratio: float = 0.2  # share Z of the training set valued at modality level (--part_ratio)
    alpha: float = 1.0  # α: modality-level re-sampling strength (--alpha)
    func: Literal["linear", "tanh", "square"] = "linear"  # d(α, spread), AV_KS_Dataset_modality_level(func=)

    def check(self) -> None:
        need(self, self.warmup >= 0, "warmup", "an integer >= 0")
        need(self, finite(self.part_ratio) and 0.0 < self.part_ratio <= 1.0, "part_ratio", "in (0, 1]")
        need(self, finite(self.alpha) and self.alpha >= 0, "alpha", "a finite number >= 0")


# -- the arithmetic, as pure functions (hand-checked in tests/methods/test_sample_valuation.py) -------
def sample_copies(contributions: Tensor) -> Tensor:
    """Duplicates per (sample, modality) from its contribution φ, with the official bins verbatim:
    1 for ``0.4 < φ < 1``, 2 for ``−0.1 < φ < 0.4``, 3 for ``φ < −0.1``, else 0."""
    c = contributions
    one, two, three = (c > 0.4) & (c < 1), (c > -0.1) & (c < 0.4), c < -0.1
    return one.long() + 2 * two.long() + 3 * three.long()


def sample_level_plan(contributions: Tensor) -> tuple[Tensor, Tensor]:
    """``(index, keep)`` of the duplicates for contributions ``(N, M)``: sample i appears
    ``sample_copies(φ_i^m)`` times keeping modality m (sample-major order, shuffled later)."""
    n, m = contributions.shape
    copies = sample_copies(contributions).reshape(-1).cpu()
    index = torch.arange(n).repeat_interleave(m).repeat_interleave(copies)
    keep = torch.arange(m).repeat(n).repeat_interleave(copies)
    return index, keep


def resample_share(mean_contributions: Tensor, alpha: float, func: str = "linear") -> float:
    """Modality-level share d of the training set to duplicate: with ``s = (2/3)(max φ̄ − min φ̄)``
    (``|gap_a − gap_v| / 3 * 2`` for two modalities), ``α s`` (linear), ``tanh(α s)`` or ``α s^1.5``."""
    spread = float(mean_contributions.max() - mean_contributions.min()) / 3 * 2
    if func == "linear":
        return spread * alpha
    if func == "tanh":
        return float(torch.tanh(torch.tensor(spread * alpha, dtype=torch.float64)))
    if func == "square":
        return spread**1.5 * alpha
    raise ConfigError(f"func must be one of ('linear', 'tanh', 'square'), got {func!r}")


@register_method("sample_valuation")
class SampleValuation(Balancer):
    """Value each sample's modalities by Shapley values; re-sample the low-contribution modality."""

    Config = SampleValuationConfig
    presets = {
        "kinetics_sounds": {"level": "sample", "warmup": 5},  # sample_level.py argparse defaults
        "synthetic": {"warmup": 1},  # not from the paper: 5 of 60 warm-up epochs scaled to 8
    }
    tasks = frozenset({"cls", "reg"})
    paper = "Wei et al., CVPR 2024 (GeWu-Lab/Valuate-and-Enhance-Multimodal-Cooperation)"

    def setup(self, model: MultimodalModel, task: Any, optimizer_factory: OptimizerFactory) -> None:
        super().setup(model, task, optimizer_factory)
        self.rows = ResampledRows()
        self._source: tuple[Any, Any, Any] | None = None  # (train dataset, collate_fn, to_device)
        self.valued_samples = 0  # samples valued so far (cost record)
        self._stats: dict[str, float] = {}

    # -- epoch level: valuation and the re-sampling plan --------------------------------------------
    def on_train_epoch_start(self, ctx: EpochContext) -> None:
        """Value the training samples with the model as it is (the official values after each epoch
        and re-samples for the next) and plan this epoch's duplicates; nothing before ``warmup``."""
        loader = ctx.train_loader
        self._source = (loader.dataset, loader.collate_fn, ctx.to_device)
        cfg: SampleValuationConfig = self.config
        if ctx.epoch < cfg.warmup:
            self.rows.clear()
            return
        if loader.batch_size is None:
            raise ConfigError("sample_valuation needs a train DataLoader with a fixed batch_size, got None")
        n = len(loader.dataset)
        generator = torch.Generator().manual_seed(stage_seed(ctx.epoch))
        if cfg.level == "sample":
            part = torch.arange(n)
        else:  # np.random.choice(N, int(N * part_ratio)): with replacement
            part = torch.randint(n, (max(1, int(n * cfg.part_ratio)),), generator=generator)
        valued = DataLoader(Subset(loader.dataset, part.tolist()), batch_size=loader.batch_size,
                            collate_fn=loader.collate_fn)
        with isolated_rng(ctx.device):
            phi = valuate(ctx.model, valued, self.task.name, ctx.to_device, self.modalities).cpu()
        self.valued_samples += int(part.numel())
        means = phi.mean(dim=0)
        if cfg.level == "sample":
            index, keep = sample_level_plan(phi)
        else:
            count = int(resample_share(means, cfg.alpha, cfg.func) * n)
            index = torch.randint(n, (count,), generator=generator)
            keep = torch.full((count,), int(means.argmin()), dtype=torch.long)
        self.rows.reset(index, keep, max(1, len(loader)), generator)
        counts = torch.bincount(keep, minlength=len(self.modalities)).tolist()
        self._stats = {f"contribution/{m}": float(means[j]) for j, m in enumerate(self.modalities)}
        self._stats.update({f"duplicates/{m}": float(counts[j]) for j, m in enumerate(self.modalities)})

    # -- training step --------------------------------------------------------------------------------
    def forward_step(self, model: MultimodalModel, batch: Mapping[str, Tensor]) -> ModelOutput:
        """``model(batch)``, plus the next chunk of duplicates (encoded, the modalities each row does not
        keep zeroed, fused); without a plan exactly ``model(batch)``."""
        output = model(batch)
        chunk = self.rows.next_chunk()
        if chunk is None:
            return output
        if self._source is None:
            raise ConfigError("sample_valuation: a re-sampling plan but no training set from an epoch start")
        dataset, collate_fn, to_device = self._source
        indices, keep = chunk
        rows = fetch_rows(dataset, indices, collate_fn)
        device = batch["target"].device
        if device.type == "cuda":  # pinned, so the copies do not wait for the GPU (no per-step sync)
            rows, keep = {k: v.pin_memory() for k, v in rows.items()}, keep.pin_memory()
        rows = to_device(rows)
        keep = keep.to(device, non_blocking=True)
        features, extras = model.encode(rows)
        masked = {m: keep_rows(features[m], keep == j) for j, m in enumerate(self.modalities)}
        output.extras[_RESAMPLED] = (model.fuse(masked, extras).prediction, rows["target"])
        return output

    def loss_terms(self, output: ModelOutput, batch: Mapping[str, Tensor], task: Any) -> dict[str, Tensor]:
        """The task loss averaged over the batch and the duplicates together (the official loss is the
        mean over a batch mixing both): ``task + resampled`` = (Σ originals + Σ duplicates) / (B + c)."""
        resampled = output.extras.get(_RESAMPLED)
        if resampled is None:
            return {"task": task.loss(output.prediction, batch["target"])}
        prediction, target = resampled
        total = output.prediction.shape[0] + prediction.shape[0]
        return {
            "task": task.loss(output.prediction, batch["target"], reduction="sum") / total,
            "resampled": task.loss(prediction, target, reduction="sum") / total,
        }

    # -- state and diagnostics ------------------------------------------------------------------------
    def host_state(self) -> dict[str, Any]:
        return {"rows": self.rows.state(), "valued_samples": self.valued_samples}

    def load_host_state(self, state: Mapping[str, Any]) -> None:
        self.rows.load_state(state["rows"])
        self.valued_samples = int(state["valued_samples"])

    def diagnostics(self) -> dict[str, float]:
        """Mean contribution φ̄ (``contribution/<m>``) and duplicates keeping m (``duplicates/<m>``) of the
        epoch's valuation, and the samples valued so far (``valued_samples``)."""
        out = {**self._stats, "valued_samples": float(self.valued_samples)}
        self._stats = {}
        return out
