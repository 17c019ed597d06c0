"""Per-modality (unimodal) prediction heads on encoder features, shared by the balancing methods.

Many methods need a prediction from each modality alone (OGM-GE's confidence ratio, G-Blending's
per-modality losses, MMPareto's unimodal gradients, QMF/UME/MLA's unimodal predictions, ...).
mmbalance never slices the fusion head for that (only valid for linear concat/sum heads; see
``OGM-GE_CVPR2022#2/#20/#33``): a method builds its own heads on ``ModelOutput.features[m]``.

Head architecture by feature kind (``features[m]`` shape) and task:

* vector ``(B, d)``: ``Linear(d, K)``, or ``Linear(d, hidden) -> ReLU -> Linear(hidden, K)``;
* sequence ``(B, L, d)``: pooled over L (``mean``, or the ``first`` / ``last`` token), then as a vector;
* map ``(B, C, h, w)``: cls/reg: global average pooling, then as a vector; seg: a 1x1 conv to K
  (or ``3x3 conv(hidden) -> ReLU -> 1x1 conv``), bilinearly upsampled to the target's ``(H, W)``.

K is ``task.num_outputs`` (classes for cls/seg, 1 for reg). Output shapes match the fused
prediction's: cls ``(B, K)``, reg ``(B, 1)``, seg ``(B, K, H, W)``.

Feature shapes are unknown when a balancer's ``setup`` runs, so the heads are built on the first
``forward`` (lazy init), on the features' device. Their initial weights come from a private
``torch.Generator`` seeded at construction, so building them draws nothing from the global RNG: a
method whose heads do not touch the model (detached features) leaves the model's training
trajectory bit-identical to ``joint``. The built layout is saved in the state dict (extra state), so
loading a trained state dict into fresh, unbuilt heads builds them first.

The heads own their optimizer: given an ``optimizer_factory`` (the run's optimizer type, from
``Balancer.setup``), they create it when they are built and step it with :meth:`UnimodalHeads.step`
(through the run's GradScaler) from the method's ``on_after_optimizer_step``. With ``detach=True``
the heads read detached features, so their loss never reaches the encoders; with ``detach=False``
it does. Their loss terms are named ``unimodal/<modality>`` (:data:`HEAD_TERM`) in every method.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from mmbalance.errors import ConfigError, ShapeError
from mmbalance.methods._grads import step_auxiliary
from mmbalance.models.features import (
    FEATURE_KINDS,
    SEQUENCE_POOLS,
    build_with_generator,
    feature_kind,
    pool_features,
)
from mmbalance.models.resize import resize_bilinear

__all__ = ["UnimodalHeads", "head_term", "HEAD_TERM"]

_KINDS = FEATURE_KINDS
HEAD_TERM = "unimodal/{}"  # the loss term of modality m's head, in every method


def head_term(modality: str) -> str:
    """``unimodal/<modality>``: the name of a unimodal head's loss term."""
    return HEAD_TERM.format(modality)


class _VectorHead(nn.Module):
    """Pool (for sequences / maps) then a linear or 2-layer MLP head: ``(B, ...) -> (B, K)``."""

    def __init__(self, in_dim: int, num_outputs: int, hidden: int | None, sequence_pool: str) -> None:
        super().__init__()
        self.sequence_pool = sequence_pool
        if hidden is None:
            self.net: nn.Module = nn.Linear(in_dim, num_outputs)
        else:
            self.net = nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU(), nn.Linear(hidden, num_outputs))

    def forward(self, feature: Tensor, out_size: tuple[int, int] | None = None) -> Tensor:
        return self.net(pool_features(feature, self.sequence_pool))


class _MapHead(nn.Module):
    """Dense head for segmentation: ``(B, C, h, w) -> (B, K, H, W)`` (1x1 conv, bilinear upsample)."""

    def __init__(self, in_dim: int, num_outputs: int, hidden: int | None) -> None:
        super().__init__()
        if hidden is None:
            self.net: nn.Module = nn.Conv2d(in_dim, num_outputs, kernel_size=1)
        else:
            self.net = nn.Sequential(
                nn.Conv2d(in_dim, hidden, kernel_size=3, padding=1),
                nn.ReLU(),
                nn.Conv2d(hidden, num_outputs, kernel_size=1),
            )

    def forward(self, feature: Tensor, out_size: tuple[int, int] | None = None) -> Tensor:
        logits = self.net(feature)
        if out_size is not None and tuple(logits.shape[-2:]) != tuple(out_size):
            logits = resize_bilinear(logits, out_size, align_corners=False)
        return logits


