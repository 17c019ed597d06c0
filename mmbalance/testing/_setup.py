"""What the contract checks train: the method under test, its synthetic tasks, a short trainer.

A check builds a fresh :class:`~mmbalance.train.Trainer` exactly as a run does (the task's default
model, the method's resolved config, the run's optimizer) and feeds it the first three training
batches, so that each check takes a fraction of a second on a CPU.
"""

from __future__ import annotations

import difflib
import functools
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from mmbalance.balancer import Balancer, EpochContext
from mmbalance.datasets import DATASETS
from mmbalance.datasets.base import MultimodalDataset
from mmbalance.errors import ConfigError
from mmbalance.methods import METHODS
from mmbalance.models import MODELS
from mmbalance.registry import config_fields, resolve_dataclass
from mmbalance.tasks import Task, make_task
from mmbalance.train import AmpMode, TrainConfig, Trainer, batch_to_device, make_loader, seed_everything

__all__ = [
    "SYNTHETIC_TASKS",
    "FAST_STAGES",
    "Subject",
    "subject",
    "declared_tasks",
    "as_device",
    "task_data",
    "contract_trainer",
    "start_epoch",
    "run_steps",
]

# The embedded synthetic tasks (no data root, no download): every check runs on these.
SYNTHETIC_TASKS: tuple[str, ...] = ("synthetic_cls2", "synthetic_cls3", "synthetic_reg3", "synthetic_seg4")
# Extra-stage lengths cut to two batches, where a method's Config has these fields, so that
# multi-stage methods (G-Blending estimation, UMT / G2D teachers, ReconBoost stages) run their real
# code paths in seconds.
FAST_STAGES: Mapping[str, int] = {"estimate_batches": 2, "teacher_batches": 2, "boost_batches": 2}
BATCH_SIZE = 16
STEPS = 3  # training batches each trainer gets


@dataclass(frozen=True)
class Subject:
    """The method under test: its name (for messages), its class and config overrides."""

    name: str
    cls: type[Balancer]
    options: Mapping[str, Any] = field(default_factory=dict)

    def build(self, dataset: str) -> Balancer:
        """A fresh balancer for ``dataset``: Config defaults <- :data:`FAST_STAGES` (and, for a
        method with a ``modality`` field, the task's last modality) <- ``options``.

        Raises:
            ConfigError: an unknown key or an out-of-range value in ``options``.
        """
        spec = task_data(dataset)[1]
        fields = config_fields(self.cls.Config)
        values: dict[str, Any] = {k: v for k, v in FAST_STAGES.items() if k in fields}
        if "modality" in fields:
            values["modality"] = spec.modality_names[-1]
        values.update(self.options)
        return self.cls(resolve_dataclass(self.cls.Config, values, owner=f"method {self.name!r}"))


def subject(method: str | type[Balancer] | Subject, options: Mapping[str, Any] | None = None) -> Subject:
    """The :class:`Subject` for a registered name (built-in or plugin) or a ``Balancer`` subclass
    (registered or not); ``options`` are config overrides applied on every task.

    Raises:
        RegistryError: an unknown name (with the close match) or a plugin that failed to import.
        TypeError: ``method`` is neither a name nor a ``Balancer`` subclass.
    """
    if isinstance(method, Subject):
        return method if options is None else Subject(method.name, method.cls, {**method.options, **options})
    if isinstance(method, str):
        return Subject(method, METHODS.get(method), dict(options or {}))
    if isinstance(method, type) and issubclass(method, Balancer):
        registered = method.name in METHODS and METHODS.get(method.name) is method
        return Subject(method.name if registered else method.__qualname__, method, dict(options or {}))
    raise TypeError(
        f"method must be a registered method name or a Balancer subclass, got {method!r} "
        f"({type(method).__name__})"
    )


