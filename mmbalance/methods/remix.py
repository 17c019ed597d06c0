"""``remix``: Data Remixing (Ma, Chen, Deng, "Improving Multimodal Learning Balance and Sufficiency
through Data Remixing", ICML 2025).

Warm-up epochs (``epoch < warmup``) train jointly, ``L = L_mm + α Σ_m L_m``, with linear unimodal
heads on the encoder features (their loss reaches the encoders). After the warm-up every epoch
starts with a decoupling pass over the training set (eval mode, no gradient): each sample goes to
the modality whose unimodal prediction is closest to uniform, ``argmin_m KL(p_m ‖ U)``, the
modality for which it is hard. The epoch then trains on re-assembled batches: each batch holds
samples of one modality's subset only, every other modality's features are zeroed before fusion,
and ``L = L_mm + γ L_m``.

Port of ``MatthewMaxy/Remix_ICML2025:train.py`` (``remix``, ``kl_divergence``, ``train_epoch``,
``special_train_epoch``, ``main``), ``models/models.py`` (``AVClassifier.forward`` with ``mode``)
and ``datasets/dataloader.py``. How the re-assembled batches reach the step, and the deviations,
are in ``methods/remix.md``: the runner's loader is left alone; :meth:`Remix.forward_step` replaces
each of its batches by the epoch's next re-assembled batch, fetched from the same training set.
Classification and segmentation (per-pixel KL, averaged); regression has no class distribution.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader

from mmbalance.balancer import EpochContext, OptimizerFactory
from mmbalance.config import finite, need
from mmbalance.errors import ConfigError
from mmbalance.methods import register_method
from mmbalance.methods._config import HeadConfig
from mmbalance.methods._headed import HeadedBalancer
from mmbalance.methods._heads import head_term
from mmbalance.methods._stages import eval_mode, isolated_rng, iterate, stage_loader, target_size
from mmbalance.models.base import ModelOutput, MultimodalModel

__all__ = ["Remix", "RemixConfig", "kl_to_uniform", "hardest_modality", "remix_schedule"]


@dataclass(frozen=True)
class RemixConfig(HeadConfig):
    alpha: float = 0.5  # α = β (--alpha, --beta): weight of every unimodal loss in the warm-up
    gamma: float = 1.0  # γ1 = γ2 (--gamma1, --gamma2): weight of a remixed batch's unimodal loss
    warmup: int = 10  # joint warm-up epochs (--warmup; remixing from epoch `warmup`, 0-based)
    head_hidden: int | None = None  # None: linear heads (head_audio = nn.Linear(512, n_classes))
    head_lr: float | None = None  # LR of the unimodal heads (None: the run's; official one optimizer)
    sequence_pool: str = "mean"  # pooling of (B, L, d) features for the heads

    def check(self) -> None:
        need(self, finite(self.alpha) and self.alpha >= 0, "alpha", "a finite number >= 0")
        need(self, finite(self.gamma) and self.gamma >= 0, "gamma", "a finite number >= 0")
        need(self, self.warmup >= 0, "warmup", "an integer >= 0")


# -- the arithmetic (hand-checked in tests/methods/test_remix.py) ----------------------------------
def kl_to_uniform(logits: Tensor) -> Tensor:
    """Per-sample ``KL(p ‖ U)`` in bits, ``Σ_k p_k log2(p_k K)`` with ``p = softmax(logits)`` clipped
    to [1e-9, 1] and not renormalised (the official ``kl_divergence``). ``(B, K) -> (B,)``; maps
    ``(B, K, H, W)``: the per-pixel KL averaged over the pixels."""
    p = F.softmax(logits.float(), dim=1).clamp(1e-9, 1.0)
    kl = (p * torch.log2(p * logits.shape[1])).sum(dim=1)
    return kl.flatten(1).mean(dim=1) if kl.dim() > 1 else kl


def hardest_modality(kl: Tensor) -> Tensor:
    """``(M, N)`` KL values -> ``(N,)`` index of the smallest; a tie goes to the later modality
    (official: audio if ``KL_audio < KL_video``, else video)."""
    return (kl.shape[0] - 1) - torch.argmin(kl.flip(0), dim=0)


def remix_schedule(
    assignment: Tensor,
    order: Sequence[int],
    batch_size: int,
    generator: torch.Generator,
    max_batches: int | None,
) -> list[tuple[int, Tensor]]:
    """The epoch's re-assembled batches ``[(modality index, sample indices), ...]``: the subset of
    every modality in ``order``, shuffled by ``generator`` and cut into batches of ``batch_size``
    (the last one partial), one subset after the other. While there are more than ``max_batches``
    batches, the partial last batch of a subset (from the end of ``order``) joins the batch before
    it, so the schedule fits the runner's epoch without leaving samples out where it can."""
    chunks: dict[int, list[Tensor]] = {}
    for m in order:
        indices = (assignment == m).nonzero().reshape(-1)
        shuffled = indices[torch.randperm(indices.numel(), generator=generator)]
        chunks[m] = list(shuffled.split(batch_size)) if shuffled.numel() else []  # an empty subset: no batch
    total = sum(len(c) for c in chunks.values())
    for m in reversed(order):
        c = chunks[m]
        if max_batches is None or total <= max_batches:
            break
        if len(c) >= 2 and c[-1].numel() < batch_size:
            c[-2:] = [torch.cat(c[-2:])]
            total -= 1
    return [(m, b) for m in order for b in chunks[m]]


