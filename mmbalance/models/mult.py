"""``mult``: the MulT-style transformer model of CGGM's CMU-MOSI / MOSEI / IEMOCAP experiments.

Official code: ``zrguo/CGGM`` ``models/msamodel.py:MSAModel`` (the model),
``modules/transformer.py:TransformerEncoder`` (the block), ``modules/position_embedding.py``
(fairseq sinusoidal positions); settings from ``run/mosi_run.py`` and ``run/iemo_run.py``.

Architecture (``d = proj_dim = 40``, 5 heads)::

    encoders[m]  = proj:  Conv1d(d_m -> d, kernel 1)            (B, L_m, d_m) -> (B, L_m, d)
                   transformer: MulT encoder, nlevels layers     -> features[m] (B, L_m, d)
    fusion       = MulT encoder, nlevels - 2 layers, over the sequence concatenation of the
                   features in fusion order; the fused token is position 0     -> (B, d)
    head.body    = residual MLP  h + proj2(dropout(relu(proj1(h))))             -> (B, d)
    head.out_layer = Linear(d, C)                    (C = classes, or 1 for regression)

The MulT block (:class:`MulTTransformer`) is the official fairseq-style encoder: input scaled by
``sqrt(d)`` plus sinusoidal positions, embedding dropout, pre-norm layers (self-attention and a
``4d`` ReLU feed-forward, each a dropped-out residual branch), a final LayerNorm, no attention
mask. Layers are torch's ``nn.TransformerEncoderLayer(norm_first=True)`` with the official
per-site dropouts (attention weights, between the FFN linears, residual branches) and the official
initialisation (Xavier-uniform weights, zero biases).

Differences from the official code (none changes the function computed, except the last):

* batch-first tensors ``(B, L, d)``; the official code is sequence-first ``(L, B, d)``;
* attention through ``nn.MultiheadAttention`` (scaled dot product, softmax, dropout on the
  weights: the official arithmetic);
* the positional table is a cached buffer; positions start at 1 and a token whose first input
  channel is exactly 0 is treated as padding and gets the zero row, as fairseq's
  ``make_positions`` does (with ``padding_idx = 0``);
* **CGGM note**: the input projection ``Conv1d`` lives inside ``encoders[m]`` (as
  ``encoders[m].proj``) so that ``modality_parameters(m)`` is the whole modality branch. The
  official ``src/msatrain.py`` scales only parameters whose name contains ``encoders.{i}`` — the
  transformer — and NOT ``proj.{i}``. A method that wants the official scope uses
  ``model.encoders[m].transformer.parameters()`` (see ``methods/cggm.md``);
* fusion order: the official model concatenates ``[text, audio, vision]``, so the fused token is
  the first text step for MOSI and IEMOCAP alike. ``fusion_first`` names the modality placed
  first (the presets set ``"text"``); the others follow in dataset order; ``""`` keeps the
  dataset order.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from mmbalance.config import ConfigBase
from mmbalance.errors import ConfigError, ShapeError, UnsupportedError
from mmbalance.models import register_model
from mmbalance.models.base import Head, ModelBuilder, MultimodalModel

__all__ = [
    "MulTConfig",
    "MulTBuilder",
    "MulTTransformer",
    "MulTLayer",
    "MulTEncoder",
    "SequenceConcatFusion",
    "ResidualMLP",
    "sinusoidal_table",
    "check_dropouts",
]


def sinusoidal_table(num_positions: int, dim: int) -> Tensor:
    """fairseq / tensor2tensor sinusoidal table ``(num_positions, dim)``; row 0 (padding) is zero.

    Row ``p`` is ``[sin(p * w_0..w_{h-1}), cos(p * w_0..w_{h-1})]`` with ``h = dim // 2`` and
    ``w_i = exp(-i * ln(10000) / (h - 1))`` (sines and cosines concatenated, not interleaved); an
    odd ``dim`` gets a zero last column.
    """
    if dim < 4:
        raise ConfigError(f"positional dim must be >= 4, got {dim}")
    half = dim // 2
    scale = math.log(10000) / (half - 1)
    # float32 arithmetic, as the official get_embedding (bitwise-equal table)
    freqs = torch.exp(torch.arange(half, dtype=torch.float32) * -scale)
    angles = torch.arange(num_positions, dtype=torch.float32).unsqueeze(1) * freqs.unsqueeze(0)
    table = torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)
    if dim % 2 == 1:
        table = torch.cat([table, torch.zeros(num_positions, 1)], dim=1)
    table[0] = 0
    return table


class SinusoidalPositions(nn.Module):
    """Positions of ``(B, L, d)`` tokens: ``1..L``, or 0 (zero row) where channel 0 is exactly 0."""

    def __init__(self, dim: int, init_size: int = 512) -> None:
        super().__init__()
        self.dim = dim
        self.register_buffer("table", sinusoidal_table(init_size + 1, dim), persistent=False)

    def forward(self, x_in: Tensor) -> Tensor:
        batch, length = x_in.shape[0], x_in.shape[1]
        if length + 1 > self.table.shape[0]:
            grown = sinusoidal_table(2 * length + 1, self.dim).to(self.table.device, self.table.dtype)
            self.table = grown
        steps = torch.arange(1, length + 1, device=x_in.device).expand(batch, length)
        positions = torch.where(x_in[..., 0] != 0, steps, torch.zeros_like(steps))
        return self.table[positions].to(x_in.dtype)


class MulTLayer(nn.TransformerEncoderLayer):
    """Pre-norm MulT layer: ``x + drop_res(MHA(LN(x)))``, then ``x + drop_res(FFN(LN(x)))``.

    ``FFN = Linear(d, 4d) -> ReLU -> drop_relu -> Linear(4d, d)``; attention weights dropped with
    ``attn_dropout``. Batch-first ``(B, L, d)``.
    """

    def __init__(
        self, dim: int, num_heads: int, attn_dropout: float, relu_dropout: float, res_dropout: float
    ) -> None:
        super().__init__(
            dim,
            num_heads,
            dim_feedforward=4 * dim,
            dropout=res_dropout,
            activation="relu",
            batch_first=True,
            norm_first=True,
        )
        # torch uses one rate everywhere; set the official per-site rates.
        self.self_attn.dropout = attn_dropout  # on the softmax weights
        self.dropout.p = relu_dropout  # between linear1 and linear2
        self.dropout1.p = res_dropout  # attention residual branch
        self.dropout2.p = res_dropout  # feed-forward residual branch
        # Official init (modules/transformer.py:Linear, multihead_attention.reset_parameters).
        for linear in (self.linear1, self.linear2, self.self_attn.out_proj):
            nn.init.xavier_uniform_(linear.weight)
            nn.init.zeros_(linear.bias)


class MulTTransformer(nn.Module):
    """The official MulT/fairseq encoder on batch-first tokens ``(B, L, d) -> (B, L, d)``.

    ``LN(layers(dropout(sqrt(d) * x + positions(x))))``.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        num_layers: int,
        *,
        attn_dropout: float = 0.0,
        relu_dropout: float = 0.0,
        res_dropout: float = 0.0,
        embed_dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if dim % num_heads != 0:
            raise ConfigError(
                f"proj_dim must be divisible by num_heads, got proj_dim={dim}, num_heads={num_heads}"
            )
        if num_layers < 0:
            raise ConfigError(f"num_layers must be >= 0, got {num_layers}")
        self.dim = dim
        self.embed_scale = math.sqrt(dim)
        self.positions = SinusoidalPositions(dim)
        self.embed_dropout = nn.Dropout(embed_dropout)
        self.layers = nn.ModuleList(
            MulTLayer(dim, num_heads, attn_dropout, relu_dropout, res_dropout) for _ in range(num_layers)
        )
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: Tensor) -> Tensor:
        h = self.embed_scale * x + self.positions(x)
        h = self.embed_dropout(h)
        for layer in self.layers:
            h = layer(h)
        return self.norm(h)


