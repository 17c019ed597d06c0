"""``mmcosine``: Multi-Modal Cosine loss (Xu, Feng, Zhang, Hu, ICASSP 2023).

The classifier is a late fusion of per-modality linear classifiers, ``logits = Σ_m W_m z_m`` (the
slices of a concatenation-fusion output layer), in which every modality's features ``z_m`` and class
weights ``W_m[k]`` are L2-normalised: ``logits = s · Σ_m cos(z_m, W_m[k])``. Each modality's
contribution is bounded by the scale ``s`` whatever its feature norm, so a dominant modality cannot
win by growing its logits, and the cross-entropy of the sum shapes a hyperspherical feature space per
modality.

Port of ``GeWu-Lab/MMCosine_ICASSP23:main_CD.py`` (``train_epoch``, ``--mmcosine True``) and
``models/fusion_modules.py`` (``ConcatFusion``). Deviations (details in ``methods/mmcosine.md``): our
models' heads are not linear concatenation layers, so the class weights ``W_m`` are the method's own
(one bias-free weight matrix per modality on the pooled encoder features, trained by an optimizer of
the run's type) and the model's fusion module and head are neither trained nor used; the test-time
prediction is the cosine logits (``main_CD.py``'s ``valid`` reads the un-normalised linear output).
Classification only.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from mmbalance.config import finite, need
from mmbalance.methods import register_method
from mmbalance.methods._config import HeadConfig
from mmbalance.methods._headed import HeadedBalancer
from mmbalance.models.base import ModelOutput, MultimodalModel
from mmbalance.models.features import pool_features

__all__ = ["MMCosine", "MMCosineConfig", "cosine_logits"]

_UNIMODAL = "mmcosine.logits"  # ModelOutput.extras key of the per-modality cosine logits


@dataclass(frozen=True)
class MMCosineConfig(HeadConfig):
    scaling: float = 10.0  # s: logits = s · Σ_m cos(z_m, W_m) (main_CD.py --scaling, README command)
    head_lr: float | None = None  # LR of the class weights W_m (None = the run's LR; official: one optimizer)
    sequence_pool: str = "mean"  # pooling of (B, L, d) features into z_m

    def check(self) -> None:
        need(self, finite(self.scaling) and self.scaling > 0, "scaling", "a finite number > 0")


def cosine_logits(feature: Tensor, weight: Tensor, scaling: float) -> Tensor:
    """``s · cos(z_i, w_k)``: ``feature (B, d)`` rows and ``weight (K, d)`` rows L2-normalised
    (a zero vector gives 0), then ``(B, K)``."""
    return scaling * F.normalize(feature, dim=1) @ F.normalize(weight, dim=1).t()


@register_method("mmcosine")
class MMCosine(HeadedBalancer):
    """MMCosine: the sum of per-modality scaled cosine logits is the classifier."""

    Config = MMCosineConfig
    # README: python main_CD.py --train --fusion_method gated --mmcosine True --scaling 10
    presets = {"cremad": {"scaling": 10.0}}
    tasks = frozenset({"cls"})
    paper = "Xu et al., ICASSP 2023 (GeWu-Lab/MMCosine_ICASSP23)"
    heads_detach = False  # the cross-entropy of the cosine logits trains the encoders

    def class_weights(self, features: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """``{m: W_m (K, d_m)}``: the weights of the linear heads (built on the first call; their
        bias is not part of MMCosine and stays unused)."""
        if not self.heads.built:
            self.heads(features)  # lazy build from the feature widths
        return {m: self.heads.heads[m].net.weight for m in self.modalities}

    def unimodal_logits(self, features: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """``{m: s · cos(pool(z_m), W_m)}``, each ``(B, K)``."""
        weights = self.class_weights(features)
        pool, scaling = self.config.sequence_pool, self.config.scaling
        return {m: cosine_logits(pool_features(features[m], pool), w, scaling) for m, w in weights.items()}

    def _fused(self, features: Mapping[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        logits = self.unimodal_logits(features)
        return torch.stack(list(logits.values())).sum(dim=0), logits

    def forward_step(self, model: MultimodalModel, batch: Mapping[str, Tensor]) -> ModelOutput:
        """Encoders, then the cosine classifier (the model's own fusion module and head do not run)."""
        features, extras = model.encode(batch)
        fused, logits = self._fused(features)
        extras[_UNIMODAL] = logits
        return ModelOutput(fused, features, None, extras)

    def loss_terms(self, output: ModelOutput, batch: Mapping[str, Tensor], task: Any) -> dict[str, Tensor]:
        """``task``: cross-entropy of the summed cosine logits, the only term (official ``loss``)."""
        target = batch["target"]
        with torch.no_grad():  # the official tensorboard's target logits fy_a, fy_v (batch means)
            index = target.long().reshape(-1, 1)
            logits = output.extras[_UNIMODAL].values()
            target_logit = torch.stack([lg.gather(1, index).mean() for lg in logits])
            self.epoch_means.update(target_logit=target_logit)
        return {"task": task.loss(output.prediction, target)}

    def predict(self, output: ModelOutput) -> Tensor:
        """The summed cosine logits on ``output.features`` (the fusion head's prediction is ignored)."""
        return self._fused(output.features)[0]

    def inference_state_dict(self) -> dict[str, Tensor]:
        """The class weights are the test-time classifier."""
        return dict(self.heads.state_dict(prefix="heads."))

    def diagnostics(self) -> dict[str, float]:
        """Epoch mean of each modality's target-class logit ``s · cos(z_m, W_m[y])``: ``target_logit/<m>``."""
        return self.epoch_means.pop()
