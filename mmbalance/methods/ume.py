"""``ume``: Uni-Modal Ensemble (Du, Teng, Li, Liu, Yuan, Wang, Yuan, Zhao, "On Uni-Modal Feature
Learning in Supervised Multi-Modal Learning", ICML 2023).

Each modality's unimodal model is trained alone with the task loss; at test time their predictions
are averaged. No cross-modal interaction is learned, so no modality can suppress another's feature
learning; the paper recommends UME when paired (cross-modal) features matter little, UMT otherwise.

The unimodal model of modality m is its encoder plus, by default (``head="model"``), a private copy
of the model's fusion module and head fed that modality alone (the others' features are zeros):
the network of the ``unimodal`` baseline rows. ``head="linear"`` uses a linear head on the encoder's
features instead (the paper's backbone + linear classifier). The unimodal models train side by side
in one run with the loss ``sum_m L(unimodal model m)``, whose gradient for each model is exactly its
own (they share no parameter): M independent trainings stepped together (the heads or fusion copies
by their own optimizer, the encoders by the run's). The model's own fusion
module and head are neither trained nor used. No official code. Details in ``methods/ume.md``.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn

from mmbalance.balancer import OptimizerFactory
from mmbalance.errors import ShapeError, UnsupportedError
from mmbalance.methods import register_method
from mmbalance.methods._config import HeadConfig
from mmbalance.methods._grads import step_auxiliary
from mmbalance.methods._headed import HeadedBalancer
from mmbalance.methods._heads import head_term
from mmbalance.methods._precision import upcast
from mmbalance.methods._stages import target_size
from mmbalance.models.base import ModelOutput, MultimodalModel
from mmbalance.tasks import Task

__all__ = ["UME", "UMEConfig", "FusionBranches", "ensemble_predictions"]

ENSEMBLES = ("logits", "probs")


@dataclass(frozen=True)
class UMEConfig(HeadConfig):
    # logits: mean of logits (values for reg); probs: log of the mean softmax (cls, seg)
    ensemble: Literal["logits", "probs"] = "logits"
    # model: own copy of fusion + head per modality (fed it alone); linear: a head on its features
    head: Literal["model", "linear"] = "model"
    head_hidden: int | None = None  # head="linear": linear (None) or 2-layer MLP of this width
    head_lr: float | None = None  # learning rate of the unimodal heads / fusion copies (None = the run's lr)


def ensemble_predictions(predictions: Mapping[str, Tensor], how: str = "logits") -> Tensor:
    """Average of unimodal predictions: ``mean_m z_m`` (``logits``) or ``log mean_m softmax(z_m)``
    over dim 1 (``probs``; valid logits, so cross-entropy of it is the ensemble's NLL).

    Raises:
        ShapeError: predictions of different shapes, or none.
    """
    values = list(predictions.values())
    if not values:
        raise ShapeError("no unimodal predictions to ensemble")
    shapes = {tuple(v.shape) for v in values}
    if len(shapes) != 1:
        raise ShapeError(f"unimodal predictions differ in shape: {sorted(shapes)}")
    stacked = torch.stack(values)
    if how == "logits":
        return stacked.mean(dim=0)
    if how == "probs":
        log_probs = torch.log_softmax(upcast(stacked), dim=2)
        count = torch.tensor(float(len(values)), dtype=log_probs.dtype, device=stacked.device)
        return torch.logsumexp(log_probs, dim=0) - torch.log(count)
    raise ShapeError(f"ensemble must be one of {ENSEMBLES}, got {how!r}")


class FusionBranches(nn.Module):
    """One copy of the model's (initial) fusion module and head per modality, fed that modality's
    features alone (the others' are zeros), with their own optimizer: the heads of ``head="model"``.

    Same interface as :class:`~mmbalance.methods._heads.UnimodalHeads`:
    ``forward(features, out_size=None) -> {m: prediction}`` and ``step(scaler)``.
    """

    def __init__(
        self,
        model: MultimodalModel,
        modalities: Sequence[str],
        optimizer_factory: OptimizerFactory,
        lr: float | None,
    ) -> None:
        super().__init__()
        self.modalities = tuple(modalities)
        self.branches = nn.ModuleDict(
            {m: nn.ModuleDict({"fusion": copy.deepcopy(model.fusion), "head": copy.deepcopy(model.head)})
             for m in self.modalities}
        )
        self.optimizer = optimizer_factory(list(self.branches.parameters()), lr=lr)

    def forward(
        self, features: Mapping[str, Tensor], out_size: Sequence[int] | None = None
    ) -> dict[str, Tensor]:
        """``{m: head_m(fusion_m(features with only m non-zero))}``; ``out_size`` is unused (the
        model's head sizes its own output)."""
        out = {}
        for m in self.modalities:
            alone = {k: (features[k] if k == m else torch.zeros_like(features[k])) for k in self.modalities}
            branch = self.branches[m]
            out[m] = branch["head"](branch["fusion"](alone))[0]
        return out

    def step(self, scaler: torch.amp.GradScaler) -> None:
        """Step and zero the branches' optimizer through the run's GradScaler."""
        step_auxiliary(scaler, self.optimizer)


@register_method("ume")
class UME(HeadedBalancer):
    """Independently trained unimodal models, ensembled at test time."""

    Config = UMEConfig
    paper = "Du et al., ICML 2023"
    heads_detach = False  # each unimodal model trains its own encoder

    def setup(self, model: MultimodalModel, task: Task, optimizer_factory: OptimizerFactory) -> None:
        if self.config.ensemble == "probs" and task.name == "reg":
            raise UnsupportedError(
                "ume ensemble='probs' averages class probabilities; regression needs ensemble='logits'"
            )
        super().setup(model, task, optimizer_factory)
        if self.heads is None:  # head="model": copies of the initial fusion module and head (no lazy init)
            self.heads = FusionBranches(model, self.modalities, optimizer_factory, self.config.head_lr)

    def uses_heads(self) -> bool:
        """Linear heads for ``head="linear"``; the fusion copies of ``head="model"`` are built in
        :meth:`setup`."""
        return self.config.head == "linear"

    def forward_step(self, model: MultimodalModel, batch: Mapping[str, Tensor]) -> ModelOutput:
        """Encoders and the unimodal models only (the model's fusion path is not part of UME)."""
        features, extras = model.encode(batch)
        predictions = self.heads(features, target_size(batch))
        extras["ume.predictions"] = predictions
        prediction = ensemble_predictions(predictions, self.config.ensemble)
        return ModelOutput(prediction, features, None, extras)

    def loss_terms(self, output: ModelOutput, batch: Mapping[str, Tensor], task: Task) -> dict[str, Tensor]:
        """``L(unimodal model m)`` per modality, each reaching only its own encoder and head."""
        predictions = output.extras["ume.predictions"]
        return {head_term(m): task.loss(predictions[m], batch["target"]) for m in self.modalities}

    def predict(self, output: ModelOutput) -> Tensor:
        """The ensemble of the unimodal models on ``output.features`` (the fusion prediction is ignored)."""
        size = tuple(output.prediction.shape[-2:]) if output.prediction.dim() == 4 else None
        return ensemble_predictions(self.heads(output.features, size), self.config.ensemble)

    def inference_state_dict(self) -> dict[str, Any]:
        """The unimodal models' heads are the test-time predictor, so they belong to inference checkpoints."""
        return dict(self.heads.state_dict(prefix="heads."))