class MulTEncoder(nn.Module):
    """One modality's branch: ``proj`` Conv1d(d_in -> d, k=1), then ``transformer``.

    Input ``(B, L, d_in)`` floats (any float dtype; cast to the weights' dtype), output
    ``(B, L, d)``.
    """

    def __init__(self, modality: str, in_dim: int, transformer: MulTTransformer) -> None:
        super().__init__()
        self.modality = modality
        self.in_dim = in_dim
        self.proj = nn.Conv1d(in_dim, transformer.dim, kernel_size=1)
        self.transformer = transformer

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 3 or x.shape[-1] != self.in_dim:
            raise ShapeError(
                f"modality {self.modality!r}: expected features (B, L, {self.in_dim}), got {tuple(x.shape)}"
            )
        x = x.to(self.proj.weight.dtype)
        h = self.proj(x.transpose(1, 2)).transpose(1, 2)
        return self.transformer(h)


class SequenceConcatFusion(nn.Module):
    """Concatenate ``(B, L_m, d)`` features along the sequence in ``order``, encode, take token 0."""

    def __init__(self, order: Sequence[str], transformer: MulTTransformer) -> None:
        super().__init__()
        self.order = tuple(order)
        self.transformer = transformer

    def forward(self, features: Mapping[str, Tensor]) -> Tensor:
        sequence = torch.cat([features[m] for m in self.order], dim=1)
        return self.transformer(sequence)[:, 0]


