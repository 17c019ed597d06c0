"""The bodies of CGGM's classifier heads f_i (Guo et al., NeurIPS 2024; ``zrguo/CGGM``), by the
rank of the modality's feature; which factory builds them is :mod:`mmbalance.methods._cggm_heads`.

* sequence ``(B, L, d)``: the official ``models/msamodel.py:Classifier``: a fairseq/MulT-style
  transformer at the feature width d (input x sqrt(d) + sinusoidal positions, ``layers`` pre-norm
  layers with a 4d feed-forward, final LayerNorm), token 0, ``Linear + ReLU``, ``out_layer``
  (:class:`SequenceHead`; :class:`OfficialClassifier` is the released one, ``proj1`` applied twice);
* vector ``(B, d)``: ``layers`` x (Linear, ReLU, Dropout), ``out_layer`` (:class:`VectorHead`);
* map ``(B, C, h, w)``: a light decoder (``layers`` x 3x3 conv-BN-ReLU, dropout) and a 1x1
  ``out_layer``, upsampled bilinearly (``align_corners=True``, as ``models/segmodel.py:SegClassifier``)
  to the target's spatial size (:class:`MapHead`).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mmbalance.errors import ConfigError, ShapeError
from mmbalance.models.mult import MulTTransformer
from mmbalance.models.resize import resize_bilinear

__all__ = [
    "SequenceHead", "VectorHead", "MapHead", "OfficialClassifier", "build_head", "sinusoidal_positions",
    "need_rank", "default_heads",
]


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
        n_heads = heads if heads is not None else default_heads(width)
        return SequenceHead(feature.shape[-1], dim, num_outputs, layers, n_heads, dropout)
    if rank == 2:
        return VectorHead(feature.shape[-1], dim, num_outputs, layers, dropout)
    raise ShapeError(
        f"features[{modality!r}] has shape {tuple(feature.shape)}; expected (B, d), (B, L, d) or (B, C, h, w)"
    )


_RANK_SHAPES = {2: "vector features (B, d)", 3: "sequence features (B, L, d)"}


def need_rank(feature: Tensor, rank: int, *, head: str, modality: str) -> None:
    """Raise ShapeError unless ``feature`` has ``rank`` dimensions (a head that reads one kind only)."""
    if feature.dim() != rank:
        raise ShapeError(
            f"head={head!r} needs {_RANK_SHAPES[rank]}; features[{modality!r}] is {tuple(feature.shape)}"
        )


def default_heads(width: int) -> int:
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
