"""``BoostedClassifiers``: per-modality stacks of classifiers over one shared output layer, grown
during training (the configurable classifier module of AUG).

Classifier j of modality m maps the encoder feature ``z_m`` to ``o_{m,j} = W relu(L_{m,j} z_m)``: its
own hidden layer ``L_{m,j}`` and the output layer ``W`` shared by every classifier of every modality
(``njustkmg/NeurIPS25-AUG:model/AudioVideo.py``: ``embedding_a`` / ``additional_layers_a`` and
``fc_out``). Modality m's ensemble is the sum of its classifiers' outputs. Vector features use
linear layers (sequences pooled, maps average-pooled first); segmentation uses 1x1 convolutions on
the feature map, with the outputs upsampled to the label size.

Feature widths are known at the first forward, so the first classifier of every modality and the
shared layer are built then, together with their optimizer (the run's type). A classifier added
later (:meth:`BoostedClassifiers.add`) joins that optimizer as one parameter group. The run's seed,
the feature widths and the order of the additions are the module's extra state (one int64 tensor),
so loading a state dict into fresh stacks first rebuilds exactly the saved classifiers and parameter
groups, then loads their weights; loading a state with fewer classifiers (a best-validation
snapshot) removes the later ones. Weights are Xavier-normal with zero bias (the official
``weight_init``), drawn from private generators seeded by (seed, modality, index): building or adding
a classifier draws nothing from the global RNG.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mmbalance.errors import ConfigError, ShapeError
from mmbalance.methods._grads import step_auxiliary
from mmbalance.models.features import SEQUENCE_POOLS, feature_kind, pool_features

__all__ = ["BoostedClassifiers", "BoostedOutputs"]


class BoostedOutputs(NamedTuple):
    """One modality's outputs, shaped like the fused prediction.

    Attributes:
        total: the ensemble, the sum of every classifier's output.
        previous: the sum over every classifier but the newest (``None`` with one classifier).
        newest: the most recently added classifier's output (``None`` with one classifier).
    """

    total: Tensor
    previous: Tensor | None
    newest: Tensor | None


def _mixed_seed(seed: int, *parts: int) -> int:
    for p in parts:
        seed = (seed * 1_000_003 + int(p) + 1) % (2**63)
    return seed


class BoostedClassifiers(nn.Module):
    """Growing classifier stacks, one per modality, sharing one output layer.

    Args:
        modalities: the model's modalities, in order.
        task_name: ``"cls"`` or ``"seg"`` (the stacks produce class logits).
        num_outputs: K, the number of classes.
        hidden: width of every classifier's hidden layer.
        sequence_pool: how ``(B, L, d)`` features are pooled (``"mean"``, ``"first"``, ``"last"``).
        seed: seed of the private initialisation generators; default ``torch.initial_seed()``.
        optimizer_factory: the run's optimizer factory; ``None``: no optimizer.
        lr: learning rate of that optimizer (``None`` = the run's).
        train_added: added classifiers are trained (a parameter group each) or keep their
            initial weights (no gradient of their own; the released code's behaviour).
    """

    def __init__(
        self,
        modalities: Sequence[str],
        task_name: str,
        num_outputs: int,
        *,
        hidden: int = 256,
        sequence_pool: str = "mean",
        seed: int | None = None,
        optimizer_factory: Callable[..., torch.optim.Optimizer] | None = None,
        lr: float | None = None,
        train_added: bool = True,
    ) -> None:
        super().__init__()
        if task_name not in ("cls", "seg"):
            raise ConfigError(f"task_name must be 'cls' or 'seg' (class logits), got {task_name!r}")
        if not isinstance(hidden, int) or hidden < 1:
            raise ConfigError(f"hidden must be an integer >= 1, got {hidden!r}")
        if sequence_pool not in SEQUENCE_POOLS:
            raise ConfigError(f"sequence_pool must be one of {SEQUENCE_POOLS}, got {sequence_pool!r}")
        self.modalities = tuple(modalities)
        self.dense = task_name == "seg"
        self.num_outputs, self.hidden, self.sequence_pool = int(num_outputs), hidden, sequence_pool
        self.seed = int(torch.initial_seed() if seed is None else seed) % (2**63)
        self.train_added = train_added
        self.stacks = nn.ModuleDict()  # m -> ModuleList of hidden layers, oldest first
        self.output = nn.ModuleDict()  # "shared" -> the output layer W (registered now: loads find it)
        self.additions: list[int] = []  # modality index of every added classifier, in order
        self._widths: dict[str, int] = {}
        self._factory, self._lr = optimizer_factory, lr
        self.optimizer: torch.optim.Optimizer | None = None
        self.register_buffer("_device_anchor", torch.empty(0), persistent=False)

    @property
    def built(self) -> bool:
        return bool(self._widths)

    def counts(self) -> dict[str, int]:
        """Classifiers per modality (0 before the first forward)."""
        return {m: len(self.stacks[m]) if m in self.stacks else 0 for m in self.modalities}

    # -- building and growing ----------------------------------------------------------------------
    def _layer(self, in_dim: int, out_dim: int, *parts: int) -> nn.Module:
        with torch.device("meta"):
            layer = nn.Conv2d(in_dim, out_dim, kernel_size=1) if self.dense else nn.Linear(in_dim, out_dim)
        layer = layer.to_empty(device="cpu")
        generator = torch.Generator().manual_seed(_mixed_seed(self.seed, *parts))
        with torch.no_grad():
            nn.init.xavier_normal_(layer.weight, generator=generator)
            layer.bias.zero_()
        return layer.to(device=self._device_anchor.device)

    def _build(self, widths: Mapping[str, int]) -> None:
        for i, m in enumerate(self.modalities):
            self.stacks[m] = nn.ModuleList([self._layer(widths[m], self.hidden, i + 1, 0)])
        self.output["shared"] = self._layer(self.hidden, self.num_outputs, 0, 0)
        self._widths = {m: int(widths[m]) for m in self.modalities}
        if self._factory is not None:
            params = list(self.stacks.parameters()) + list(self.output.parameters())
            self.optimizer = self._factory(params, lr=self._lr)

    def add(self, modality: str) -> None:
        """Append a new classifier to ``modality``'s stack (a new parameter group of the optimizer
        when added classifiers are trained).

        Raises:
            ConfigError: before the stacks are built, or an unknown modality.
        """
        if not self.built:
            raise ConfigError("classifier stacks are built on the first forward; add classifiers after it")
        if modality not in self.modalities:
            raise ConfigError(f"modality {modality!r} not in {self.modalities}")
        i = self.modalities.index(modality)
        stack = self.stacks[modality]
        layer = self._layer(self._widths[modality], self.hidden, i + 1, len(stack))
        stack.append(layer)
        self.additions.append(i)
        if not self.train_added:
            layer.requires_grad_(False)
        elif self.optimizer is not None:
            self.optimizer.add_param_group({"params": list(layer.parameters())})

    def _remove_newest(self) -> None:
        stack = self.stacks[self.modalities[self.additions.pop()]]
        layer = stack[-1]
        del stack[-1]
        if self.train_added and self.optimizer is not None:
            group = self.optimizer.param_groups.pop()
            if {id(p) for p in group["params"]} != {id(p) for p in layer.parameters()}:
                raise ConfigError("classifier stacks and their optimizer's parameter groups are out of order")
            for p in group["params"]:
                self.optimizer.state.pop(p, None)

    # -- state --------------------------------------------------------------------------------------
    def get_extra_state(self) -> Tensor:
        """``[seed, M, width_1..width_M, additions...]`` as int64 (``[seed, 0]`` before building)."""
        widths = [self._widths[m] for m in self.modalities] if self.built else []
        return torch.tensor([self.seed, len(widths), *widths, *self.additions], dtype=torch.int64)

    def set_extra_state(self, state: Any) -> None:
        """Rebuild the saved stacks (runs before their weights load): build if unbuilt, then remove
        the additions that differ from the saved sequence and add the saved ones that are missing."""
        if not isinstance(state, Tensor) or state.dim() != 1 or state.numel() < 2:
            raise ShapeError(f"classifier stacks extra state must be a 1-D int64 tensor, got {state!r}")
        values = [int(v) for v in state.tolist()]
        n = values[1]
        widths, additions = values[2:2 + n], values[2 + n:]
        if n == 0:
            if self.built or additions:
                raise ShapeError("saved classifier stacks are unbuilt yet list additions, or these are built")
            self.seed = values[0]
            return
        if n != len(self.modalities) or any(not 0 <= a < n for a in additions):
            raise ShapeError(f"saved classifier stacks {values} do not fit the modalities {self.modalities}")
        layout = dict(zip(self.modalities, widths, strict=True))
        self.seed = values[0]
        if not self.built:
            self._build(layout)
        elif layout != self._widths:
            raise ShapeError(f"saved classifier stacks have widths {layout}, these {self._widths}")
        common = 0
        limit = min(len(additions), len(self.additions))
        while common < limit and additions[common] == self.additions[common]:
            common += 1
        while len(self.additions) > common:
            self._remove_newest()
        for i in additions[common:]:
            self.add(self.modalities[i])

    # -- forward ------------------------------------------------------------------------------------
    def _widths_of(self, features: Mapping[str, Tensor]) -> dict[str, int]:
        widths = {}
        for m in self.modalities:
            if m not in features:
                raise ShapeError(f"features has no modality {m!r}; expected keys {self.modalities}")
            kind = feature_kind(features[m], m)
            if self.dense and kind != "map":
                raise ShapeError(f"segmentation classifiers need map features (B, C, h, w), {m!r}: {kind}")
            widths[m] = int(features[m].shape[1] if kind == "map" else features[m].shape[-1])
        return widths

    def forward(
        self, features: Mapping[str, Tensor], out_size: Sequence[int] | None = None
    ) -> dict[str, BoostedOutputs]:
        """``{m: BoostedOutputs}``; builds the stacks on the first call. ``out_size`` (the label's
        ``(H, W)``) is required for segmentation.

        Raises:
            ShapeError: features of another width than the stacks were built for, non-map
                features for segmentation, or segmentation without ``out_size``.
        """
        widths = self._widths_of(features)
        if not self.built:
            self._build(widths)
        elif widths != self._widths:
            raise ShapeError(f"classifier stacks were built for feature widths {self._widths}, got {widths}")
        if self.dense and out_size is None:
            raise ShapeError("segmentation classifiers need out_size, the target's (H, W); got None")
        shared = self.output["shared"]
        out = {}
        for m in self.modalities:
            z = features[m] if self.dense else pool_features(features[m], self.sequence_pool)
            logits = [shared(F.relu(layer(z))) for layer in self.stacks[m]]
            parts: tuple[Tensor | None, ...] = (logits[0], None, None)
            if len(logits) > 1:  # summed in the order of ``AVGBShareClassifier.classfier``
                previous = logits[0]
                for x in logits[1:-1]:
                    previous = previous + x
                parts = (previous + logits[-1], previous, logits[-1])
            out[m] = BoostedOutputs(*(self._to_size(x, out_size) for x in parts))
        return out

    def _to_size(self, logits: Tensor | None, out_size: Sequence[int] | None) -> Tensor | None:
        if logits is None or not self.dense or out_size is None:
            return logits
        size = (int(out_size[-2]), int(out_size[-1]))
        if tuple(logits.shape[-2:]) == size:
            return logits
        return F.interpolate(logits, size=size, mode="bilinear", align_corners=False)

    def step(self, scaler: torch.amp.GradScaler) -> None:
        """Step and zero the stacks' optimizer through the run's GradScaler (nothing before building)."""
        if self.optimizer is not None:
            step_auxiliary(scaler, self.optimizer)

    def extra_repr(self) -> str:
        counts = self.counts()
        return f"hidden={self.hidden}, dense={self.dense}, counts={counts}, train_added={self.train_added}"
