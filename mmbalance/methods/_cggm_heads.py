"""CGGM's modality-specific classifier heads f_i (training only; Guo et al., NeurIPS 2024, Eq. 5).

Each head reads one modality's *detached* encoder output and ends in an ``out_layer`` with the same
weight shape as the fusion head's ``out_layer`` (its input width is the fusion head's), so the
official direction term can compare the two flattened weight matrices (``cal_cos``).

Three bodies, chosen from the feature's rank:

* sequence ``(B, L, d)``: the official ``models/msamodel.py:Classifier``: a fairseq/MulT-style
  transformer at the feature width d (input x sqrt(d) + sinusoidal positions, ``layers`` pre-norm
  layers with a 4d feed-forward, final LayerNorm), token 0, ``Linear + ReLU``, ``out_layer``. The
  official forward applies ``proj1`` twice (Linear, Linear, ReLU); we apply it once (see
  ``methods/cggm.md``).
* vector ``(B, d)``: ``layers`` x (Linear, ReLU, Dropout), ``out_layer``.
* map ``(B, C, h, w)``: a light decoder (``layers`` x 3x3 conv-BN-ReLU, dropout) and a 1x1 ``out_layer``,
  upsampled bilinearly (``align_corners=True``, as ``models/segmodel.py:SegClassifier``) to the
  target's spatial size. The official BraTS decoder also reads the low-level ResNet feature; ours
  reads the encoder output only.

Those are the ``"auto"`` heads. ``CGGMConfig.head`` names a registered head factory
(:func:`register_head`): ``"auto"``; ``"msa"``, the official ``Classifier`` as released (``proj1``
applied twice) on sequence features; ``"linear"``, a bare ``nn.Linear`` on vector features; and
``"custom"``, the factory passed to ``CGGM(config, head_factory=...)`` from Python.

A head returns its logits (or ``(logits, hidden)``) and has an ``out_layer`` (``nn.Linear`` /
``nn.Conv2d``), or is one. :class:`CGGMHeads` records each ``out_layer``'s input (the paper mode's
closed-form gradient needs it) with a forward pre-hook, builds the heads on the first batch (feature
shapes are unknown before it) from a private RNG stream, in the model's dtype and on the features'
device, and owns their optimizer (the official ``cls_optimizer``), stepped through the run's
GradScaler like :class:`~mmbalance.methods._heads.UnimodalHeads`.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from mmbalance.errors import ConfigError, ShapeError
from mmbalance.methods._cggm_head_layers import (
    MapHead,
    OfficialClassifier,
    build_head,
    default_heads,
    need_rank,
)
from mmbalance.methods._grads import step_auxiliary

__all__ = [
    "CGGMHeads",
    "HeadFactory",
    "HEAD_FACTORIES",
    "CUSTOM_HEAD",
    "register_head",
    "resolve_head",
]

# ``factory(feature, *, modality, out_layer, num_outputs, config) -> nn.Module``: modality ``m``'s
# head from one batch of its detached features, the fusion ``out_layer``, the task's output width
# and the CGGMConfig (``head_layers``, ``head_heads``, ``head_dropout``).
HeadFactory = Callable[..., nn.Module]
HEAD_FACTORIES: dict[str, HeadFactory] = {}
CUSTOM_HEAD = "custom"  # CGGMConfig.head of a factory passed from Python (not registered)


def register_head(name: str) -> Callable[[HeadFactory], HeadFactory]:
    """Decorator registering a :data:`HeadFactory` under ``name`` (for ``CGGMConfig.head``).

    Raises:
        ConfigError: ``name`` is ``"custom"`` or already registered.
    """

    def decorate(factory: HeadFactory) -> HeadFactory:
        if name == CUSTOM_HEAD or name in HEAD_FACTORIES:
            raise ConfigError(
                f"CGGM head name {name!r} is reserved or already registered; "
                f"registered: {sorted(HEAD_FACTORIES)}"
            )
        HEAD_FACTORIES[name] = factory
        return factory

    return decorate


@register_head("auto")
def auto_head(
    feature: Tensor, *, modality: str, out_layer: nn.Module, num_outputs: int, config: Any
) -> nn.Module:
    """The default heads, by the feature's rank (module docstring), sized by ``head_*`` fields."""
    return build_head(
        feature, out_layer, num_outputs, modality=modality, layers=config.head_layers,
        heads=config.head_heads, dropout=config.head_dropout,
    )


