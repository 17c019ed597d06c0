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
own (they share no parameter): M independent trainings stepped together. The model's own fusion
module and head are neither trained nor used. No official code. Details in ``methods/ume.md``.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from mmbalance.balancer import Balancer, OptimizerFactory, StepContext
from mmbalance.errors import ShapeError, UnsupportedError
from mmbalance.methods import register_method
from mmbalance.methods._grads import step_auxiliary
from mmbalance.methods._heads import UnimodalHeads
from mmbalance.methods._stages import target_size
from mmbalance.models.base import ModelOutput, MultimodalModel
from mmbalance.tasks import Task

__all__ = ["UME", "UMEConfig", "ensemble_predictions"]

ENSEMBLES = ("logits", "probs")
HEADS = ("model", "linear")


@dataclass(frozen=True)
class UMEConfig:
    ensemble: str = "logits"  # logits: mean of logits (values for reg); probs: log of the mean softmax (cls, seg)
    head: str = "model"  # model: own copy of fusion + head per modality (fed it alone); linear: a head on its features
    head_hidden: int | None = None  # head="linear": linear (None) or 2-layer MLP of this width
    head_lr: float | None = None  # learning rate of the unimodal heads / fusion copies (None = the run's lr)

    def __post_init__(self) -> None:
        if self.ensemble not in ENSEMBLES:
            raise ValueError(f"ensemble must be one of {ENSEMBLES}, got {self.ensemble!r}")
        if self.head not in HEADS:
            raise ValueError(f"head must be one of {HEADS}, got {self.head!r}")
        if self.head_hidden is not None and (not isinstance(self.head_hidden, int) or self.head_hidden < 1):
            raise ValueError(f"head_hidden must be None or an integer >= 1, got {self.head_hidden!r}")
        if self.head_lr is not None and not self.head_lr > 0:
            raise ValueError(f"head_lr must be None or > 0, got {self.head_lr!r}")


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
        log_probs = torch.log_softmax(stacked.float(), dim=2)
        return torch.logsumexp(log_probs, dim=0) - torch.log(torch.tensor(float(len(values)), device=stacked.device))
    raise ShapeError(f"ensemble must be one of {ENSEMBLES}, got {how!r}")


@register_method("ume")
class UME(Balancer):
    """Independently trained unimodal models, ensembled at test time."""

    Config = UMEConfig
    tasks = frozenset({"cls", "reg", "seg"})
    paper = "Du et al. On Uni-Modal Feature Learning in Supervised Multi-Modal Learning. ICML 2023"

    def setup(self, model: MultimodalModel, task: Task, optimizer_factory: OptimizerFactory) -> None:
        super().setup(model, task, optimizer_factory)
        if self.config.ensemble == "probs" and task.name == "reg":
            raise UnsupportedError("ume ensemble='probs' averages class probabilities; regression needs ensemble='logits'")
        self.head_optimizer: torch.optim.Optimizer | None = None
        self.heads: UnimodalHeads | None = None
        self.branches: nn.ModuleDict | None = None
        lr = self.config.head_lr
        if self.config.head == "linear":  # the heads own their optimizer, created when they are built
            self.heads = UnimodalHeads.for_task(self.modalities, task, hidden=self.config.head_hidden,
                                                detach=False, optimizer_factory=optimizer_factory, lr=lr)
        else:
            # Copies of the initial fusion module and head, one per modality (built now: no lazy init).
            self.branches = nn.ModuleDict(
                {m: nn.ModuleDict({"fusion": copy.deepcopy(model.fusion), "head": copy.deepcopy(model.head)}) for m in self.modalities}
            )
            self.head_optimizer = optimizer_factory(list(self.branches.parameters()), lr=lr)

    def unimodal_predictions(self, features: Mapping[str, Tensor], out_size: tuple[int, int] | None) -> dict[str, Tensor]:
        """``{m: prediction of unimodal model m}`` from the encoders' ``features``."""
        if self.heads is not None:
            return self.heads(features, out_size)
        assert self.branches is not None
        out = {}
        for m in self.modalities:
            alone = {k: (features[k] if k == m else torch.zeros_like(features[k])) for k in self.modalities}
            branch = self.branches[m]
            out[m] = branch["head"](branch["fusion"](alone))[0]
        return out

    def forward_step(self, model: MultimodalModel, batch: Mapping[str, Tensor]) -> ModelOutput:
        """Encoders and the unimodal models only (the model's fusion path is not part of UME)."""
        features, extras = model.encode(batch)
        predictions = self.unimodal_predictions(features, target_size(batch))
        extras["ume.predictions"] = predictions
        prediction = ensemble_predictions(predictions, self.config.ensemble)
        return ModelOutput(prediction, features, None, extras)

    def loss_terms(self, output: ModelOutput, batch: Mapping[str, Tensor], task: Task) -> dict[str, Tensor]:
        """``L(unimodal model m)`` per modality, each reaching only its own encoder and head."""
        predictions = output.extras["ume.predictions"]
        return {f"unimodal/{m}": task.loss(predictions[m], batch["target"]) for m in self.modalities}

    def on_after_optimizer_step(self, ctx: StepContext) -> None:
        """Step the unimodal models' own optimizer (the encoders are stepped by the main optimizer)."""
        if self.heads is not None:
            self.heads.step(ctx.scaler)
        else:
            assert self.head_optimizer is not None
            step_auxiliary(ctx.scaler, self.head_optimizer)

    def predict(self, output: ModelOutput) -> Tensor:
        """The ensemble of the unimodal models on ``output.features`` (the fusion prediction is ignored)."""
        size = tuple(output.prediction.shape[-2:]) if output.prediction.dim() == 4 else None
        return ensemble_predictions(self.unimodal_predictions(output.features, size), self.config.ensemble)

    def inference_state_dict(self) -> dict[str, Any]:
        """The unimodal models' heads are the test-time predictor, so they belong to inference checkpoints."""
        module = self.heads if self.heads is not None else self.branches
        prefix = "heads." if self.heads is not None else "branches."
        return dict(module.state_dict(prefix=prefix))
