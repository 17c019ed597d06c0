"""``mbsd``: modality-balanced self-distillation (Liu, Li, Song, Yang, Zeng; WSDM 2023), as in balancemm.

Inside the epochs ``[modulation_starts, modulation_ends]`` each modality's unimodal head adds its
task loss, and every pair of modalities (a, b) adds, per sample, a weight
``w = |p_a(y) − p_b(y)|`` (0 unless one of the two predicts the label) times a prediction-difference
penalty ``RS = (1/K) Σ_k (z_a − z_b)_k²`` and a distillation term ``KL = p_w (log p_w − p_s)``
between the stronger and weaker true-class probabilities; pair terms are batch means, averaged over
pairs. Outside the window the loss is the fused task loss alone.

No official code exists (the paper's MBSD is an e-commerce pre-training model); this ports
``GeWu-Lab/BalanceBenchmark:balancemm/trainer/MBSD_trainer.py``. Deviations (``methods/mbsd.md``):
unimodal logits come from our own heads on the encoder features instead of slices of a linear concat
fusion head; any M >= 2 through the mean over all pairs (the official code has 2- and 3-modal
branches, which this reproduces); segmentation applies the per-sample formulas to every pixel.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from mmbalance.balancer import EpochContext, OptimizerFactory
from mmbalance.errors import ConfigError
from mmbalance.methods import register_method
from mmbalance.methods._config import HeadConfig, ModulationWindow
from mmbalance.methods._headed import HeadedBalancer
from mmbalance.methods._stages import target_size
from mmbalance.models.base import ModelOutput, MultimodalModel

__all__ = ["MBSD", "MBSDConfig", "pair_distillation", "mbsd_losses", "rs_space_for"]


@dataclass(frozen=True)
class MBSDConfig(HeadConfig, ModulationWindow):
    modulation_starts: int = 0  # first epoch with the MBSD loss (configs/trainer_config.yaml MBSD)
    modulation_ends: int = 80  # last epoch with it (inclusive; trainer_config.yaml MBSD)
    rs_space: Literal["auto", "logits", "probs"] = "auto"  # RS on logits (2-modal branch) or softmax
    # probabilities (3-modal branch); "auto" = the official branch for the modality count
    head_lr: float | None = None  # LR of the unimodal heads (None = the run's)
    head_hidden: int | None = None  # None: linear heads, like the official fusion-head slices
    sequence_pool: str = "mean"  # pooling of (B, L, d) features for the heads


# -- the arithmetic (hand-checked in tests/methods/test_mbsd.py) ----------------------------------
def rs_space_for(num_modalities: int, rs_space: str) -> str:
    """The space of the RS penalty: the official 2-modal branch uses logits, the 3-modal branch
    softmax probabilities; ``"auto"`` picks by ``num_modalities``."""
    if rs_space != "auto":
        return rs_space
    return "logits" if num_modalities == 2 else "probs"


class _Stats(NamedTuple):
    """What the pair terms read of one modality: logits, probabilities, p(y), argmax == y."""

    logits: Tensor
    probs: Tensor
    p_y: Tensor
    hit: Tensor


def _stats(logits: Tensor, target: Tensor) -> _Stats:
    """Softmax over the class dimension 1, once per modality (softmax of a segmentation map is the
    costliest part of the pair terms)."""
    z = logits.float()
    p = F.softmax(z, dim=1)
    y = target.long().unsqueeze(1)
    # max(dim=1).indices: torch.argmax's first-maximum rule, and much faster over dim 1 of a map on CPU
    return _Stats(z, p, p.gather(1, y).squeeze(1), p.max(dim=1).indices == y.squeeze(1))


def _pair(a: _Stats, b: _Stats, rs_space: str) -> tuple[Tensor, Tensor, Tensor]:
    w = torch.where(a.hit | b.hit, (a.p_y - b.p_y).abs(), torch.zeros_like(a.p_y))
    strong, weak = torch.maximum(a.p_y, b.p_y), torch.minimum(a.p_y, b.p_y)
    kl = F.kl_div(strong, weak, reduction="none")
    diff = a.logits - b.logits if rs_space == "logits" else a.probs - b.probs
    return w * diff.pow(2).mean(dim=1), w * kl, w


def pair_distillation(
    logits_a: Tensor, logits_b: Tensor, target: Tensor, rs_space: str
) -> tuple[Tensor, Tensor, Tensor]:
    """Per-position ``(w·RS, w·KL, w)`` of one modality pair. Logits ``(B, K)`` or ``(B, K, H, W)``
    (classes on dimension 1), target ``(B,)`` or ``(B, H, W)``; results shaped like the target.

    ``p_m = softmax(z_m)``; ``w = |p_a(y) − p_b(y)|`` where ``argmax p_a = y`` or ``argmax p_b = y``,
    else 0; ``RS = mean_k (z_a − z_b)²`` (``rs_space="logits"``) or ``mean_k (p_a − p_b)²``
    (``"probs"``); ``KL = F.kl_div(p_s, p_w) = p_w (log p_w − p_s)`` with ``p_s = max(p_a(y), p_b(y))``,
    ``p_w = min(...)`` (the official call passes probabilities, not log-probabilities, as input).
    Everything stays in the graph, the weight included, as in the official code.
    """
    return _pair(_stats(logits_a, target), _stats(logits_b, target), rs_space)


def mbsd_losses(logits: Sequence[Tensor], target: Tensor, rs_space: str) -> tuple[Tensor, Tensor, Tensor]:
    """``(loss_RS, loss_KL, mean w)`` over all modality pairs: each pair's per-position terms are
    averaged over positions (samples, or every pixel of the batch; the official ``w @ term / B``),
    then over pairs (the 3-modal branch's ``/ 3``; one pair for two modalities).

    Raises:
        ConfigError: fewer than 2 modalities, or an unknown ``rs_space``.
    """
    if len(logits) < 2:
        raise ConfigError(f"MBSD needs at least 2 modalities' logits, got {len(logits)}")
    if rs_space not in ("logits", "probs"):
        raise ConfigError(f"rs_space must be 'logits' or 'probs' here, got {rs_space!r}")
    stats = [_stats(z, target) for z in logits]
    rs_sum = kl_sum = w_sum = None
    pairs = list(itertools.combinations(range(len(stats)), 2))
    for i, j in pairs:
        rs, kl, w = (t.mean() for t in _pair(stats[i], stats[j], rs_space))
        rs_sum = rs if rs_sum is None else rs_sum + rs
        kl_sum = kl if kl_sum is None else kl_sum + kl
        w_sum = w if w_sum is None else w_sum + w
    assert rs_sum is not None and kl_sum is not None and w_sum is not None
    return rs_sum / len(pairs), kl_sum / len(pairs), w_sum.detach() / len(pairs)


@register_method("mbsd")
class MBSD(HeadedBalancer):
    """MBSD: unimodal losses plus confidence-weighted prediction-difference and distillation terms."""

    Config = MBSDConfig
    tasks = frozenset({"cls", "seg"})
    paper = "Liu et al., WSDM 2023 (as in GeWu-Lab/BalanceBenchmark)"
    heads_detach = False  # inside the window the unimodal losses train the encoders too

    def setup(self, model: MultimodalModel, task: Any, optimizer_factory: OptimizerFactory) -> None:
        super().setup(model, task, optimizer_factory)
        self._rs_space = rs_space_for(len(self.modalities), self.config.rs_space)
        self._epoch = 0

    def on_train_epoch_start(self, ctx: EpochContext) -> None:
        self._epoch = ctx.epoch

    def loss_terms(self, output: ModelOutput, batch: Mapping[str, Tensor], task: Any) -> dict[str, Tensor]:
        """Inside the window: ``task``, ``unimodal/<m>`` (through the encoders), ``mbsd/rs`` and
        ``mbsd/kl``. Outside: ``task``, and ``unimodal/<m>`` on detached features, which trains the
        heads only, so that they are ready when the window opens and the model trains as ``joint``."""
        target = batch["target"]
        terms = {"task": task.loss(output.prediction, target)}
        if not self.config.modulates(self._epoch):
            detached = {m: f.detach() for m, f in output.features.items()}
            terms.update(self.heads.loss_terms(self.heads(detached, target_size(batch)), target, task))
            return terms
        unimodal = self.unimodal_predictions(output, batch)
        terms.update(self.heads.loss_terms(unimodal, target, task))
        rs, kl, w = mbsd_losses([unimodal[m] for m in self.modalities], target, self._rs_space)
        terms["mbsd/rs"] = rs
        terms["mbsd/kl"] = kl
        self.epoch_means.update(weight=w, rs=rs, kl=kl)
        return terms

    def host_state(self) -> dict[str, Any]:
        return {"epoch": self._epoch}

    def load_host_state(self, state: Mapping[str, Any]) -> None:
        self._epoch = int(state["epoch"])

    def diagnostics(self) -> dict[str, float]:
        """Epoch means (window epochs only) of the pair weight w (``weight``) and the two terms."""
        return self.epoch_means.pop()