@register_head("msa")
def msa_head(
    feature: Tensor, *, modality: str, out_layer: nn.Module, num_outputs: int, config: Any
) -> nn.Module:
    """:class:`OfficialClassifier` on ``(B, L, d)`` features (``head_layers`` = ``cls_layers``)."""
    need_rank(feature, 3, head="msa", modality=modality)
    width = feature.shape[-1]
    heads = config.head_heads if config.head_heads is not None else default_heads(width)
    return OfficialClassifier(width, num_outputs, heads, config.head_layers, config.head_dropout)


@register_head("linear")
def linear_head(
    feature: Tensor, *, modality: str, out_layer: nn.Module, num_outputs: int, config: Any
) -> nn.Module:
    """A bare ``nn.Linear(d, K)`` on ``(B, d)`` features: the head is its own ``out_layer``."""
    need_rank(feature, 2, head="linear", modality=modality)
    return nn.Linear(feature.shape[-1], num_outputs)


def resolve_head(config: Any, head_factory: HeadFactory | None) -> tuple[Any, HeadFactory]:
    """``(config, factory)``: a Python ``head_factory`` (config ``head`` "auto" or "custom") gives a
    config saying ``head="custom"``; otherwise the factory registered as ``config.head``.

    Raises:
        ConfigError: a ``head_factory`` with another registered head, or ``head="custom"`` without a
            callable ``head_factory``.
    """
    if head_factory is None:
        if config.head == CUSTOM_HEAD:
            raise ConfigError(
                "head='custom' needs a callable CGGM(config, head_factory=...); specs and the CLI name a "
                f"registered head: {sorted(HEAD_FACTORIES)}"
            )
        return config, HEAD_FACTORIES[config.head]
    if not callable(head_factory):
        raise ConfigError(f"head_factory must be callable, got {head_factory!r}")
    if config.head not in ("auto", CUSTOM_HEAD):
        raise ConfigError(f"head_factory was given with head={config.head!r}; pass one head choice")
    return dataclasses.replace(config, head=CUSTOM_HEAD), head_factory


def out_layer_of(head: nn.Module, modality: str) -> nn.Linear | nn.Conv2d:
    """The head's last layer: ``head.out_layer``, or the head itself.

    Raises:
        ConfigError: neither is an ``nn.Linear`` / ``nn.Conv2d``.
    """
    layer = head if isinstance(head, nn.Linear | nn.Conv2d) else getattr(head, "out_layer", None)
    if not isinstance(layer, nn.Linear | nn.Conv2d):
        raise ConfigError(
            f"the CGGM head of modality {modality!r} is a {type(head).__name__}: a head must be an "
            "nn.Linear / nn.Conv2d or have an out_layer attribute that is one (its weight is compared "
            "with model.out_layer's)"
        )
    return layer


