"""``cml``: Calibrating Multimodal Learning (Ma, Zhang, Zhang, Wu, Fu, Zhou, Hu; ICML 2023).

Principle: the confidence of a prediction should not increase when a modality is removed. Each
step, every sample gets a random removal order of its modalities; the chain ``x⁽⁰⁾`` (all
modalities), ``x⁽¹⁾`` (one removed), ..., ``x⁽ᴹ⁻¹⁾`` (one left) is predicted by the same model, with
removed modalities' encoder features zeroed. The loss is the mean task loss over the chain plus
``λ Σ_k Σ_i`` the CML regulariser
``ReLU((c_{k+1} − c_k)·[ŷ_k = y] − ε) + ReLU((c_{k+1} − sg(c_k))·[ŷ_k ≠ y ∧ ŷ_{k+1} ≠ y] − ε)``
on the max-softmax confidences c (sg = stop-gradient), inside ``[modulation_starts, modulation_ends]``.

Port of the authors' ``QingyangZhang/CML:miwae/train.py`` (stage 2: ``get_multi_mask``, the two
"tricks" of ``rank_loss``, ``loss = cls_loss + rank_loss·β/100``). Deviations
(``methods/cml.md``): a modality is removed by zeroing its encoder features (the authors impute the
training mean of the raw input; BalanceBenchmark subtracts its slice of a linear fusion head, which is
the same as zeroing its feature); removal orders come from a private generator; segmentation applies
the per-sample terms to every pixel (mean over a sample's pixels).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from mmbalance.balancer import Balancer, EpochContext, OptimizerFactory
from mmbalance.config import finite, need
from mmbalance.errors import ConfigError
from mmbalance.methods import register_method
from mmbalance.methods._config import ModulationWindow
from mmbalance.methods._stages import stage_seed
from mmbalance.models.base import ModelOutput, MultimodalModel

__all__ = ["CML", "CMLConfig", "calibration_penalty", "removal_masks"]


@dataclass(frozen=True)
class CMLConfig(ModulationWindow):
    lam: float = 0.1  # λ = β/100, weight of the regulariser (miwae/train.py; README run --beta 10)
    epsilon: float = 0.0  # ε, tolerance margin (miwae/train.py --epsilon)
    modulation_starts: int = 0  # first epoch with CML (configs/trainer_config.yaml CML)
    modulation_ends: int = 80  # last epoch with CML (inclusive; trainer_config.yaml CML)

    def check(self) -> None:
        need(self, finite(self.lam) and self.lam >= 0, "lam", "a finite number >= 0")
        need(self, finite(self.epsilon) and self.epsilon >= 0, "epsilon", "a finite number >= 0")


# -- the arithmetic (hand-checked in tests/methods/test_cml.py) -----------------------------------
def removal_masks(ranks: Tensor) -> list[Tensor]:
    """Keep masks of the chain from each sample's removal ranks ``(B, M)`` (a permutation of
    ``0..M−1`` per row; rank r = removed at step r + 1): mask k ``(B, M)`` keeps the modalities with
    rank >= k, so mask 0 keeps all and mask M−1 keeps one (the authors' ``get_multi_mask``)."""
    return [ranks >= k for k in range(ranks.shape[1])]


def calibration_penalty(chain: Sequence[Tensor], target: Tensor, epsilon: float = 0.0) -> Tensor:
    """Per-position CML regulariser, shaped like ``target``, summed over the chain's consecutive pairs.

    ``chain[k]`` are the logits of input k (``chain[0]`` all modalities, each next one a modality
    fewer): ``(B, K)`` or ``(B, K, H, W)``, classes on dimension 1; ``target`` ``(B,)`` or ``(B, H, W)``.
    With ``c_k = max softmax``, ``ŷ_k = argmax`` over the classes:
    ``ReLU((c_{k+1} − c_k)·[ŷ_k = y] − ε)`` (trick 1: where the superset is right, the subset may not be
    more confident) ``+ ReLU((c_{k+1} − sg(c_k))·[ŷ_k ≠ y ∧ ŷ_{k+1} ≠ y] − ε)`` (trick 2: where both are
    wrong, only the subset's confidence is pushed down).

    Raises:
        ConfigError: a chain of fewer than two inputs.
    """
    if len(chain) < 2:
        raise ConfigError(f"the CML chain needs 2 or more inputs (all, then subsets), got {len(chain)}")
    return _penalty(*_confidences(chain), target, epsilon)


def _confidences(chain: Sequence[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
    """Max-softmax confidence and argmax prediction of every chain input (classes on dimension 1)."""
    confidence, predicted = [], []
    for logits in chain:
        conf, pred = F.softmax(logits.float(), dim=1).max(dim=1)
        confidence.append(conf)
        predicted.append(pred)
    return confidence, predicted


def _penalty(confidence: list[Tensor], predicted: list[Tensor], target: Tensor, epsilon: float) -> Tensor:
    total = torch.zeros_like(confidence[0])
    for k in range(len(confidence) - 1):
        right = (predicted[k] == target).to(total.dtype)
        both_wrong = ((predicted[k + 1] != target) & (predicted[k] != target)).to(total.dtype)
        total = total + F.relu((confidence[k + 1] - confidence[k]) * right - epsilon)
        total = total + F.relu((confidence[k + 1] - confidence[k].detach()) * both_wrong - epsilon)
    return total


@register_method("cml")
class CML(Balancer):
    """CML: a modality-removal chain per sample; penalise subsets more confident than supersets."""

    Config = CMLConfig
    paper = "Ma et al., ICML 2023 (QingyangZhang/CML)"
    tasks = frozenset({"cls", "seg"})  # needs class confidences: no regression

    def setup(self, model: MultimodalModel, task: Any, optimizer_factory: OptimizerFactory) -> None:
        super().setup(model, task, optimizer_factory)
        device = next(model.parameters()).device
        # Removal orders from a private generator on the model's device: the main RNG stream is
        # untouched and no host-to-device copy happens per step.
        self._generator = torch.Generator(device=device).manual_seed(stage_seed(0xC3))
        self._epoch = 0

    def on_train_epoch_start(self, ctx: EpochContext) -> None:
        self._epoch = ctx.epoch

    def forward_step(self, model: MultimodalModel, batch: Mapping[str, Tensor]) -> ModelOutput:
        """Inside the window: one encoder pass, then fusion and head on every input of the removal
        chain; the full-input output is returned with the subsets' predictions in
        ``extras["cml_chain"]``. Outside: ``model(batch)``."""
        if not self.config.modulates(self._epoch):
            return model(batch)
        features, extras = model.encode(batch)
        first = features[self.modalities[0]]
        m = len(self.modalities)
        ranks = torch.rand(first.shape[0], m, device=first.device, generator=self._generator).argsort(dim=1)
        masks = removal_masks(ranks)
        full = model.fuse(features, extras)
        chain = []
        for keep in masks[1:]:
            masked = {}
            for i, name in enumerate(self.modalities):
                f = features[name]
                masked[name] = f * keep[:, i].reshape((-1,) + (1,) * (f.dim() - 1)).to(f.dtype)
            chain.append(model.fuse(masked, extras).prediction)
        full.extras["cml_chain"] = chain
        return full

    def loss_terms(self, output: ModelOutput, batch: Mapping[str, Tensor], task: Any) -> dict[str, Tensor]:
        """Inside the window: ``task`` (the full input's loss / M), ``cml/subsets`` (the subsets'
        losses / M) and ``cml/calibration`` (λ · the regulariser summed over samples). Outside:
        ``task`` alone."""
        target = batch["target"]
        chain = output.extras.get("cml_chain")
        if chain is None:
            return {"task": task.loss(output.prediction, target)}
        m = len(chain) + 1
        subsets = task.loss(chain[0], target)
        for logits in chain[1:]:
            subsets = subsets + task.loss(logits, target)
        confidence, predicted = _confidences([output.prediction, *chain])
        penalty = _penalty(confidence, predicted, target, self.config.epsilon)
        # the official sum over samples; a segmentation sample's value is the mean over its pixels
        calibration = penalty.reshape(penalty.shape[0], -1).mean(dim=1).sum()
        over = (confidence[-1].detach() > confidence[0].detach()).float().mean()
        self.epoch_means.update(penalty=calibration.detach(), single_over_full=over)
        return {
            "task": task.loss(output.prediction, target) / m,
            "cml/subsets": subsets / m,
            "cml/calibration": self.config.lam * calibration,
        }

    def host_state(self) -> dict[str, Any]:
        return {"epoch": self._epoch, "generator": self._generator.get_state()}

    def load_host_state(self, state: Mapping[str, Any]) -> None:
        self._epoch = int(state["epoch"])
        self._generator.set_state(state["generator"])

    def diagnostics(self) -> dict[str, float]:
        """Epoch means (window epochs only) of the regulariser per batch (``penalty``, before λ) and
        of the fraction of positions whose last single modality is more confident than all of them
        together (``single_over_full``)."""
        return self.epoch_means.pop()
