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
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mmbalance.errors import ConfigError, ShapeError
from mmbalance.methods._grads import step_auxiliary
from mmbalance.models.mult import MulTTransformer
from mmbalance.models.resize import resize_bilinear

__all__ = [
    "SequenceHead",
    "VectorHead",
    "MapHead",
    "OfficialClassifier",
    "CGGMHeads",
    "HeadFactory",
    "HEAD_FACTORIES",
    "CUSTOM_HEAD",
    "register_head",
    "resolve_head",
    "build_head",
    "sinusoidal_positions",
]

# ``factory(feature, *, modality, out_layer, num_outputs, config) -> nn.Module``: modality ``m``'s
# head from one batch of its detached features, the fusion ``out_layer``, the task's output width
# and the CGGMConfig (``head_layers``, ``head_heads``, ``head_dropout``).
HeadFactory = Callable[..., nn.Module]
HEAD_FACTORIES: dict[str, HeadFactory] = {}
CUSTOM_HEAD = "custom"  # CGGMConfig.head of a factory passed from Python (not registered)


def sinusoidal_positions(length: int, dim: int, *, device: torch.device, dtype: torch.dtype) -> Tensor:
    """``(length, dim)`` fairseq sinusoidal table (first half sin, second half cos; odd dim padded)."""
    half = dim // 2
    scale = math.log(10000.0) / max(1, half - 1)
    freqs = torch.exp(torch.arange(half, device=device, dtype=torch.float32) * -scale)
    angles = torch.arange(length, device=device, dtype=torch.float32)[:, None] * freqs[None, :]
    table = torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)
    if dim % 2:
        table = torch.cat([table, table.new_zeros(length, 1)], dim=1)
    return table.to(dtype)


class SequenceHead(nn.Module):
    """Transformer classifier on a ``(B, L, in_dim)`` sequence; pools token 0.

    The transformer runs at the feature width ``in_dim`` (as the official classifier, whose width
    is the encoders'); ``Linear(in_dim, dim) + ReLU`` then maps token 0 to the fusion head's width.

    Args:
        in_dim: feature width of the encoder output.
        dim: input width of ``out_layer``, equal to the fusion ``out_layer``'s.
        num_outputs: classes, or 1 for regression.
        layers: transformer layers (official ``cls_layers`` = 2).
        heads: attention heads; must divide ``in_dim``.
        dropout: attention, feed-forward, residual and embedding dropout.
    """

    def __init__(
        self, in_dim: int, dim: int, num_outputs: int, layers: int, heads: int, dropout: float
    ) -> None:
        super().__init__()
        if in_dim % heads:
            raise ConfigError(f"head_heads must divide the feature width {in_dim}, got {heads}")
        self.embed_scale = math.sqrt(in_dim)
        self.embed_dropout = nn.Dropout(dropout)
        self.layers = nn.ModuleList(
            nn.TransformerEncoderLayer(
                in_dim, heads, dim_feedforward=4 * in_dim, dropout=dropout, batch_first=True, norm_first=True
            )
            for _ in range(layers)
        )
        self.norm = nn.LayerNorm(in_dim)
        self.proj = nn.Linear(in_dim, dim)
        self.out_layer = nn.Linear(dim, num_outputs)
        self._positions: dict[tuple[int, torch.device, torch.dtype], Tensor] = {}

    def _table(self, length: int, like: Tensor) -> Tensor:
        key = (length, like.device, like.dtype)
        if key not in self._positions:
            self._positions[key] = sinusoidal_positions(
                length, like.shape[-1], device=like.device, dtype=like.dtype
            )
        return self._positions[key]

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        x = self.embed_dropout(x * self.embed_scale + self._table(x.shape[1], x))
        for layer in self.layers:
            x = layer(x)
        hidden = F.relu(self.proj(self.norm(x)[:, 0]))
        return self.out_layer(hidden), hidden


class VectorHead(nn.Module):
    """MLP classifier on a ``(B, in_dim)`` vector: ``layers`` x (Linear, ReLU, Dropout), ``out_layer``."""

    def __init__(self, in_dim: int, dim: int, num_outputs: int, layers: int, dropout: float) -> None:
        super().__init__()
        blocks: list[nn.Module] = []
        width = in_dim
        for _ in range(layers):
            blocks += [nn.Linear(width, dim), nn.ReLU(), nn.Dropout(dropout)]
            width = dim
        self.body = nn.Sequential(*blocks)
        self.out_layer = nn.Linear(dim, num_outputs)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        hidden = self.body(x)
        return self.out_layer(hidden), hidden


