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

Every head returns ``(logits, hidden)`` where ``hidden`` is its ``out_layer`` input (``(B, d)`` or
``(B, d, h, w)``), used by the paper-mode closed-form gradient.

:class:`CGGMHeads` holds the M heads, builds them on the first batch (feature shapes are unknown
before it) from a private RNG stream, and owns their optimizer (the official ``cls_optimizer``),
stepped through the run's GradScaler like :class:`~mmbalance.methods._heads.UnimodalHeads`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mmbalance.errors import ConfigError, ShapeError
from mmbalance.methods._grads import step_auxiliary

__all__ = ["SequenceHead", "VectorHead", "MapHead", "CGGMHeads", "build_head", "sinusoidal_positions"]


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
            logits = F.interpolate(logits, size=size, mode="bilinear", align_corners=True)
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
        n_heads = heads if heads is not None else max(h for h in range(1, 6) if width % h == 0)
        return SequenceHead(feature.shape[-1], dim, num_outputs, layers, n_heads, dropout)
    if rank == 2:
        return VectorHead(feature.shape[-1], dim, num_outputs, layers, dropout)
    raise ShapeError(
        f"features[{modality!r}] has shape {tuple(feature.shape)}; expected (B, d), (B, L, d) or (B, C, h, w)"
    )


class CGGMHeads(nn.ModuleDict):
    """The heads f_i (``self[m]``), built on the first batch, and their own optimizer.

    Args:
        modalities: one head per modality, in this order.
        factory: ``factory(feature, modality) -> nn.Module`` building modality ``m``'s head from one
            batch of its (detached) features.
        seed: seed of the private RNG stream the heads are initialised from (building them leaves
            the global RNG, and so the model's dropout masks, untouched).
        optimizer_factory: the run's optimizer factory; called once the heads exist as
            ``optimizer_factory(params, lr=lr, foreach=True, **optimizer_options)``.

    ``forward(features, size)`` returns the heads' logits and their ``out_layer`` inputs, both in
    modality order. The heads follow the balancer's train/eval mode.
    """

    def __init__(
        self,
        modalities: Sequence[str],
        factory: Callable[[Tensor, str], nn.Module],
        *,
        seed: int,
        optimizer_factory: Callable[..., torch.optim.Optimizer],
        lr: float,
        optimizer_options: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.modalities = tuple(modalities)
        self._factory = factory
        self._seed = seed
        self._optimizer_factory = optimizer_factory
        self._optimizer_args: dict[str, Any] = {"lr": lr, "foreach": True, **dict(optimizer_options or {})}
        self.optimizer: torch.optim.Optimizer | None = None

    @property
    def built(self) -> bool:
        return len(self) == len(self.modalities)

    def build(self, features: Mapping[str, Tensor]) -> None:
        """Build every head from one batch of features, on their device; create the optimizer."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self._seed)
            for m in self.modalities:
                self[m] = self._factory(features[m], m)
        self.to(features[self.modalities[0]].device)
        self.train(self.training)
        # foreach: one multi-tensor update for all head parameters (torch's CPU default loops in Python)
        self.optimizer = self._optimizer_factory(list(self.parameters()), **self._optimizer_args)

    def forward(
        self, features: Mapping[str, Tensor], size: tuple[int, int] | None = None
    ) -> tuple[list[Tensor], list[Tensor]]:
        """``(logits, hidden)``: each head on its modality's detached feature (map heads upsampled
        to ``size``), and each head's ``out_layer`` input."""
        if not self.built:
            self.build(features)
        logits, hidden = [], []
        for m in self.modalities:
            head = self[m]
            feature = features[m].detach()
            z, h = head(feature, size) if isinstance(head, MapHead) else head(feature)
            logits.append(z)
            hidden.append(h)
        return logits, hidden

    def out_weights(self) -> Tensor:
        """``(M, K)``: the heads' flattened ``out_layer`` weights, detached (the official ``cal_cos``
        compares them with the fusion head's)."""
        return torch.stack([self[m].out_layer.weight.detach() for m in self.modalities]).flatten(1)

    def step(self, scaler: torch.amp.GradScaler) -> None:
        """Step and zero the heads' optimizer through the run's GradScaler (once built)."""
        if self.optimizer is not None:
            step_auxiliary(scaler, self.optimizer)

    def optimizers(self) -> list[torch.optim.Optimizer]:
        """The heads' own optimizer, once built."""
        return [self.optimizer] if self.optimizer is not None else []
