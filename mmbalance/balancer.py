"""The Balancer interface: the points of the training step where a balancing method may act.

The runner (:mod:`mmbalance.train`) owns the loop; a balancer only reacts at named hooks. The exact
order, asserted by ``tests/test_hook_order.py`` with a GradScaler and a clipping spy::

    setup
    [epoch: on_train_epoch_start
        [step: forward_step -> loss_terms -> (finite check, deferred) -> backward
               -> scaler.unscale_(optimizer) -> on_after_backward -> clip_grad_norm_
               -> scaler.step(optimizer) -> on_after_optimizer_step -> scaler.update
               -> optimizer.zero_grad]
     -> validate -> on_validation_end]
    -> test with the best-validation state

A balancer never calls ``zero_grad`` or ``step`` on the main optimizer, never picks a device and
never reads globals. Its own optimizers (auxiliary heads) are its own business: it steps and
zeroes them itself, through ``ctx.scaler`` so that AMP loss scaling stays consistent. Because
``Balancer`` is an ``nn.Module``, auxiliary heads and buffers follow ``.to(device)``, enter
``state_dict`` and are counted in the memory overhead.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import Tensor, nn

from mmbalance.epoch_means import EpochMeans
from mmbalance.errors import ConfigError, UnsupportedError

if TYPE_CHECKING:
    from torch.utils.data import DataLoader

    from mmbalance.datasets.base import DatasetSpec
    from mmbalance.models.base import ModelOutput, MultimodalModel
    from mmbalance.tasks import Task

__all__ = ["Balancer", "StepContext", "EpochContext", "OptimizerFactory", "NoConfig"]

# ``optimizer_factory(params, lr=None, **overrides)`` builds an optimizer of the run's type.
OptimizerFactory = Callable[..., torch.optim.Optimizer]


@dataclass(frozen=True)
class NoConfig:
    """Config of a method without hyperparameters."""


@dataclass(frozen=True)
class StepContext:
    """What a step hook sees. Frozen: hooks edit gradients and their own state, not the context.

    Attributes:
        model: the model being trained (train mode).
        batch: the step's batch, on the device.
        output: the ``forward_step`` output.
        terms: the named loss terms (graph-carrying tensors).
        optimizer: the main optimizer (read only for hooks: never step or zero it).
        scaler: the run's ``torch.amp.GradScaler`` (disabled when AMP is off).
        step: global step index, from 0.
        epoch: epoch index, from 0.
        step_in_epoch: step index within the epoch, from 0.
        steps_per_epoch: number of steps in an epoch.
    """

    model: MultimodalModel
    batch: Mapping[str, Tensor]
    output: ModelOutput
    terms: Mapping[str, Tensor]
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    step: int
    epoch: int
    step_in_epoch: int
    steps_per_epoch: int


@dataclass(frozen=True)
class EpochContext:
    """What epoch-level hooks see.

    ``train_loader`` and ``val_loader`` are the only data a method may use for statistics
    (G-Blending, MSLR, MSES, PMR prototypes); test data never reaches a balancer. A multi-stage
    method counts the training steps it runs outside the main loop in ``self._extra_steps``
    (reported by :meth:`Balancer.extra_steps` in the cost record).
    """

    model: MultimodalModel
    epoch: int
    num_epochs: int
    train_loader: DataLoader
    val_loader: DataLoader
    task: Task
    device: torch.device
    optimizer: torch.optim.Optimizer
    to_device: Callable[[Mapping[str, Tensor]], dict[str, Tensor]]


class Balancer(nn.Module):
    """Base class of every balancing method. ``joint`` training overrides nothing.

    Class attributes set by each method:
        name: registry name (set by ``@register_method``).
        Config: frozen dataclass of hyperparameters; defaults are the paper's; ``__post_init__``
            validates ranges and raises ``ValueError`` naming the field.
        presets: per-dataset paper settings, e.g. ``{"mosi": {"rho": 1.3, "lam": 0.2}}``.
        tasks: subset of ``{"cls", "reg", "seg"}``.
        min_modalities / max_modalities: supported modality counts (``None`` = unbounded).
        paper: short citation shown by ``mmbalance list``: ``"Wei et al., ICCV 2025 (owner/repo)"``
            (first author, venue and year, official repository); the full one is in the card.
        grad_edit_scope: model parts ("encoders", "fusion", "head") whose gradients the method
            edits in ``on_after_backward``.

    Set by :meth:`setup` for subclasses: :attr:`model`, ``modalities``, ``task``, and
    ``epoch_means``, an :class:`~mmbalance.epoch_means.EpochMeans` over the modalities into which
    step hooks record device statistics and from which ``diagnostics()`` reads their epoch means.
    """

    name: ClassVar[str] = "balancer"
    Config: ClassVar[type] = NoConfig
    presets: ClassVar[Mapping[str, Mapping[str, Any]]] = {}
    tasks: ClassVar[frozenset[str]] = frozenset({"cls", "reg", "seg"})
    min_modalities: ClassVar[int] = 2
    max_modalities: ClassVar[int | None] = None
    paper: ClassVar[str] = ""
    # Parts of the model whose gradients ``on_after_backward`` may edit: any of "encoders",
    # "fusion", "head". The registry-wide contract test checks that edits stay inside.
    grad_edit_scope: ClassVar[frozenset[str]] = frozenset()

    def __init__(self, config: Any = None) -> None:
        super().__init__()
        self.config = config if config is not None else self.Config()
        self.modalities: tuple[str, ...] = ()
        self.task: Task | None = None
        self.__dict__["_model_ref"] = None

    @property
    def model(self) -> MultimodalModel:
        """The model being trained (set by :meth:`setup`): a reference, not a submodule, so it stays
        out of the balancer's ``state_dict``, parameters and memory count.

        Raises:
            ConfigError: before ``setup``.
        """
        model = self.__dict__.get("_model_ref")
        if model is None:
            raise ConfigError(f"method {self.name!r}: the model is known only after setup()")
        return model

    # -- capabilities -------------------------------------------------------------------------
    @classmethod
    def supports(cls, task: str | None = None, modalities: int | None = None, **_: Any) -> bool:
        """Whether the method declares ``task`` and the modality count ``modalities``."""
        if task is not None and task not in cls.tasks:
            return False
        if modalities is not None:
            if modalities < cls.min_modalities:
                return False
            if cls.max_modalities is not None and modalities > cls.max_modalities:
                return False
        return True

    def check_supported(self, spec: DatasetSpec) -> None:
        """Raise UnsupportedError if the dataset's task or modality count is not declared."""
        m = len(spec.modalities)
        if spec.task not in self.tasks:
            raise UnsupportedError(
                f"method {self.name!r} supports tasks {sorted(self.tasks)}, not task {spec.task!r}"
            )
        hi = "any" if self.max_modalities is None else self.max_modalities
        if not self.supports(modalities=m):
            raise UnsupportedError(
                f"method {self.name!r} supports {self.min_modalities} to {hi} modalities, the dataset has {m}"
            )

    # -- hooks --------------------------------------------------------------------------------
    def setup(self, model: MultimodalModel, task: Task, optimizer_factory: OptimizerFactory) -> None:
        """Once, before the first epoch, after the model is on its device: build auxiliary heads,
        own optimizers, parameter groups. Modules created here must be moved with
        ``self.to(device)``; the runner calls ``balancer.to(device)`` right after ``setup``. Subclasses
        call ``super().setup`` first: it checks the task against :attr:`tasks` (raising
        :class:`~mmbalance.errors.UnsupportedError`), records the modalities, the task and
        :attr:`model`, and makes ``epoch_means``."""
        if task.name not in self.tasks:
            raise UnsupportedError(
                f"method {self.name!r} supports tasks {sorted(self.tasks)}, not task {task.name!r}"
            )
        self.modalities = tuple(model.modalities)
        self.task = task
        self.__dict__["_model_ref"] = model  # a plain reference (see ``model``), not a submodule
        self.epoch_means = EpochMeans(self.modalities)

    def on_train_epoch_start(self, ctx: EpochContext) -> None:
        """At the start of each training epoch, model in train mode: epoch-level work
        (prototypes, re-weighting, extra training stages)."""

    def forward_step(self, model: MultimodalModel, batch: Mapping[str, Tensor]) -> ModelOutput:
        """The training forward pass; default ``model(batch)``. Override for masked passes."""
        return model(batch)

    def loss_terms(self, output: ModelOutput, batch: Mapping[str, Tensor], task: Task) -> dict[str, Tensor]:
        """Named loss terms; the runner checks each for finiteness and ``backward`` sums them.
        Default: ``{"task": task.loss(prediction, target)}``."""
        return {"task": task.loss(output.prediction, batch["target"])}

    def backward(self, terms: Mapping[str, Tensor], scaler: torch.amp.GradScaler) -> None:
        """One backward of the (scaled) sum of the terms. Override for per-loss backward passes."""
        scaler.scale(sum_terms(terms)).backward()

    def on_after_backward(self, ctx: StepContext) -> None:
        """After backward and AMP unscaling of the main optimizer's gradients, BEFORE gradient
        clipping and the optimizer step: the place to edit ``p.grad`` (modulation, projection)."""

    def on_after_optimizer_step(self, ctx: StepContext) -> None:
        """After the main optimizer step, before ``scaler.update()`` and ``zero_grad``: step and
        zero own optimizers (through ``ctx.scaler.step``), update running statistics."""

    def on_validation_end(self, epoch: int, metrics: Mapping[str, float]) -> None:
        """After each epoch's validation, with validation metrics only (never test)."""

    def predict(self, output: ModelOutput) -> Tensor:
        """Test-time fusion rule; default ``output.prediction``."""
        return output.prediction

    def diagnostics(self) -> dict[str, float]:
        """Per-epoch scalars for the run history (coefficients, ...). Called once per epoch,
        so it may synchronise with the device."""
        return {}

    # -- helpers for subclasses -----------------------------------------------------------------
    def auxiliary_optimizers(self) -> list[torch.optim.Optimizer]:
        """Own optimizers, counted in the memory overhead and saved in the training state: every
        optimizer attribute of the balancer and of its submodules (``UnimodalHeads.optimizer``), in a
        fixed order (attributes, then submodules in registration order), each once."""
        found: list[torch.optim.Optimizer] = []
        for module in self.modules():
            for value in vars(module).values():
                if isinstance(value, torch.optim.Optimizer) and all(value is not o for o in found):
                    found.append(value)
        return found

    def host_state(self) -> dict[str, Any]:
        """Training state kept outside tensors (Python counters, lists), for checkpoints; default
        none. A method that keeps such state across epochs returns it here as JSON-able values and
        restores it in :meth:`load_host_state`."""
        return {}

    def load_host_state(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`host_state` returned."""
        if state:
            raise ConfigError(f"method {self.name!r} keeps no host state, got keys {sorted(state)}")

    def training_state(self) -> dict[str, Any]:
        """Everything a resumed run needs: ``state_dict`` (heads, buffers), every own optimizer's
        state (:meth:`auxiliary_optimizers`), :meth:`host_state` and the :meth:`extra_steps` count."""
        return {
            "module": self.state_dict(),
            "optimizers": [o.state_dict() for o in self.auxiliary_optimizers()],
            "host": self.host_state(),
            "extra_steps": self.extra_steps(),
        }

    def load_training_state(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`training_state` into a balancer after ``setup`` (lazily built heads are
        built from the saved layout first, then their optimizers are loaded).

        Raises:
            ConfigError: the number of saved optimizers differs from this balancer's.
        """
        self.load_state_dict(state["module"])
        optimizers = self.auxiliary_optimizers()
        saved = list(state["optimizers"])
        if len(saved) != len(optimizers):
            raise ConfigError(
                f"method {self.name!r}: saved state has {len(saved)} optimizers, this balancer has "
                f"{len(optimizers)}"
            )
        for optimizer, optimizer_state in zip(optimizers, saved, strict=True):
            optimizer.load_state_dict(optimizer_state)
        self.load_host_state(state.get("host", {}))
        if state.get("extra_steps"):
            self._extra_steps = int(state["extra_steps"])

    def inference_state_dict(self) -> dict[str, Tensor]:
        """State needed at test time (e.g. UME's unimodal heads); default none, so training-only
        heads (CGGM) stay out of saved inference checkpoints."""
        return {}

    def extra_steps(self) -> int:
        """Training steps run outside the main loop (teachers, stages); recorded in the cost."""
        return getattr(self, "_extra_steps", 0)


def sum_terms(terms: Mapping[str, Tensor]) -> Tensor:
    """Sum of the loss terms; raises on an empty mapping."""
    values = list(terms.values())
    if not values:
        raise ConfigError("loss_terms returned no terms; expected at least {'task': ...}")
    total = values[0]
    for v in values[1:]:
        total = total + v
    return total