class ResidualMLP(nn.Module):
    """``h + proj2(dropout(relu(proj1(h))))`` (the official output block before ``out_layer``)."""

    def __init__(self, dim: int, dropout: float) -> None:
        super().__init__()
        self.proj1 = nn.Linear(dim, dim)
        self.proj2 = nn.Linear(dim, dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, h: Tensor) -> Tensor:
        return h + self.proj2(self.dropout(torch.relu(self.proj1(h))))


def check_dropouts(config: Any, names: Sequence[str]) -> None:
    """Raise ValueError naming the first field of ``names`` outside ``[0, 1)``."""
    for name in names:
        value = getattr(config, name)
        if not (isinstance(value, int | float) and 0.0 <= value < 1.0):
            raise ValueError(f"{name} must be a probability in [0, 1), got {value!r}")


def check_transformer_sizes(config: Any) -> None:
    """Shared range checks of ``proj_dim``, ``num_heads``, ``nlevels`` (ValueError naming the field)."""
    if not (isinstance(config.proj_dim, int) and config.proj_dim >= 4):
        raise ValueError(f"proj_dim must be an integer >= 4, got {config.proj_dim!r}")
    if not (isinstance(config.num_heads, int) and config.num_heads >= 1):
        raise ValueError(f"num_heads must be an integer >= 1, got {config.num_heads!r}")
    if config.proj_dim % config.num_heads != 0:
        raise ValueError(
            f"proj_dim must be divisible by num_heads, got proj_dim={config.proj_dim}, "
            f"num_heads={config.num_heads}"
        )
    if not (isinstance(config.nlevels, int) and config.nlevels >= 3):
        raise ValueError(
            f"nlevels must be an integer >= 3 (the fusion has nlevels - 2 layers), got {config.nlevels!r}"
        )


_DROPOUTS = ("attn_dropout", "relu_dropout", "res_dropout", "embed_dropout", "out_dropout")


@dataclass(frozen=True)
class MulTConfig(ConfigBase):
    """MulT-style model sizes; defaults are CGGM's CMU-MOSI run script (``run/mosi_run.py``)."""

    proj_dim: int = 40  # d: width of every transformer (official `proj_dim`)
    num_heads: int = 5  # attention heads; proj_dim must be divisible by it
    nlevels: int = 5  # encoder layers per modality; the fusion has nlevels - 2 (MOSI 5, IEMOCAP 4)
    attn_dropout: float = 0.15  # dropout on the attention weights
    relu_dropout: float = 0.15  # dropout between the feed-forward linears
    res_dropout: float = 0.1  # dropout on each residual branch
    embed_dropout: float = 0.2  # dropout after scaling + positions, at each transformer's input
    out_dropout: float = 0.1  # dropout inside the residual MLP head
    # modality whose sequence goes first in the fusion (its step 0 is the fused token); "" = dataset order
    fusion_first: str = ""

    def check(self) -> None:
        check_transformer_sizes(self)
        check_dropouts(self, _DROPOUTS)
        if not isinstance(self.fusion_first, str):
            raise ValueError(f"fusion_first must be a modality name or '', got {self.fusion_first!r}")


