"""``amco``: Adaptive Mask Co-optimization (Zhou, Liang, Zheng, Xuan, Kumada, ICASSP 2023).

The classifier is a late fusion: per-modality logits ``u_m`` (linear heads on the encoder features)
are summed and passed through a ``K x K`` linear layer. A modality the model depends on (its share of
the softmax mass over all modalities' concatenated logits exceeds σ on the previous batch) has its
logits masked: a random subset of ``floor(p_t K)`` classes is zeroed, ``p_t`` growing on a sine
schedule, so the fused prediction must come from the other modalities. Co-optimisation: every
modality's own cross-entropy (on its masked logits) is added, so the dependent modality keeps
learning.

No official code was found; this ports ``GeWu-Lab/BalanceBenchmark:balancemm/trainer/AMCo_trainer.py``
(``train_loop``, ``training_step``) and ``balancemm/models/avclassify_model.py``
(``BaseClassifierAMCoModel``), checked against the paper's abstract (the full text is not public).
Deviations (details in ``methods/amco.md``): one class mask of shape (K,) for the batch (the
re-implementation multiplies the (B, K) logits by a (2, K) mask, which fails unless B <= 2); separate
biases per unimodal head instead of ``b / M`` slices of one concatenation layer. Classification only.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mmbalance.balancer import EpochContext, OptimizerFactory, StepContext
from mmbalance.config import finite, need
from mmbalance.methods import register_method
from mmbalance.methods._config import HeadConfig, ModulationWindow
from mmbalance.methods._grads import step_auxiliary
from mmbalance.methods._headed import HeadedBalancer
from mmbalance.methods._heads import head_term
from mmbalance.models.base import ModelOutput, MultimodalModel
from mmbalance.models.features import build_with_generator
from mmbalance.tasks import Task

__all__ = ["AMCo", "AMCoConfig", "mask_ratio", "class_mask", "dependency_shares"]

_UNIMODAL = "amco.logits"  # ModelOutput.extras key of the (masked) unimodal logits


@dataclass(frozen=True)
class AMCoConfig(HeadConfig, ModulationWindow):
    sigma: float = 0.5  # σ: a modality is dependent when its softmax share exceeds σ (AMCo: sigma)
    eps: float = 0.3  # ε: p_t = sin(π/2 · min(ε, l_t) / ε) reaches 1 at l_t = ε (AMCo: eps)
    l_step: float = 0.1  # l_t grows by epoch · l_step per batch, from 0 each epoch (current_epoch / 10)
    modulation_starts: int = 0  # first epoch with masks and unimodal losses (AMCo: modulation_starts)
    modulation_ends: int = 80  # last such epoch, inclusive (AMCo: modulation_ends)
    head_lr: float | None = None  # LR of the unimodal heads and the fusion layer (None = the run's LR)
    head_hidden: int | None = None  # None: linear heads (the slices of a concatenation layer)
    sequence_pool: str = "mean"  # pooling of (B, L, d) features for the heads

    def check(self) -> None:
        need(self, 0.0 <= self.sigma <= 1.0, "sigma", "in [0, 1]")
        need(self, finite(self.eps) and self.eps > 0, "eps", "a finite number > 0")
        need(self, finite(self.l_step) and self.l_step >= 0, "l_step", "a finite number >= 0")


# -- the arithmetic, as pure functions (hand-checked in tests/methods/test_amco.py) -----------------
def mask_ratio(batch_index: int, epoch: int, eps: float, l_step: float) -> float:
    """``p_t = sin(π/2 · min(ε, l_t) / ε)`` with ``l_t = batch_index · epoch · l_step`` (host numbers)."""
    level = batch_index * epoch * l_step
    return math.sin(math.pi / 2 * min(eps, level) / eps)


def class_mask(num_classes: int, ratio: float, device: torch.device) -> Tensor:
    """``(K,)`` float mask with ``floor(ratio · K)`` zeros at uniformly drawn classes (global RNG)."""
    masked = int(ratio * num_classes)
    return (torch.randperm(num_classes, device=device) >= masked).float()


def dependency_shares(logits: list[Tensor]) -> Tensor:
    """``(M,)``: batch mean of each modality's share of the softmax over the concatenated logits
    ``[u_1, ..., u_M]`` (each ``(B, K)``); the shares sum to 1."""
    probs = F.softmax(torch.cat(logits, dim=1).float(), dim=1)
    return probs.reshape(probs.shape[0], len(logits), -1).sum(dim=2).mean(dim=0)


@register_method("amco")
class AMCo(HeadedBalancer):
    """AMCo: mask the logits of the modality the fusion depends on; train every modality's own loss."""

    Config = AMCoConfig
    tasks = frozenset({"cls"})
    paper = "Zhou et al., ICASSP 2023 (as in GeWu-Lab/BalanceBenchmark)"
    heads_detach = False  # the unimodal losses (co-optimisation) train the encoders

    def setup(self, model: MultimodalModel, task: Task, optimizer_factory: OptimizerFactory) -> None:
        super().setup(model, task, optimizer_factory)
        k = int(task.num_outputs)
        generator = torch.Generator().manual_seed((torch.initial_seed() + 104_729) % (2**63))
        device = next(model.parameters()).device
        self.fusion_layer = build_with_generator(lambda: nn.Linear(k, k), generator, device, torch.float32)
        self.fusion_optimizer = optimizer_factory(self.fusion_layer.parameters(), lr=self.config.head_lr)
        self.register_buffer("dependent", torch.zeros(len(self.modalities), dtype=torch.bool))
        self._epoch = 0
        self._batch = 0

    def on_train_epoch_start(self, ctx: EpochContext) -> None:
        """Reset the schedule level ``l_t`` and the dependency flags (official: per ``train_loop``)."""
        self._epoch, self._batch = ctx.epoch, 0
        self.dependent = torch.zeros_like(self.dependent)

    def host_state(self) -> dict[str, int]:
        """The epoch and the batch index within it: the mask schedule's level ``l_t``."""
        return {"epoch": self._epoch, "batch": self._batch}

    def load_host_state(self, state: Mapping[str, Any]) -> None:
        self._epoch, self._batch = int(state["epoch"]), int(state["batch"])

    def _modulates(self) -> bool:
        return self.config.modulates(self._epoch)

    def _fuse(self, logits: Mapping[str, Tensor]) -> Tensor:
        return self.fusion_layer(torch.stack(list(logits.values())).sum(dim=0))

    def forward_step(self, model: MultimodalModel, batch: Mapping[str, Tensor]) -> ModelOutput:
        """Encoders, unimodal heads, the class mask on the dependent modalities' logits (inside the
        modulation window), sum, fusion layer. The model's own fusion module and head do not run."""
        features, extras = model.encode(batch)
        logits = self.heads(features)
        if self._modulates():
            ratio = mask_ratio(self._batch, self._epoch, self.config.eps, self.config.l_step)
            mask = class_mask(int(self.task.num_outputs), ratio, self.dependent.device)
            dependent = dict(zip(self.modalities, self.dependent, strict=True))
            logits = {m: torch.where(dependent[m], u * mask, u) for m, u in logits.items()}
        self._batch += 1
        extras[_UNIMODAL] = logits
        return ModelOutput(self._fuse(logits), features, None, extras)

    def loss_terms(self, output: ModelOutput, batch: Mapping[str, Tensor], task: Any) -> dict[str, Tensor]:
        """``task`` (fused cross-entropy), and inside the window ``unimodal/<m>`` (cross-entropy of
        each modality's masked logits); then the next batch's dependency flags."""
        target = batch["target"]
        terms = {"task": task.loss(output.prediction, target)}
        if not self._modulates():
            return terms
        logits = output.extras[_UNIMODAL]
        terms.update({head_term(m): task.loss(logits[m], target) for m in self.modalities})
        with torch.no_grad():
            shares = dependency_shares([logits[m].detach() for m in self.modalities])
            self.epoch_means.update(masked=self.dependent.float(), share=shares)
            self.dependent = shares > self.config.sigma  # a new tensor: this step's graph saved the old one
        return terms

    def on_after_optimizer_step(self, ctx: StepContext) -> None:
        """Step the unimodal heads' and the fusion layer's own optimizers."""
        super().on_after_optimizer_step(ctx)
        step_auxiliary(ctx.scaler, self.fusion_optimizer)

    def predict(self, output: ModelOutput) -> Tensor:
        """Unmasked late fusion of the unimodal heads on ``output.features``."""
        return self._fuse(self.heads(output.features))

    def inference_state_dict(self) -> dict[str, Tensor]:
        """The heads and the fusion layer are the test-time classifier."""
        heads = self.heads.state_dict(prefix="heads.")
        return {**heads, **self.fusion_layer.state_dict(prefix="fusion_layer.")}

    def diagnostics(self) -> dict[str, float]:
        """Epoch means of ``masked/<m>`` (share of batches whose logits were masked) and ``share/<m>``."""
        return self.epoch_means.pop()
