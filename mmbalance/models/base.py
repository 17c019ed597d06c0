"""MultimodalModel: per-modality encoders, a fusion module, and a head ending in one output layer.

The split into ``encoders`` / ``fusion`` / ``head`` is what balancing methods act on:

* ``modality_parameters(m)`` is the explicit modality -> parameter map used for gradient
  modulation (never substring matching of parameter names, the source of CGGM's BraTS no-op);
* ``features[m]`` in :class:`ModelOutput` is the encoder output that auxiliary heads (CGGM, OGM,
  PMR, ...) read;
* ``head.out_layer`` is the last layer (``nn.Linear`` or 1x1 ``nn.Conv2d``), whose weight CGGM
  compares with its classifier heads, and ``head_input`` is that layer's input.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Collection, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from mmbalance.errors import ConfigError, ShapeError

__all__ = ["ModelOutput", "Head", "MultimodalModel", "ModelBuilder"]


@dataclass
class ModelOutput:
    """What a forward pass returns.

    Attributes:
        prediction: task output; cls ``(B, C)`` logits, reg ``(B, 1)``, seg ``(B, C, H, W)`` logits.
        features: encoder output per modality (``(B, d)``, ``(B, L, d)`` or ``(B, C, h, w)``).
        head_input: input of ``head.out_layer`` (``(B, d)`` or ``(B, d, H, W)``).
        extras: anything else a model exposes for unimodal use (e.g. DeepLab low-level features).
    """

    prediction: Tensor
    features: dict[str, Tensor]
    head_input: Tensor | None = None
    extras: dict[str, Any] = field(default_factory=dict)


class Head(nn.Module):
    """``out_layer(body(x))``; keeps ``body``'s output as the head input for direction methods."""

    def __init__(self, body: nn.Module, out_layer: nn.Module) -> None:
        super().__init__()
        if not isinstance(out_layer, nn.Linear | nn.Conv2d):
            raise ConfigError(f"out_layer must be nn.Linear or nn.Conv2d, got {type(out_layer).__name__}")
        self.body = body
        self.out_layer = out_layer

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        hidden = self.body(x)
        return self.out_layer(hidden), hidden


class MultimodalModel(nn.Module):
    """Late/mid-fusion multimodal network.

    Args:
        encoders: one module per modality; ``encoders[m](batch[m])`` gives ``features[m]``.
        fusion: called as ``fusion(features)`` with the modality -> feature dict (in ``modalities``
            order), returns the fused representation.
        head: a :class:`Head`.
        modalities: the modality order (default: the encoders' order).
        extras_from_encoders: modality encoders may return ``(feature, extras_dict)`` tuples; the
            extras are merged into ``ModelOutput.extras`` under ``"<modality>.<key>"``.
    """

    def __init__(
        self,
        encoders: Mapping[str, nn.Module],
        fusion: nn.Module,
        head: Head,
        modalities: Collection[str] | None = None,
    ) -> None:
        super().__init__()
        if not encoders:
            raise ConfigError("encoders must map at least one modality to a module, got none")
        self.encoders = nn.ModuleDict(dict(encoders))
        self.fusion = fusion
        if not isinstance(head, Head):
            raise ConfigError(f"head must be a mmbalance.models.Head, got {type(head).__name__}")
        self.head = head
        self.modalities: tuple[str, ...] = tuple(modalities or self.encoders.keys())
        missing = set(self.modalities) ^ set(self.encoders.keys())
        if missing:
            raise ConfigError(f"modalities {self.modalities} and encoders {tuple(self.encoders)} differ")

    # -- parameter groups ---------------------------------------------------------------------
    def modality_parameters(self, modality: str) -> list[nn.Parameter]:
        """Trainable parameters of modality ``modality``'s encoder. Never empty.

        Raises:
            ConfigError: unknown modality, or an encoder without trainable parameters.
        """
        if modality not in self.encoders:
            raise ConfigError(f"modality {modality!r} not in model modalities {self.modalities}")
        params = [p for p in self.encoders[modality].parameters() if p.requires_grad]
        if not params:
            raise ConfigError(
                f"modality_parameters({modality!r}) is empty: the encoder has no trainable parameters"
            )
        return params

    def shared_parameters(self) -> Iterator[nn.Parameter]:
        """Trainable parameters of the fusion module and the head."""
        for p in list(self.fusion.parameters()) + list(self.head.parameters()):
            if p.requires_grad:
                yield p

    @property
    def out_layer(self) -> nn.Linear | nn.Conv2d:
        """The fusion head's last layer (CGGM's ``out_layer``)."""
        return self.head.out_layer

    # -- forward ------------------------------------------------------------------------------
    def encode(self, batch: Mapping[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, Any]]:
        """Run every encoder; returns ``(features, extras)``."""
        features: dict[str, Tensor] = {}
        extras: dict[str, Any] = {}
        for m in self.modalities:
            if m not in batch:
                raise ShapeError(f"batch has no modality {m!r}; expected keys {self.modalities} + 'target'")
            out = self.encoders[m](batch[m])
            if isinstance(out, tuple):
                out, more = out
                extras.update({f"{m}.{k}": v for k, v in more.items()})
            features[m] = out
        return features, extras

    def fuse(self, features: Mapping[str, Tensor], extras: dict[str, Any] | None = None) -> ModelOutput:
        """Fusion and head on given features (used by masked passes that edit features)."""
        fused = self.fusion({m: features[m] for m in self.modalities})
        prediction, head_input = self.head(fused)
        return ModelOutput(prediction, dict(features), head_input, dict(extras or {}))

    def forward(self, batch: Mapping[str, Tensor], drop: Collection[str] = ()) -> ModelOutput:
        """Encode, optionally zero the features of modalities in ``drop``, fuse, predict.

        ``drop`` zeroes encoder outputs (feature-level masking, as MRD and masked-pass methods
        need); ``features`` in the output keep the un-dropped encoder outputs.
        """
        features, extras = self.encode(batch)
        if drop:
            unknown = set(drop) - set(self.modalities)
            if unknown:
                raise ConfigError(
                    f"drop names unknown modalities {sorted(unknown)}; model has {self.modalities}"
                )
            fused_in = {m: (torch.zeros_like(f) if m in drop else f) for m, f in features.items()}
            out = self.fuse(fused_in, extras)
            out.features = features
            return out
        return self.fuse(features, extras)


class ModelBuilder(ABC):
    """Base of registered model builders: ``MODELS.build(name, **overrides)(spec)``.

    A builder's ``Config`` holds the architecture hyperparameters; ``__call__(spec)`` returns a
    :class:`MultimodalModel` for a :class:`~mmbalance.datasets.base.DatasetSpec`. ``tasks`` says
    which tasks it serves.
    """

    name: str
    Config: type
    presets: Mapping[str, Mapping[str, Any]] = {}
    tasks: frozenset[str] = frozenset({"cls", "reg", "seg"})
    paper: str = ""

    def __init__(self, config: Any) -> None:
        self.config = config

    @classmethod
    def supports(cls, task: str | None = None, **_: Any) -> bool:
        return task is None or task in cls.tasks

    @abstractmethod
    def __call__(self, spec: Any) -> MultimodalModel:
        """Build the model for ``spec`` with random initialisation (weights only from local paths)."""
