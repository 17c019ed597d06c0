"""Dataset contract: a registered source of train / val / test splits of modality dicts.

A registered dataset class is built from its ``Config`` (``DATASETS.build(name, **overrides)``),
declares a :class:`DatasetSpec`, and returns each split as a ``torch.utils.data.Dataset`` whose
items are ``{modality: Tensor, ..., "target": Tensor}``. Where a release has no validation split,
one is carved from train with a recorded seed (``spec.notes``). Test data is never used for model
selection or for any method's statistics: the runner only hands ``train`` and ``val`` to methods.
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor
from torch.utils.data import Dataset

from mmbalance.errors import ConfigError, RegistryError, ShapeError

__all__ = [
    "DatasetSpec",
    "MultimodalDataset",
    "TensorDictDataset",
    "SPLITS",
    "check_batch",
    "check_dataset_class",
    "identity_collate",
]

SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class DatasetSpec:
    """Static description of a dataset, read by models, tasks and methods.

    Attributes:
        task: "cls", "reg" or "seg".
        modalities: modality name -> per-sample shape (without batch), in model order.
        num_outputs: classes (cls, seg) or 1 (reg).
        target_shape: per-sample target shape (``()`` for cls/reg scalars, ``(H, W)`` for seg).
        default_model: registered model builder used when the run names none.
        default_preset: preset name of methods/training used when the run names none.
        task_options: keyword arguments for the Task (e.g. seg class weights).
        notes: recorded facts (val carve seed, Dice convention, ...), copied into result rows.
    """

    task: str
    modalities: Mapping[str, tuple[int, ...]]
    num_outputs: int
    target_shape: tuple[int, ...] = ()
    default_model: str = "mlp"
    default_preset: str | None = None
    task_options: Mapping[str, Any] = field(default_factory=dict)
    notes: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.task not in ("cls", "reg", "seg"):
            raise ConfigError(f"task must be one of 'cls', 'reg', 'seg', got {self.task!r}")
        if not self.modalities:
            raise ConfigError("modalities must name at least one modality")
        if "target" in self.modalities:
            raise ConfigError("'target' is reserved and cannot be a modality name")

    @property
    def modality_names(self) -> tuple[str, ...]:
        return tuple(self.modalities)


class MultimodalDataset(ABC):
    """Base of registered datasets.

    Subclasses define ``Config`` (frozen dataclass), declare ``task``, ``modality_names``,
    ``default_model`` and ``default_preset`` as class attributes (the runner resolves a run from
    them without building the dataset; :func:`check_dataset_class` checks them at registration),
    build ``self.spec`` in ``__init__`` and implement :meth:`split`.
    """

    name: str
    Config: type
    presets: Mapping[str, Mapping[str, Any]] = {}
    task: ClassVar[str]
    modality_names: ClassVar[tuple[str, ...]]
    default_model: ClassVar[str]  # registered model builder used when the run names none
    default_preset: ClassVar[str | None] = None  # preset used when the run names none
    paper: str = ""
    spec: DatasetSpec

    def __init__(self, config: Any) -> None:
        self.config = config

    @classmethod
    def supports(cls, task: str | None = None, modalities: int | None = None, **_: Any) -> bool:
        if task is not None and task != cls.task:
            return False
        return modalities is None or modalities == len(cls.modality_names)

    @classmethod
    def missing_data(cls, config: Any) -> list[str]:
        """What this dataset would miss on disk with ``config``, one line each (empty: nothing),
        checked without reading any data, so that a matrix can refuse to start. For datasets with a
        ``root`` option: the root and its ``subdir`` folder, then :meth:`required_files`."""
        root = getattr(config, "root", None)
        if root is None:
            return []
        name = getattr(cls, "name", cls.__name__)
        if not root:
            return [f"dataset {name!r}: no data root (pass --data-root DIR or set data_root in the spec)"]
        subdir = getattr(config, "subdir", "")
        folder = Path(root).expanduser() / subdir if subdir else Path(root).expanduser()
        if not folder.is_dir():
            return [f"dataset {name!r}: data folder {str(folder)!r} does not exist"]
        return [
            f"dataset {name!r}: missing file {str(path)!r} ({what})"
            for path, what in cls.required_files(config, folder)
            if not path.is_file()
        ]

    @classmethod
    def required_files(cls, config: Any, folder: Path) -> list[tuple[Path, str]]:
        """Files a run reads under the data ``folder``, with what each holds (default: none known)."""
        return []

    @abstractmethod
    def split(self, split: str) -> Dataset:
        """The ``split`` ("train", "val" or "test") as a map-style dataset of modality dicts."""

    def check_split_name(self, split: str) -> None:
        if split not in SPLITS:
            raise ConfigError(f"split must be one of {SPLITS}, got {split!r}")


def check_dataset_class(cls: type) -> None:
    """Registration check: the class declares what the runner reads without building it.

    Raises:
        RegistryError: naming the class, the attribute, its value and what was expected.
    """
    where = f"dataset class {cls.__module__}.{cls.__qualname__}"
    task = getattr(cls, "task", None)
    if task not in ("cls", "reg", "seg"):
        raise RegistryError(f"{where}: class attribute task must be 'cls', 'reg' or 'seg', got {task!r}")
    names = getattr(cls, "modality_names", None)
    if not (isinstance(names, tuple) and names and all(isinstance(n, str) and n for n in names)):
        raise RegistryError(
            f"{where}: class attribute modality_names must be a non-empty tuple of names, got {names!r}"
        )
    model = getattr(cls, "default_model", None)
    if not (isinstance(model, str) and model):
        raise RegistryError(
            f"{where}: class attribute default_model must name a model builder, got {model!r}"
        )
    preset = getattr(cls, "default_preset", None)
    if not (preset is None or (isinstance(preset, str) and preset)):
        raise RegistryError(
            f"{where}: class attribute default_preset must be None or a preset name, got {preset!r}"
        )
    config = getattr(cls, "Config", None)
    if not dataclasses.is_dataclass(config):
        raise RegistryError(f"{where}: class attribute Config must be a dataclass, got {config!r}")


class TensorDictDataset(Dataset):
    """In-memory dataset of equally long tensors, batched by ``__getitems__`` (no per-item collate).

    ``DataLoader(ds, batch_size=B, collate_fn=identity_collate)`` fetches a whole batch with one
    indexing op per tensor, which keeps the loader from starving the step on small models.
    """

    def __init__(self, tensors: Mapping[str, Tensor]) -> None:
        lengths = {k: len(v) for k, v in tensors.items()}
        if len(set(lengths.values())) != 1:
            raise ShapeError(f"all tensors must have the same length, got {lengths}")
        self.tensors = dict(tensors)
        self._len = next(iter(lengths.values()))

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        return {k: v[index] for k, v in self.tensors.items()}

    def __getitems__(self, indices: Sequence[int]) -> dict[str, Tensor]:
        idx = torch.as_tensor(indices, dtype=torch.long)
        return {k: v.index_select(0, idx) for k, v in self.tensors.items()}


def identity_collate(batch: Any) -> Any:
    """Collate for datasets whose ``__getitems__`` already returns a batch dict."""
    return batch


def check_batch(batch: Mapping[str, Tensor], spec: DatasetSpec, *, source: str = "dataset") -> None:
    """Raise ShapeError unless ``batch`` matches ``spec`` (modalities, per-sample shapes, target).

    Sequence modalities may vary in their first (length) dimension when declared as ``-1``.
    """
    for m, shape in spec.modalities.items():
        if m not in batch:
            raise ShapeError(
                f"{source}: batch lacks modality {m!r}; expected keys {list(spec.modalities)} + 'target'"
            )
        got = tuple(batch[m].shape[1:])
        if len(got) != len(shape) or any(s != -1 and s != g for s, g in zip(shape, got, strict=False)):
            raise ShapeError(f"{source}: modality {m!r} has per-sample shape {got}, expected {tuple(shape)}")
    if "target" not in batch:
        raise ShapeError(f"{source}: batch lacks 'target'")
    got_t = tuple(batch["target"].shape[1:])
    if got_t != tuple(spec.target_shape):
        raise ShapeError(
            f"{source}: target has per-sample shape {got_t}, expected {tuple(spec.target_shape)}"
        )