class CGGMHeads(nn.ModuleDict):
    """The heads f_i (``self[m]``), built on the first batch, and their own optimizer.

    Args:
        modalities: one head per modality, in this order.
        factory: ``factory(feature, modality) -> nn.Module`` building modality ``m``'s head from one
            batch of its (detached) features.
        seed: seed of the private RNG stream the heads are initialised from (building them leaves
            the global RNG, and so the model's dropout masks, untouched).
        dtype: the heads' floating dtype (the model's).
        optimizer_factory: the run's optimizer factory; called once the heads exist as
            ``optimizer_factory(params, lr=lr, foreach=True, **optimizer_options)``.

    ``forward(features, size)`` returns the heads' logits and their ``out_layer`` inputs, both in
    modality order. The heads follow the balancer's train/eval mode. The built layout (each
    feature's shape without the batch) is saved as extra state, so a state dict loads into unbuilt
    heads.
    """

    def __init__(
        self,
        modalities: Sequence[str],
        factory: Callable[[Tensor, str], nn.Module],
        *,
        seed: int,
        dtype: torch.dtype,
        optimizer_factory: Callable[..., torch.optim.Optimizer],
        lr: float,
        optimizer_options: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.modalities = tuple(modalities)
        self._factory = factory
        self._seed = seed
        self._dtype = dtype
        self._optimizer_factory = optimizer_factory
        self._optimizer_args: dict[str, Any] = {"lr": lr, "foreach": True, **dict(optimizer_options or {})}
        self.optimizer: torch.optim.Optimizer | None = None
        self._out_layers: dict[str, nn.Linear | nn.Conv2d] = {}
        self._inputs: dict[str, Tensor] = {}
        self._shapes: dict[str, tuple[int, ...]] = {}
        self.register_buffer("_device_anchor", torch.empty(0), persistent=False)  # follows .to(device)

    @property
    def built(self) -> bool:
        return len(self) == len(self.modalities)

    def build(self, features: Mapping[str, Tensor]) -> None:
        """Build every head from one batch of features, on their device, in the heads' dtype."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self._seed)
            for m in self.modalities:
                self[m] = self._factory(features[m].detach(), m)
        self.to(device=features[self.modalities[0]].device, dtype=self._dtype)
        self.train(self.training)
        for m in self.modalities:
            self._out_layers[m] = out_layer_of(self[m], m)
            self._out_layers[m].register_forward_pre_hook(functools.partial(self._keep_input, m))
            self._shapes[m] = tuple(int(n) for n in features[m].shape[1:])
        # foreach: one multi-tensor update for all head parameters (torch's CPU default loops in Python)
        self.optimizer = self._optimizer_factory(list(self.parameters()), **self._optimizer_args)

    def _keep_input(self, modality: str, module: nn.Module, args: tuple[Any, ...]) -> None:
        self._inputs[modality] = args[0]

    def forward(
        self, features: Mapping[str, Tensor], size: tuple[int, int] | None = None
    ) -> tuple[list[Tensor], list[Tensor]]:
        """``(logits, hidden)``: each head on its modality's detached feature (map heads upsampled
        to ``size``), and each head's ``out_layer`` input (its last call's)."""
        if not self.built:
            self.build(features)
        logits, hidden = [], []
        for m in self.modalities:
            head = self[m]
            feature = features[m].detach()
            out = head(feature, size) if isinstance(head, MapHead) else head(feature)
            logits.append(out[0] if isinstance(out, tuple) else out)
            hidden.append(self._inputs.pop(m))
        return logits, hidden

    def out_weights(self) -> list[Tensor]:
        """The heads' ``out_layer`` weights (the official ``cal_cos`` compares them with W_F)."""
        return [self._out_layers[m].weight for m in self.modalities]

    def step(self, scaler: torch.amp.GradScaler) -> None:
        """Step and zero the heads' optimizer through the run's GradScaler (once built)."""
        if self.optimizer is not None:
            step_auxiliary(scaler, self.optimizer)

    def get_extra_state(self) -> Tensor:
        """The built layout: ``(M, 5)`` int64 rows ``(rank - 1, *shape[1:], 0-padding)``; ``(0, 5)``
        before the heads are built. A tensor, so state dicts stay tensor-only."""
        rows = [[len(self._shapes[m]), *self._shapes[m], *[0] * (4 - len(self._shapes[m]))]
                for m in self.modalities if m in self._shapes]
        return torch.tensor(rows, dtype=torch.int64).reshape(-1, 5)

    def set_extra_state(self, state: Any) -> None:
        """Build unbuilt heads from a saved layout (before their weights are loaded)."""
        if not isinstance(state, Tensor) or state.dim() != 2 or state.shape[1] != 5:
            raise ShapeError(f"CGGM heads extra state must be an (M, 5) layout tensor, got {state!r}")
        if state.shape[0] == 0 or self.built:
            return
        if state.shape[0] != len(self.modalities):
            raise ShapeError(
                f"saved CGGM heads are for {state.shape[0]} modalities, expected {self.modalities}"
            )
        device = self._device_anchor.device
        features = {
            m: torch.zeros((1, *row[1 : 1 + row[0]]), device=device, dtype=self._dtype)
            for m, row in zip(self.modalities, state.tolist(), strict=True)
        }
        self.build(features)