def declared_tasks(method: Subject, tasks: Iterable[str] | None = None) -> list[str]:
    """The synthetic tasks the method declares (task kind and modality count), or ``tasks`` checked
    against them.

    Raises:
        ConfigError: ``tasks`` names a task that is not synthetic or that the method does not
            declare (naming it, the close match and the declared ones), or is empty.
    """
    available = [t for t in SYNTHETIC_TASKS if t in DATASETS]
    kinds = {t: (DATASETS.get(t).task, len(DATASETS.get(t).modality_names)) for t in available}
    declared = [t for t in available if method.cls.supports(task=kinds[t][0], modalities=kinds[t][1])]
    if tasks is None:
        return declared
    if isinstance(tasks, str):
        tasks = [tasks]
    chosen = list(dict.fromkeys(tasks))
    if not chosen:
        raise ConfigError(f"tasks must name at least one synthetic task, got {list(tasks)!r}")
    for t in chosen:
        if t not in available:
            close = difflib.get_close_matches(str(t), available, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ConfigError(f"tasks: {t!r} is not a synthetic task{hint} Expected one of {available}")
        if t not in declared:
            raise ConfigError(
                f"tasks: method {method.name!r} does not declare {t!r} (task {kinds[t][0]!r}, "
                f"{kinds[t][1]} modalities); it declares {declared or 'none of them'}"
            )
    return chosen


def as_device(device: str | torch.device) -> torch.device:
    """``device`` as a ``torch.device`` (``"cpu"``, ``"cuda"``, ``"cuda:1"``).

    Raises:
        ConfigError: naming ``device`` and the value, when it is no device torch knows, or a CUDA
            device on a machine without one.
    """
    try:
        out = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ConfigError(f"device must be a torch device such as 'cpu' or 'cuda', got {device!r}") from exc
    if out.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {device!r}: CUDA is not available on this machine")
    if out.type not in ("cpu", "cuda"):
        raise ConfigError(f"device must be 'cpu' or a CUDA device, got {device!r}")
    return out


@functools.cache
def task_data(dataset: str) -> tuple[MultimodalDataset, Any, Task]:
    """``(dataset, spec, task)`` of a synthetic task at its default size (built once per process)."""
    ds = DATASETS.build(dataset)
    spec = ds.spec
    return ds, spec, make_task(spec.task, spec.num_outputs, **dict(spec.task_options))


def contract_trainer(
    method: str | type[Balancer] | Subject, dataset: str, seed: int = 0, init_seed: int | None = None,
    epoch: int = 0, epochs: int = 2, device: torch.device | str = "cpu", amp: AmpMode = "none", *,
    options: Mapping[str, Any] | None = None, train_options: Mapping[str, Any] | None = None,
) -> tuple[Trainer, list[dict[str, torch.Tensor]]]:
    """A trainer of ``method`` on ``dataset`` after ``on_train_epoch_start`` of ``epoch``, and the
    first :data:`STEPS` training batches of 16, on ``device`` (AMP mode ``amp``, CUDA only).

    ``seed`` is the run's seed (loader order); ``init_seed`` (default ``seed``) seeds the global RNG
    that draws the initial weights. ``options`` / ``train_options``: more method config /
    :class:`~mmbalance.train.TrainConfig` fields.
    """
    target = subject(method, options)
    device = torch.device(device)
    ds, spec, task = task_data(dataset)
    cfg = TrainConfig(batch_size=BATCH_SIZE, seed=seed, epochs=epochs, eval_modality_scores=False,
                      cost_steps=0, amp=amp, **(train_options or {}))
    seed_everything(seed if init_seed is None else init_seed)
    model = MODELS.build(spec.default_model)(spec)
    balancer = target.build(dataset)
    train_loader = make_loader(ds.split("train"), cfg, device, train=True)
    trainer = Trainer(model, balancer, task, cfg, device, steps_per_epoch=len(train_loader))
    start_epoch(trainer, dataset, epoch)
    batches = []
    for b in train_loader:
        batches.append(batch_to_device(b, device))
        if len(batches) == STEPS:
            break
    return trainer, batches


def start_epoch(trainer: Trainer, dataset: str, epoch: int) -> None:
    """``on_train_epoch_start`` of ``epoch`` as the loop calls it, with the run's loaders."""
    ds, cfg, device = task_data(dataset)[0], trainer.cfg, trainer.device
    trainer.model.train()
    trainer.balancer.train()
    trainer.balancer.on_train_epoch_start(EpochContext(
        model=trainer.model, epoch=epoch, num_epochs=cfg.epochs,
        train_loader=make_loader(ds.split("train"), cfg, device, train=True),
        val_loader=make_loader(ds.split("val"), cfg, device, train=False),
        task=trainer.task, device=device, optimizer=trainer.optimizer,
        to_device=lambda b: batch_to_device(b, device),
    ))


def run_steps(trainer: Trainer, batches: Sequence[Mapping[str, torch.Tensor]], epoch: int = 0) -> None:
    """Train on ``batches`` in ``epoch``, then read the loss terms back (raises
    :class:`~mmbalance.errors.NonFiniteLossError` on a NaN or inf term)."""
    for i, b in enumerate(batches):
        trainer.train_step(b, epoch, i)
    trainer.flush_terms()
