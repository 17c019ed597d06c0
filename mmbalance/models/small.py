"""Small models for the synthetic benchmark: per-modality encoders, concatenation fusion, a head.

Three builders, chosen by the modality shapes of a :class:`~mmbalance.datasets.base.DatasetSpec`:

* ``small_mlp`` (cls, reg): every modality a vector ``(d,)``; MLP encoder -> ``(B, hidden)``.
* ``small_transformer`` (cls, reg): sequences ``(L, d)`` get a linear projection, sinusoidal
  positions and a pre-norm ``nn.TransformerEncoder`` -> ``(B, L, d_model)``; vectors an MLP ->
  ``(B, d_model)``. Fusion mean-pools each sequence over time, then concatenates.
* ``small_seg`` (seg): images ``(C, H, W)``; two 3x3 convolutions with GroupNorm (the first with
  stride 2) -> ``(B, channels, ceil(H/2), ceil(W/2))``; fusion concatenates along channels and mixes
  with a 3x3 conv (+ GN, ReLU); the head body upsamples bilinearly to ``(H, W)``; ``out_layer`` is a
  1x1 ``Conv2d``.

For cls/reg the head is ``Linear -> ReLU`` (body) then ``out_layer = Linear(head_hidden, C)``.
``ModelOutput.features[m]`` is each encoder's raw output (sequences keep their time axis), and
``modality_parameters(m)`` is that encoder's parameters (from :class:`MultimodalModel`), so the
groups are disjoint by construction. No layer carries running statistics (``small_seg`` uses
GroupNorm, not BatchNorm), so a zeroed modality (``drop``) or a masked pass never changes a buffer.
Weights are random (PyTorch's default initialisation under the caller's seed); nothing is downloaded.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from mmbalance.config import ConfigBase
from mmbalance.datasets.base import DatasetSpec
from mmbalance.errors import ShapeError, UnsupportedError
from mmbalance.models import register_model
from mmbalance.models.base import Head, ModelBuilder, MultimodalModel
from mmbalance.models.resize import BilinearResize

__all__ = [
    "MLPEncoder",
    "SequenceEncoder",
    "ConvEncoder",
    "PoolConcatFusion",
    "ConvConcatFusion",
    "group_norm",
    "SmallMLP",
    "SmallTransformer",
    "SmallSeg",
]


def _need(cond: bool, config: Any, field_name: str, expected: str) -> None:
    if not cond:
        raise ValueError(f"{field_name} must be {expected}, got {getattr(config, field_name)!r}")


def _positive_int(config: Any, *names: str) -> None:
    for name in names:
        value = getattr(config, name)
        _need(isinstance(value, int) and value >= 1, config, name, "an integer >= 1")


# -- encoders ------------------------------------------------------------------------------------
class MLPEncoder(nn.Module):
    """``(B, d_in) -> (B, hidden)``: ``layers`` x (Linear -> ReLU [-> Dropout])."""

    def __init__(self, d_in: int, hidden: int, layers: int, dropout: float = 0.0) -> None:
        super().__init__()
        blocks: list[nn.Module] = []
        width = d_in
        for _ in range(layers):
            blocks += [nn.Linear(width, hidden), nn.ReLU()]
            if dropout > 0:
                blocks.append(nn.Dropout(dropout))
            width = hidden
        self.net = nn.Sequential(*blocks)
        self.d_in = d_in

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 2 or x.shape[1] != self.d_in:
            raise ShapeError(f"MLPEncoder input must be (B, {self.d_in}), got {tuple(x.shape)}")
        return self.net(x)


def sinusoidal_positions(length: int, dim: int) -> Tensor:
    """``(length, dim)`` sine/cosine position codes (Vaswani et al. 2017)."""
    position = torch.arange(length, dtype=torch.float32).unsqueeze(1)
    freq = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32) * (-math.log(10000.0) / dim))
    pe = torch.zeros(length, dim)
    pe[:, 0::2] = torch.sin(position * freq)
    pe[:, 1::2] = torch.cos(position * freq[: dim // 2])
    return pe


class SequenceEncoder(nn.Module):
    """``(B, L, d_in) -> (B, L, d_model)``: Linear projection, + sinusoidal positions, a pre-norm
    ``nn.TransformerEncoder`` (batch first) and a final LayerNorm. ``L <= max_len``."""

    def __init__(
        self, d_in: int, d_model: int, heads: int, layers: int, ff: int, max_len: int, dropout: float = 0.0
    ) -> None:
        super().__init__()
        self.d_in = d_in
        self.proj = nn.Linear(d_in, d_model)
        layer = nn.TransformerEncoderLayer(
            d_model, heads, dim_feedforward=ff, dropout=dropout, batch_first=True, norm_first=True
        )
        self.encoder = nn.TransformerEncoder(
            layer, layers, norm=nn.LayerNorm(d_model), enable_nested_tensor=False
        )
        self.register_buffer("positions", sinusoidal_positions(max_len, d_model), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 3 or x.shape[2] != self.d_in:
            raise ShapeError(f"SequenceEncoder input must be (B, L, {self.d_in}), got {tuple(x.shape)}")
        length = x.shape[1]
        if length > self.positions.shape[0]:
            raise ShapeError(f"sequence length {length} exceeds max_len {self.positions.shape[0]}")
        h = self.proj(x) + self.positions[:length]
        return self.encoder(h)


def group_norm(channels: int) -> nn.GroupNorm:
    """GroupNorm with groups of (up to) 4 channels: per-sample statistics, no running buffers, so
    masked or zeroed passes never change the model's state."""
    return nn.GroupNorm(max(1, channels // 4), channels)


class ConvEncoder(nn.Module):
    """``(B, C, H, W) -> (B, channels, H/2, W/2)``: conv3x3 stride 2 -> GN -> ReLU -> conv3x3 -> GN -> ReLU.

    Striding first keeps every convolution at half resolution (4x fewer multiply-adds than a
    full-resolution first layer, and much faster on CPU for single-channel inputs); GroupNorm makes
    the few steps of a synthetic run enough to learn the segmentation."""

    def __init__(self, in_channels: int, channels: int) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.net = nn.Sequential(
            nn.Conv2d(in_channels, channels, 3, stride=2, padding=1),
            group_norm(channels),
            nn.ReLU(),
            nn.Conv2d(channels, channels, 3, padding=1),
            group_norm(channels),
            nn.ReLU(),
        )

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ShapeError(f"ConvEncoder input must be (B, {self.in_channels}, H, W), got {tuple(x.shape)}")
        return self.net(x)


# -- fusion --------------------------------------------------------------------------------------
class PoolConcatFusion(nn.Module):
    """Concatenation fusion: ``{m: (B, d_m) or (B, L, d_m)} -> (B, sum d_m)``; sequences are
    mean-pooled over time first (the synthetic sequences have no padding)."""

    def forward(self, features: Mapping[str, Tensor]) -> Tensor:
        pooled = [f.mean(dim=1) if f.dim() == 3 else f for f in features.values()]
        return torch.cat(pooled, dim=1)


class ConvConcatFusion(nn.Module):
    """``{m: (B, c, h, w)} -> (B, out_channels, h, w)``: channel concatenation, conv3x3, GN, ReLU
    (the shared decoder's mixing layer)."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.mix = nn.Sequential(
            nn.Conv2d(in_channels, out_channels, 3, padding=1), group_norm(out_channels), nn.ReLU()
        )

    def forward(self, features: Mapping[str, Tensor]) -> Tensor:
        return self.mix(torch.cat(list(features.values()), dim=1))


def _vector_head(d_in: int, hidden: int, num_outputs: int, dropout: float) -> Head:
    body: list[nn.Module] = [nn.Linear(d_in, hidden), nn.ReLU()]
    if dropout > 0:
        body.append(nn.Dropout(dropout))
    return Head(nn.Sequential(*body), nn.Linear(hidden, num_outputs))


def _check_task(builder: ModelBuilder, spec: DatasetSpec) -> None:
    if spec.task not in builder.tasks:
        raise UnsupportedError(
            f"model {builder.name!r} supports tasks {sorted(builder.tasks)}, not task {spec.task!r}"
        )


# -- builders ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SmallMLPConfig(ConfigBase):
    hidden: int = 64  # encoder width and feature size per modality
    layers: int = 2  # Linear+ReLU blocks per encoder (>= 2 lets encoders learn non-linear features)
    head_hidden: int = 64  # width of the fusion head's hidden layer
    dropout: float = 0.0  # dropout after each hidden ReLU (0 keeps runs cheap and deterministic)

    def check(self) -> None:
        _positive_int(self, "hidden", "layers", "head_hidden")
        _need(0.0 <= self.dropout < 1.0, self, "dropout", "in [0, 1)")


@register_model("small_mlp")
class SmallMLP(ModelBuilder):
    """MLP encoder per vector modality, concatenation fusion, MLP head (cls / reg)."""

    Config = SmallMLPConfig
    tasks = frozenset({"cls", "reg"})
    paper = "mmbalance small models (synthetic benchmark)"

    def __call__(self, spec: DatasetSpec) -> MultimodalModel:
        _check_task(self, spec)
        c = self.config
        encoders: dict[str, nn.Module] = {}
        for m, shape in spec.modalities.items():
            if len(shape) != 1 or shape[0] < 1:
                raise UnsupportedError(
                    f"model 'small_mlp' needs vector modalities (d,); "
                    f"modality {m!r} has shape {tuple(shape)} (use 'small_transformer' for sequences)"
                )
            encoders[m] = MLPEncoder(shape[0], c.hidden, c.layers, c.dropout)
        head = _vector_head(c.hidden * len(encoders), c.head_hidden, spec.num_outputs, c.dropout)
        return MultimodalModel(encoders, PoolConcatFusion(), head, modalities=spec.modality_names)


@dataclass(frozen=True)
class SmallTransformerConfig(ConfigBase):
    d_model: int = 32  # token width of every encoder (and vector-modality feature size)
    heads: int = 2  # attention heads (must divide d_model)
    layers: int = 1  # transformer layers per sequence encoder
    ff: int = 64  # feed-forward width inside each transformer layer
    max_len: int = 512  # longest sequence the position table covers (variable-length specs)
    head_hidden: int = 64  # width of the fusion head's hidden layer
    dropout: float = 0.0  # attention / feed-forward / head dropout

    def check(self) -> None:
        _positive_int(self, "d_model", "heads", "layers", "ff", "max_len", "head_hidden")
        _need(self.d_model % self.heads == 0, self, "d_model", f"divisible by heads ({self.heads})")
        _need(self.d_model % 2 == 0, self, "d_model", "even (sinusoidal positions)")
        _need(0.0 <= self.dropout < 1.0, self, "dropout", "in [0, 1)")


@register_model("small_transformer")
class SmallTransformer(ModelBuilder):
    """Transformer encoder per sequence modality (MLP for vectors), pooled concatenation fusion,
    MLP head (cls / reg)."""

    Config = SmallTransformerConfig
    tasks = frozenset({"cls", "reg"})
    paper = "mmbalance small models (synthetic benchmark)"

    def __call__(self, spec: DatasetSpec) -> MultimodalModel:
        _check_task(self, spec)
        c = self.config
        encoders: dict[str, nn.Module] = {}
        for m, shape in spec.modalities.items():
            if len(shape) == 2:
                length, dim = shape
                if dim < 1 or length > c.max_len:
                    raise UnsupportedError(
                        f"model 'small_transformer': modality {m!r} has shape {tuple(shape)}; "
                        f"expected (L, d) with d >= 1 and L <= max_len ({c.max_len}) or L = -1 (variable)"
                    )
                max_len = c.max_len if length == -1 else length
                encoders[m] = SequenceEncoder(dim, c.d_model, c.heads, c.layers, c.ff, max_len, c.dropout)
            elif len(shape) == 1 and shape[0] >= 1:
                encoders[m] = MLPEncoder(shape[0], c.d_model, 2, c.dropout)
            else:
                raise UnsupportedError(
                    f"model 'small_transformer' needs sequence (L, d) or vector (d,) modalities; "
                    f"modality {m!r} has shape {tuple(shape)}"
                )
        head = _vector_head(c.d_model * len(encoders), c.head_hidden, spec.num_outputs, c.dropout)
        return MultimodalModel(encoders, PoolConcatFusion(), head, modalities=spec.modality_names)


@dataclass(frozen=True)
class SmallSegConfig(ConfigBase):
    channels: int = 16  # feature channels of each modality encoder (at half resolution)
    decoder: int = 16  # channels of the fusion's mixing convolution (the out_layer input)

    def check(self) -> None:
        _positive_int(self, "channels", "decoder")


@register_model("small_seg")
class SmallSeg(ModelBuilder):
    """Conv encoder per image modality, channel-concat fusion + conv decoder, 1x1 conv out_layer."""

    Config = SmallSegConfig
    tasks = frozenset({"seg"})
    paper = "mmbalance small models (synthetic benchmark)"

    def __call__(self, spec: DatasetSpec) -> MultimodalModel:
        _check_task(self, spec)
        c = self.config
        if len(spec.target_shape) != 2:
            raise UnsupportedError(
                f"model 'small_seg' needs a (H, W) target shape, got {tuple(spec.target_shape)}"
            )
        size = (int(spec.target_shape[0]), int(spec.target_shape[1]))
        encoders: dict[str, nn.Module] = {}
        for m, shape in spec.modalities.items():
            if len(shape) != 3 or tuple(shape[1:]) != size or shape[0] < 1:
                raise UnsupportedError(
                    f"model 'small_seg' needs image modalities (C, {size[0]}, {size[1]}) "
                    f"matching the target; modality {m!r} has shape {tuple(shape)}"
                )
            encoders[m] = ConvEncoder(shape[0], c.channels)
        fusion = ConvConcatFusion(c.channels * len(encoders), c.decoder)
        # Bilinear upsampling commutes with the 1x1 out_layer, so the head is a per-pixel linear
        # read-out of the upsampled decoder features (fast and stable to train).
        body = BilinearResize(size, align_corners=False)
        head = Head(body, nn.Conv2d(c.decoder, spec.num_outputs, 1))
        return MultimodalModel(encoders, fusion, head, modalities=spec.modality_names)