def _fetch(loader: DataLoader, indices: Tensor) -> Any:
    """The samples ``indices`` of the loader's dataset, collated as the loader collates a batch."""
    dataset, index = loader.dataset, indices.tolist()
    items = dataset.__getitems__(index) if hasattr(dataset, "__getitems__") else [dataset[i] for i in index]
    return loader.collate_fn(items)


@register_method("remix")
class Remix(HeadedBalancer):
    """Data Remixing: per-modality hard-sample subsets trained in unimodal re-assembled batches."""

    Config = RemixConfig
    presets = {
        "synthetic": {"warmup": 2},  # 10 of 60 epochs scaled to the benchmark's 6-8, rounded up
    }
    tasks = frozenset({"cls", "seg"})
    heads_detach = False
    paper = "Ma et al., ICML 2025 (MatthewMaxy/Remix_ICML2025)"

    def setup(self, model: MultimodalModel, task: Any, optimizer_factory: OptimizerFactory) -> None:
        super().setup(model, task, optimizer_factory)
        self._seed = torch.initial_seed() % (2**63)  # the schedule's shuffles; saved: a resume keeps it
        self._epoch = 0
        self._assignment: Tensor | None = None  # (N,) modality index of every training sample, CPU
        self._position = 0  # re-assembled batches of the epoch used so far
        self._batches: list[tuple[int, Tensor]] | None = None
        self._source: tuple[DataLoader, Callable[[Mapping[str, Tensor]], dict[str, Tensor]]] | None = None
        self.assign_batches = 0  # forward-only batches of the decoupling passes (cost record)

    @property
    def remixing(self) -> bool:
        """Whether the current epoch is past the warm-up."""
        return self._epoch >= self.config.warmup

    # -- epoch level: decoupling --------------------------------------------------------------------
    def on_train_epoch_start(self, ctx: EpochContext) -> None:
        """After the warm-up: assign every training sample to its hardest modality (the model and
        heads in eval mode, no gradient, the main loop's RNG and data order untouched)."""
        self._epoch = ctx.epoch
        self._source = (ctx.train_loader, ctx.to_device)
        if not self.remixing:
            return
        kls = []
        loader = stage_loader(ctx.train_loader, shuffle=False, seed=0)
        with torch.no_grad(), isolated_rng(ctx.device), eval_mode(ctx.model, self.heads):
            for batch in iterate(loader, ctx.to_device, None):
                features, _ = ctx.model.encode(batch)
                predictions = self.heads(features, target_size(batch))
                kls.append(torch.stack([kl_to_uniform(predictions[m]) for m in self.modalities]))
                self.assign_batches += 1
        self._assignment = hardest_modality(torch.cat(kls, dim=1)).cpu()
        self._position, self._batches = 0, None

    def _schedule(self) -> list[tuple[int, Tensor]]:
        if self._batches is None:
            if self._source is None or self._assignment is None:
                raise ConfigError("remix: a remixing epoch's step ran before its on_train_epoch_start")
            loader = self._source[0]
            generator = torch.Generator().manual_seed((self._seed * 1_000_003 + self._epoch) % (2**63))
            order = list(reversed(range(len(self.modalities))))  # official: the video subset first
            size = int(loader.batch_size)
            self._batches = remix_schedule(self._assignment, order, size, generator, len(loader))
        return self._batches

    # -- training step ------------------------------------------------------------------------------
    def forward_step(self, model: MultimodalModel, batch: Mapping[str, Tensor]) -> ModelOutput:
        """Warm-up: ``model(batch)``. Remixing: the runner's batch is replaced by the epoch's next
        re-assembled batch (of the same training set), forwarded with every other modality's
        features zeroed before fusion."""
        if not self.remixing:
            return model(batch)
        schedule = self._schedule()
        # A training epoch never runs past its schedule (at least len(train_loader) batches); steps
        # outside the epochs (the runner's cost measurement) cycle through it again.
        index, indices = schedule[self._position % len(schedule)]
        self._position += 1
        assert self._source is not None
        remixed = self._source[1](_fetch(self._source[0], indices))
        modality = self.modalities[index]
        output = model(remixed, drop=[m for m in self.modalities if m != modality])
        output.extras.update({"remix.batch": remixed, "remix.modality": modality})
        return output

    def loss_terms(self, output: ModelOutput, batch: Mapping[str, Tensor], task: Any) -> dict[str, Tensor]:
        """``task``: L_mm; ``unimodal/<m>``: α·L_m in the warm-up; after it γ·L_m for the batch's
        modality and a constant 0 for the others (not trained on this batch)."""
        source = output.extras.get("remix.batch", batch)
        active = output.extras.get("remix.modality")
        target = source["target"]
        predictions = self.unimodal_predictions(output, source)
        terms = {"task": task.loss(output.prediction, target)}
        for m in self.modalities:
            if active is None:
                terms[head_term(m)] = self.config.alpha * task.loss(predictions[m], target)
            elif m == active:
                terms[head_term(m)] = self.config.gamma * task.loss(predictions[m], target)
            else:
                terms[head_term(m)] = predictions[m].new_zeros(())
        return terms

    # -- state and diagnostics ----------------------------------------------------------------------
    def host_state(self) -> dict[str, Any]:
        """The epoch's assignment and schedule position, the schedule seed and the pass counter."""
        return {
            "seed": self._seed,
            "epoch": self._epoch,
            "position": self._position,
            "assignment": self._assignment,
            "assign_batches": self.assign_batches,
        }

    def load_host_state(self, state: Mapping[str, Any]) -> None:
        self._seed, self._epoch = int(state["seed"]), int(state["epoch"])
        self._position = int(state["position"])
        self._assignment = state["assignment"]
        self.assign_batches = int(state["assign_batches"])
        self._batches = None  # rebuilt from the assignment, seed and epoch on the next step

    def diagnostics(self) -> dict[str, float]:
        """Remixing epochs: each modality's share of the training samples (``remix/share/<m>``), the
        samples the epoch's steps did not reach (``remix/left_out``); always the decoupling
        batches so far (``remix/assign_batches``)."""
        out = {"remix/assign_batches": float(self.assign_batches)}
        if self.remixing and self._assignment is not None:
            counts = torch.bincount(self._assignment, minlength=len(self.modalities)).tolist()
            shares = [c / max(1, sum(counts)) for c in counts]
            out.update({f"remix/share/{m}": s for m, s in zip(self.modalities, shares, strict=True)})
            if self._batches is not None:
                out["remix/left_out"] = float(sum(b.numel() for _, b in self._batches[self._position:]))
        return out
