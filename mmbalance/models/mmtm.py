"""MMTM: the multimodal transfer module (Joze, Shaban, Iuzzolino, Koishida; CVPR 2020) on two features.

A mid-fusion block: squeeze each modality's feature to a vector, excite each with sigmoid gates
computed from both, so information crosses between the two branches. Greedy multimodal learning
(``mmbalance.methods.greedy``) places it between the encoders and the fusion and, during its
*curation* windows, replaces one modality's gate by that gate's running average
(``nyukat/greedy_multimodal_learning:src/balanced_mmtm.py`` ``MMTM_mitigate``).

Feature shapes are unknown until the first forward, so the block is built lazily, on the features'
device and in their dtype (float64 for a float64 model, float32 otherwise), with PyTorch's default
initialisation drawn from a private generator (nothing is drawn from the global RNG). The built
layout is saved as extra state, so a fresh block loads a trained state dict.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from mmbalance.errors import ConfigError, ShapeError
from mmbalance.models.features import build_with_generator, feature_kind, pool_features

__all__ = ["MMTM"]

_KINDS = ("vector", "sequence", "map")


class _MMTMCore(nn.Module):
    """``fc_squeeze`` over the concatenated squeezed features, one excitation layer per modality."""

    def __init__(self, dims: tuple[int, int], ratio: int) -> None:
        super().__init__()
        hidden = int(2 * (dims[0] + dims[1]) / ratio)
        if hidden < 1:
            raise ConfigError(f"MMTM hidden width int(2 * {sum(dims)} / ratio={ratio}) is 0; lower ratio")
        self.fc_squeeze = nn.Linear(dims[0] + dims[1], hidden)
        self.fc_excite = nn.ModuleList([nn.Linear(hidden, dims[0]), nn.Linear(hidden, dims[1])])


class MMTM(nn.Module):
    """Multimodal transfer module on two features, built lazily on the first forward.

    Squeeze: vector ``(B, d)`` as is, sequence ``(B, L, d)`` mean over L, map ``(B, C, h, w)`` mean
    over (h, w). ``Z = ReLU(fc_squeeze([s_0, s_1]))`` with ``hidden = int(2 (d_0 + d_1) / ratio)``,
    gates ``σ(fc_m(Z))`` of width ``d_m`` broadcast over L or (h, w); the outputs have the inputs'
    shapes. Keeps the running average of each modality's batch-mean gate (training forwards only).

    Args:
        ratio: squeeze ratio (``MMTM(c, c, 4)`` in the official ``model.py``).
        seed: seed of the private generator the weights are drawn from.
    """

    def __init__(self, ratio: int, seed: int) -> None:
        super().__init__()
        if not isinstance(ratio, int) or ratio < 1:
            raise ConfigError(f"ratio must be an integer >= 1, got {ratio!r}")
        self.ratio = ratio
        self.seed = seed
        self.core: _MMTMCore | None = None
        self._layout: tuple[tuple[str, int], ...] = ()
        self.register_buffer("running_gate_0", torch.zeros(0))
        self.register_buffer("running_gate_1", torch.zeros(0))
        self.register_buffer("gate_steps", torch.zeros(()))
        self.register_buffer("_device_anchor", torch.empty(0), persistent=False)
        self.register_load_state_dict_pre_hook(_resize_running_gates)

    @property
    def built(self) -> bool:
        return self.core is not None

    def _build(self, layout: tuple[tuple[str, int], ...], device: torch.device, dtype: torch.dtype) -> None:
        dims = (layout[0][1], layout[1][1])
        generator = torch.Generator().manual_seed(self.seed % (2**63))
        self.core = build_with_generator(
            functools.partial(_MMTMCore, dims, self.ratio), generator, device, dtype
        )
        for name, d in (("running_gate_0", dims[0]), ("running_gate_1", dims[1])):
            if getattr(self, name).shape != (d,):  # already sized (and loaded) when built from a state dict
                setattr(self, name, torch.zeros(d, device=device, dtype=dtype))
        self._layout = layout

    @staticmethod
    def _broadcast(gate: Tensor, kind: str) -> Tensor:
        if kind == "vector":
            return gate
        if kind == "sequence":
            return gate[:, None, :]
        return gate[:, :, None, None]

    def forward(
        self, features: tuple[Tensor, Tensor], curation: Tensor | None = None, caring: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """Gated features. In training, with ``curation`` (bool 0-d tensor) true, modality
        ``caring``'s (int 0-d tensor) gate is its running average, so no information from the
        other modality reaches it; in eval mode ``curation`` is ignored.

        Raises:
            ShapeError: a feature of an unsupported rank, or of another layout than the built one.
        """
        layout = []
        for i, f in enumerate(features):
            kind = feature_kind(f, f"modality {i}")
            layout.append((kind, int(f.shape[-1] if kind == "sequence" else f.shape[1])))
        layout_t = tuple(layout)
        if not self.built:
            first = features[0].dtype  # the model's dtype (float32 for half-precision features)
            self._build(layout_t, features[0].device, first if first == torch.float64 else torch.float32)
        elif layout_t != self._layout:
            raise ShapeError(f"MMTM was built for features {self._layout}, got {layout_t}")
        core = self.core
        assert core is not None
        squeezed = torch.cat([pool_features(f).to(core.fc_squeeze.weight.dtype) for f in features], dim=1)
        z = torch.relu(core.fc_squeeze(squeezed))
        gates = [torch.sigmoid(core.fc_excite[i](z)) for i in range(2)]
        if self.training:
            with torch.no_grad():  # running average of the batch-mean gates (MMTM_mitigate.forward)
                n = self.gate_steps
                self.running_gate_0.copy_((gates[0].mean(0) + self.running_gate_0 * n) / (n + 1))
                self.running_gate_1.copy_((gates[1].mean(0) + self.running_gate_1 * n) / (n + 1))
                self.gate_steps += 1
            if curation is not None and caring is not None:
                running = (self.running_gate_0, self.running_gate_1)
                gates = [
                    torch.where(curation & (caring == i), running[i].expand_as(gates[i]), gates[i])
                    for i in range(2)
                ]
        out = tuple(
            f * self._broadcast(g, k).to(f.dtype)
            for f, g, (k, _) in zip(features, gates, layout_t, strict=True)
        )
        return out[0], out[1]

    def get_extra_state(self) -> Tensor:
        """The built layout as an int64 ``(2, 2)`` tensor of (kind code, width); ``(0, 2)`` unbuilt."""
        rows = [[_KINDS.index(k), d] for k, d in self._layout]
        return torch.tensor(rows, dtype=torch.int64).reshape(-1, 2)

    def set_extra_state(self, state: Any) -> None:
        """Build an unbuilt block from a saved layout (before its weights are loaded)."""
        if not isinstance(state, Tensor) or state.dim() != 2 or state.shape[1] != 2:
            raise ShapeError(f"MMTM extra state must be a (2, 2) layout tensor, got {state!r}")
        if state.shape[0] == 0:
            return
        layout = tuple((_KINDS[int(c)], int(d)) for c, d in state.tolist())
        if self.built:
            if layout != self._layout:
                raise ShapeError(f"saved MMTM layout {layout} differs from this one {self._layout}")
            return
        self._build(layout, self._device_anchor.device, torch.float32)


def _resize_running_gates(module: MMTM, state_dict: Mapping[str, Any], prefix: str, *args: Any) -> None:
    """Load pre-hook: size the running-gate buffers like the saved ones before loading."""
    for name in ("running_gate_0", "running_gate_1"):
        key = prefix + name
        if key in state_dict and getattr(module, name).shape != state_dict[key].shape:
            setattr(module, name, torch.zeros_like(state_dict[key], device=module._device_anchor.device))
