"""``unimodal``: train one named modality alone (the single-modality rows of the paper tables).

The model is the same multimodal network; every other modality's encoder output is replaced by
zeros before fusion, in training and at test time, so only the named encoder, the fusion and the
head learn. This matches "single-modality training" as a row of the same architecture; the other
encoders receive no gradient and are not updated.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from torch import Tensor

from mmbalance.balancer import Balancer, OptimizerFactory
from mmbalance.config import need
from mmbalance.errors import ConfigError
from mmbalance.methods import register_method
from mmbalance.methods._config import MethodConfig
from mmbalance.models.base import ModelOutput, MultimodalModel

__all__ = ["Unimodal", "UnimodalConfig"]


@dataclass(frozen=True)
class UnimodalConfig(MethodConfig):
    modality: str = ""  # the modality to train; required (e.g. "text")

    def check(self) -> None:
        need(self, bool(self.modality), "modality", "the name of one of the dataset's modalities")


@register_method("unimodal")
class Unimodal(Balancer):
    """Single-modality training: ``--set modality=<name>``."""

    Config = UnimodalConfig
    paper = "Single-modality training (baseline)"
    min_modalities = 1

    def setup(self, model: MultimodalModel, task: Any, optimizer_factory: OptimizerFactory) -> None:
        super().setup(model, task, optimizer_factory)
        if self.config.modality not in model.modalities:
            raise ConfigError(f"modality must be one of {model.modalities}, got {self.config.modality!r}")
        self._drop = tuple(m for m in model.modalities if m != self.config.modality)

    def forward_step(self, model: MultimodalModel, batch: Mapping[str, Tensor]) -> ModelOutput:
        return model(batch, drop=self._drop)

    def predict(self, output: ModelOutput) -> Tensor:
        """The model's fusion with every other modality's features zeroed."""
        kept = {
            m: (f if m == self.config.modality else f.new_zeros(f.shape)) for m, f in output.features.items()
        }
        return self.model.fuse(kept, output.extras).prediction