class UnimodalHeads(nn.Module):
    """One prediction head per modality on ``features[m]``, built lazily on the first forward.

    Args:
        modalities: the modalities to build heads for (usually ``model.modalities``).
        task_name: ``"cls"``, ``"reg"`` or ``"seg"`` (``task.name``).
        num_outputs: K, the width of each head's output (``task.num_outputs``).
        hidden: ``None`` for a single linear (1x1 conv) layer, else the hidden width of a 2-layer head.
        sequence_pool: how ``(B, L, d)`` features are pooled: ``"mean"``, ``"first"`` or ``"last"``.
        detach: read detached features (heads learn, encoders do not see the head loss).
        seed: seed of the private init generator; default ``torch.initial_seed()`` (the run's seed,
            read without consuming the global RNG).
        optimizer_factory: the run's optimizer factory (``Balancer.setup``'s argument); when given,
            the heads create their optimizer when they are built. ``None``: no optimizer (heads
            trained by the main optimizer or not at all).
        lr: the heads' learning rate (``None`` = the run's).
        optimizer_options: further keyword arguments of the factory (``weight_decay``, ``foreach``).

    ``forward(features, out_size=None) -> {m: prediction}``; ``out_size`` (the target's ``(H, W)``)
    is required for segmentation.
    """

    def __init__(
        self,
        modalities: Sequence[str],
        task_name: str,
        num_outputs: int,
        *,
        hidden: int | None = None,
        sequence_pool: str = "mean",
        detach: bool = True,
        seed: int | None = None,
        optimizer_factory: Callable[..., torch.optim.Optimizer] | None = None,
        lr: float | None = None,
        optimizer_options: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if not modalities:
            raise ConfigError("modalities must name at least one modality for unimodal heads, got none")
        if task_name not in ("cls", "reg", "seg"):
            raise ConfigError(f"task_name must be one of 'cls', 'reg', 'seg', got {task_name!r}")
        if not isinstance(num_outputs, int) or num_outputs < 1:
            raise ConfigError(f"num_outputs must be an integer >= 1, got {num_outputs!r}")
        if hidden is not None and (not isinstance(hidden, int) or hidden < 1):
            raise ConfigError(f"hidden must be None or an integer >= 1, got {hidden!r}")
        if sequence_pool not in SEQUENCE_POOLS:
            raise ConfigError(f"sequence_pool must be one of {SEQUENCE_POOLS}, got {sequence_pool!r}")
        self.modalities = tuple(modalities)
        self.task_name = task_name
        self.num_outputs = num_outputs
        self.hidden = hidden
        self.sequence_pool = sequence_pool
        self.detach = detach
        self.seed = int(torch.initial_seed() if seed is None else seed) % (2**63)
        self.heads = nn.ModuleDict()
        self._layout: dict[str, tuple[str, int]] = {}  # m -> (feature kind, input width)
        self._optimizer_factory = optimizer_factory
        self._optimizer_args = {"lr": lr, **dict(optimizer_options or {})}
        self.optimizer: torch.optim.Optimizer | None = None
        # Follows .to(device); heads built from a state dict are created on its device.
        self.register_buffer("_device_anchor", torch.empty(0), persistent=False)

    @classmethod
    def for_task(cls, modalities: Sequence[str], task: Any, **options: Any) -> UnimodalHeads:
        """Heads sized for a :class:`~mmbalance.tasks.Task` (``task.name``, ``task.num_outputs``)."""
        return cls(modalities, task.name, int(task.num_outputs), **options)

    @property
    def built(self) -> bool:
        """Whether the heads exist (after the first forward or a state-dict load)."""
        return len(self._layout) == len(self.modalities)

    # -- building ---------------------------------------------------------------------------------
    def _build(self, layout: Mapping[str, tuple[str, int]], device: torch.device, dtype: torch.dtype) -> None:
        for index, m in enumerate(self.modalities):
            kind, in_dim = layout[m]
            if kind not in _KINDS:
                raise ShapeError(
                    f"unimodal head layout for {m!r} has kind {kind!r}; expected one of {_KINDS}"
                )
            if self.task_name == "seg" and kind != "map":
                raise ShapeError(
                    f"segmentation heads need map features (B, C, h, w); features[{m!r}] is a {kind} feature"
                )
            # Built on the meta device (nn.Linear's own init would draw from the global RNG), then
            # materialised and initialised from the private generator.
            if self.task_name == "seg":
                factory = functools.partial(_MapHead, in_dim, self.num_outputs, self.hidden)
            else:
                factory = functools.partial(
                    _VectorHead, in_dim, self.num_outputs, self.hidden, self.sequence_pool
                )
            generator = torch.Generator().manual_seed((self.seed + 7919 * (index + 1)) % (2**63))
            self.heads[m] = build_with_generator(factory, generator, device, dtype)
        self._layout = {m: (layout[m][0], int(layout[m][1])) for m in self.modalities}
        if self._optimizer_factory is not None:
            self.optimizer = self._optimizer_factory(list(self.heads.parameters()), **self._optimizer_args)

    def _layout_of(self, features: Mapping[str, Tensor]) -> dict[str, tuple[str, int]]:
        layout = {}
        for m in self.modalities:
            if m not in features:
                raise ShapeError(f"features has no modality {m!r}; expected keys {self.modalities}")
            f = features[m]
            kind = feature_kind(f, m)
            layout[m] = (kind, int(f.shape[1] if kind == "map" else f.shape[-1]))
        return layout

    # -- forward --------------------------------------------------------------------------------
    def forward(
        self, features: Mapping[str, Tensor], out_size: Sequence[int] | None = None
    ) -> dict[str, Tensor]:
        """Unimodal predictions ``{m: (B, K) | (B, K, H, W)}``; builds the heads on the first call.

        Raises:
            ShapeError: a feature of an unsupported rank, a feature whose width differs from the one
                the heads were built for, non-map features for segmentation, or segmentation
                without ``out_size``.
        """
        layout = self._layout_of(features)
        if not self.built:
            first = features[self.modalities[0]]
            dtype = first.dtype if first.dtype in (torch.float32, torch.float64) else torch.float32
            self._build(layout, first.device, dtype)
        elif layout != self._layout:
            raise ShapeError(f"unimodal heads were built for features {self._layout}, got {layout}")
        if self.task_name == "seg" and out_size is None:
            raise ShapeError("segmentation heads need out_size, the target's (H, W); got None")
        size = None if out_size is None else (int(out_size[-2]), int(out_size[-1]))
        out = {}
        for m in self.modalities:
            f = features[m].detach() if self.detach else features[m]
            out[m] = self.heads[m](f, size)
        return out

    def loss_terms(self, predictions: Mapping[str, Tensor], target: Tensor, task: Any) -> dict[str, Tensor]:
        """``{"unimodal/<m>": task.loss(predictions[m], target)}`` (mean-reduced), in modality order."""
        return {head_term(m): task.loss(predictions[m], target) for m in self.modalities}

    # -- own optimizer --------------------------------------------------------------------------
    def step(self, scaler: torch.amp.GradScaler) -> None:
        """Step and zero the heads' optimizer through the run's GradScaler (unscales, skips inf
        steps); nothing before the heads are built or without an optimizer factory."""
        if self.optimizer is not None:
            step_auxiliary(scaler, self.optimizer)

    # -- state ----------------------------------------------------------------------------------
    def get_extra_state(self) -> Tensor:
        """The built layout as an int64 tensor ``(M, 2)`` of (kind code, input width) in modality
        order; ``(0, 2)`` before the heads are built. A tensor, so state dicts stay tensor-only."""
        built = [m for m in self.modalities if m in self._layout]
        rows = [[_KINDS.index(self._layout[m][0]), self._layout[m][1]] for m in built]
        return torch.tensor(rows, dtype=torch.int64).reshape(-1, 2)

    def set_extra_state(self, state: Any) -> None:
        """Build unbuilt heads from a saved layout (runs before the heads' weights are loaded)."""
        if not isinstance(state, Tensor) or state.dim() != 2 or state.shape[1] != 2:
            raise ShapeError(f"unimodal heads extra state must be an (M, 2) layout tensor, got {state!r}")
        if state.shape[0] == 0:
            return
        if state.shape[0] != len(self.modalities):
            raise ShapeError(
                f"saved unimodal heads are for {state.shape[0]} modalities, "
                f"expected {len(self.modalities)} {self.modalities}"
            )
        rows = state.tolist()
        if any(not 0 <= code < len(_KINDS) for code, _ in rows):
            raise ShapeError(f"saved unimodal heads layout has unknown kind codes: {rows}")
        layout = {
            m: (_KINDS[code], int(width)) for m, (code, width) in zip(self.modalities, rows, strict=True)
        }
        if self.built:
            if layout != self._layout:
                raise ShapeError(f"saved unimodal heads have layout {layout}, these heads {self._layout}")
            return
        self._build(layout, self._device_anchor.device, torch.float32)

    def extra_repr(self) -> str:
        return (
            f"task={self.task_name}, num_outputs={self.num_outputs}, hidden={self.hidden}, "
            f"sequence_pool={self.sequence_pool}, detach={self.detach}, built={self.built}"
        )
