"""``dgl``: Disentangled Gradient Learning (Wei, Luo, Luo; "Boosting Multimodal Learning via
Disentangled Gradient Learning", ICCV 2025).

The fusion module and head learn from the multimodal loss alone, on detached encoder features
("multimodal gradient truncation"); each encoder learns from its unimodal loss alone, the loss of
the model's own fusion and head applied to that modality with the others zeroed, scaled by α
("unimodal regularization"), with the fusion and head held constant in that path ("unimodal
gradient truncation"). Loss ``L = L_mm(fusion(sg(z))) + α Σ_m L_m``.

Port of ``shicaiwei123/ICCV2025-GDL:main_dgl.py`` (``train_epoch``) and ``models/fusion_modules.py``
(``ConcatFusion_DGL``). Deviations (``methods/dgl.md``): one backward of the summed loss with the
fusion parameters as constants of the unimodal passes (the official runs two backward passes and
resets the fusion gradients in between: the same gradients); the zero-padding rule of the concat
fusion is used for every fusion; more than two modalities sum their unimodal losses; any task loss.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from mmbalance.balancer import Balancer
from mmbalance.config import finite, need
from mmbalance.methods import register_method
from mmbalance.methods._config import MethodConfig
from mmbalance.methods._heads import head_term
from mmbalance.methods._shared_unimodal import shared_unimodal_predictions
from mmbalance.models.base import ModelOutput, MultimodalModel

__all__ = ["DGL", "DGLConfig"]


@dataclass(frozen=True)
class DGLConfig(MethodConfig):
    alpha: float = 4.0  # α: weight of the unimodal losses, (L_a + L_v)·α (main_dgl.py --alpha default)

    def check(self) -> None:
        need(self, finite(self.alpha) and self.alpha > 0, "alpha", "a finite number > 0")


@register_method("dgl")
class DGL(Balancer):
    """DGL: encoders trained by unimodal losses, fusion and head by the multimodal loss."""

    Config = DGLConfig
    presets = {
        "cremad": {"alpha": 5.0},  # cramed_dgl.sh: α 4 and 5 (notes 77.48 / 78.12); the better one
        "kineticsound": {"alpha": 3.0},  # ks_dgl.sh: α 2 and 3 (notes 74.78; 75.10, 76.28)
    }
    paper = "Wei et al., ICCV 2025 (shicaiwei123/ICCV2025-GDL)"

    def forward_step(self, model: MultimodalModel, batch: Mapping[str, Tensor]) -> ModelOutput:
        """Encode; fuse the **detached** features (the multimodal loss stops at the fusion module);
        ``output.features`` keep the attached encoder outputs for the unimodal passes."""
        features, extras = model.encode(batch)
        out = model.fuse({m: f.detach() for m, f in features.items()}, extras)
        out.features = features
        return out

    def loss_terms(self, output: ModelOutput, batch: Mapping[str, Tensor], task: Any) -> dict[str, Tensor]:
        """``task``: L_mm (reaches fusion and head); ``unimodal/<m>``: α·L_m of the zero-padded pass
        through the constant fusion and head (reaches encoder m only)."""
        target = batch["target"]
        predictions = shared_unimodal_predictions(self.model, output.features, detach_params=True)
        terms = {"task": task.loss(output.prediction, target)}
        losses = {m: task.loss(predictions[m], target) for m in self.modalities}
        for m in self.modalities:
            terms[head_term(m)] = self.config.alpha * losses[m]
        unimodal_loss = torch.stack([losses[m].detach().float() for m in self.modalities])
        self.epoch_means.update(unimodal_loss=unimodal_loss)
        return terms

    def diagnostics(self) -> dict[str, float]:
        """Epoch means of each modality's unweighted unimodal loss (``unimodal_loss/<m>``)."""
        return self.epoch_means.pop()