class MapHead(nn.Module):
    """Light segmentation decoder on a ``(B, in_channels, h, w)`` map; logits at the target size.

    ``layers`` x (3x3 conv, BatchNorm, ReLU), dropout, a 1x1 ``out_layer``; ``forward(x, size)``
    returns logits ``(B, num_outputs, *size)`` and the ``out_layer`` input ``(B, dim, h, w)``
    (before upsampling; the 1x1 ``out_layer`` commutes with the upsampling).
    """

    def __init__(self, in_channels: int, dim: int, num_outputs: int, layers: int, dropout: float) -> None:
        super().__init__()
        blocks: list[nn.Module] = []
        width = in_channels
        for _ in range(layers):
            blocks += [nn.Conv2d(width, dim, 3, padding=1, bias=False), nn.BatchNorm2d(dim), nn.ReLU()]
            width = dim
        blocks.append(nn.Dropout(dropout))
        self.body = nn.Sequential(*blocks)
        self.out_layer = nn.Conv2d(dim, num_outputs, kernel_size=1)

    def forward(self, x: Tensor, size: tuple[int, int] | None = None) -> tuple[Tensor, Tensor]:
        hidden = self.body(x)
        logits = self.out_layer(hidden)
        if size is not None and tuple(logits.shape[-2:]) != tuple(size):
            logits = resize_bilinear(logits, size, align_corners=True)
        return logits, hidden


def build_head(
    feature: Tensor,
    out_layer: nn.Module,
    num_outputs: int,
    *,
    modality: str,
    layers: int,
    heads: int | None,
    dropout: float,
) -> nn.Module:
    """The head for one modality, from one batch of its features and the fusion ``out_layer``.

    Raises:
        ShapeError: a feature that is not ``(B, d)``, ``(B, L, d)`` or ``(B, C, h, w)``, or a map
            feature with a linear fusion ``out_layer`` (and vice versa).
    """
    if isinstance(out_layer, nn.Linear):
        dim = out_layer.in_features
    elif isinstance(out_layer, nn.Conv2d):
        dim = out_layer.in_channels
    else:
        raise ConfigError(f"model.out_layer must be nn.Linear or nn.Conv2d, got {type(out_layer).__name__}")
    rank = feature.dim()
    if rank == 4:
        if not isinstance(out_layer, nn.Conv2d):
            raise ShapeError(
                f"features[{modality!r}] is a map {tuple(feature.shape)} but the fusion out_layer is "
                f"{type(out_layer).__name__}; map features need a 1x1 nn.Conv2d out_layer (segmentation)"
            )
        return MapHead(feature.shape[1], dim, num_outputs, layers, dropout)
    if isinstance(out_layer, nn.Conv2d):
        raise ShapeError(
            f"features[{modality!r}] has shape {tuple(feature.shape)}; a Conv2d fusion out_layer needs "
            "(B, C, h, w) map features"
        )
    if rank == 3:
        width = feature.shape[-1]
        n_heads = heads if heads is not None else _default_heads(width)
        return SequenceHead(feature.shape[-1], dim, num_outputs, layers, n_heads, dropout)
    if rank == 2:
        return VectorHead(feature.shape[-1], dim, num_outputs, layers, dropout)
    raise ShapeError(
        f"features[{modality!r}] has shape {tuple(feature.shape)}; expected (B, d), (B, L, d) or (B, C, h, w)"
    )


_RANK_SHAPES = {2: "vector features (B, d)", 3: "sequence features (B, L, d)"}


def _need_rank(feature: Tensor, rank: int, *, head: str, modality: str) -> None:
    """Raise ShapeError unless ``feature`` has ``rank`` dimensions (a head that reads one kind only)."""
    if feature.dim() != rank:
        raise ShapeError(
            f"head={head!r} needs {_RANK_SHAPES[rank]}; features[{modality!r}] is {tuple(feature.shape)}"
        )


def _default_heads(width: int) -> int:
    """The largest number of attention heads <= 5 (the official count at d = 40) dividing ``width``."""
    return max(h for h in range(1, 6) if width % h == 0)


class OfficialClassifier(nn.Module):
    """``models/msamodel.py:Classifier`` as released: the MulT/fairseq transformer at the feature
    width, token 0, ``proj1``, ``proj1`` again, ReLU, ``out_layer``. One dropout rate serves the
    attention, ReLU, residual and embedding dropouts (the official code passes the model's four)."""

    def __init__(self, dim: int, num_outputs: int, heads: int, layers: int, dropout: float) -> None:
        super().__init__()
        self.bone = MulTTransformer(
            dim, heads, layers, attn_dropout=dropout, relu_dropout=dropout, res_dropout=dropout,
            embed_dropout=dropout,
        )
        self.proj1 = nn.Linear(dim, dim)
        self.out_layer = nn.Linear(dim, num_outputs)

    def forward(self, x: Tensor) -> Tensor:
        x = self.proj1(self.bone(x)[:, 0])
        return self.out_layer(F.relu(self.proj1(x)))


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
    _need_rank(feature, 3, head="msa", modality=modality)
    width = feature.shape[-1]
    heads = config.head_heads if config.head_heads is not None else _default_heads(width)
    return OfficialClassifier(width, num_outputs, heads, config.head_layers, config.head_dropout)


@register_head("linear")
def linear_head(
    feature: Tensor, *, modality: str, out_layer: nn.Module, num_outputs: int, config: Any
) -> nn.Module:
    """A bare ``nn.Linear(d, K)`` on ``(B, d)`` features: the head is its own ``out_layer``."""
    _need_rank(feature, 2, head="linear", modality=modality)
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