def fusion_order(modalities: Sequence[str], first: str) -> tuple[str, ...]:
    """``first`` then the other modalities in dataset order (``first == ""``: dataset order)."""
    if not first:
        return tuple(modalities)
    if first not in modalities:
        raise ConfigError(
            f"fusion_first must be one of the dataset's modalities {tuple(modalities)} or '', got {first!r}"
        )
    return (first, *(m for m in modalities if m != first))


def make_transformer(config: Any, num_layers: int) -> MulTTransformer:
    return MulTTransformer(
        config.proj_dim,
        config.num_heads,
        num_layers,
        attn_dropout=config.attn_dropout,
        relu_dropout=config.relu_dropout,
        res_dropout=config.res_dropout,
        embed_dropout=config.embed_dropout,
    )


_IEMOCAP = {  # run/iemo_run.py
    "nlevels": 4,
    "attn_dropout": 0.15,
    "relu_dropout": 0.15,
    "res_dropout": 0.15,
    "embed_dropout": 0.2,
    "out_dropout": 0.2,
    "fusion_first": "text",
}
_MOSI = {  # run/mosi_run.py (also used for MOSEI, which the official scripts run with the same defaults)
    "nlevels": 5,
    "attn_dropout": 0.15,
    "relu_dropout": 0.15,
    "res_dropout": 0.1,
    "embed_dropout": 0.2,
    "out_dropout": 0.1,
    "fusion_first": "text",
}


@register_model("mult")
class MulTBuilder(ModelBuilder):
    """MulT-style transformer for sequence features (MOSI, MOSEI, IEMOCAP).

    ``spec.modalities[m]`` must be a per-sample ``(L, d_m)`` shape (``L`` may be ``-1``); the
    output is ``(B, C)`` logits for ``cls`` and ``(B, 1)`` for ``reg``.
    """

    Config = MulTConfig
    presets = {"mosi": _MOSI, "mosei": _MOSI, "iemocap": _IEMOCAP}
    tasks = frozenset({"cls", "reg"})
    paper = "MulT-style transformer (Tsai et al., ACL 2019) as used by CGGM (Guo et al., NeurIPS 2024)"

    def __call__(self, spec: Any) -> MultimodalModel:
        cfg: MulTConfig = self.config
        if spec.task not in self.tasks:
            raise UnsupportedError(
                f"model 'mult' supports tasks {sorted(self.tasks)}, got task {spec.task!r}"
            )
        in_dims: dict[str, int] = {}
        for m, shape in spec.modalities.items():
            shape = tuple(shape)
            if len(shape) != 2 or shape[-1] < 1:
                raise ConfigError(
                    f"model 'mult' needs per-sample (L, d) sequence features; "
                    f"modality {m!r} has shape {shape}"
                )
            in_dims[m] = int(shape[-1])
        order = fusion_order(spec.modality_names, cfg.fusion_first)
        outputs = 1 if spec.task == "reg" else int(spec.num_outputs)
        encoders = {m: MulTEncoder(m, d, make_transformer(cfg, cfg.nlevels)) for m, d in in_dims.items()}
        fusion = SequenceConcatFusion(order, make_transformer(cfg, cfg.nlevels - 2))
        head = Head(ResidualMLP(cfg.proj_dim, cfg.out_dropout), nn.Linear(cfg.proj_dim, outputs))
        return MultimodalModel(encoders, fusion, head, modalities=spec.modality_names)
