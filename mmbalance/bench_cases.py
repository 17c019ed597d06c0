"""What ``mmbalance bench`` measures: its cases, and the method / joint pair built on one.

A case is a registered dataset (the synthetic tasks) or a :class:`BenchCase`: a model and the input
shapes of a paper dataset, so that ``--paper-models`` can cost the paper architectures without any
data (MOSI / IEMOCAP MulT-style, Food-101 ViT-B/16 + BERT-base, BraTS DeepLabv3+ ResNet-101) on
:func:`random_batches`. :func:`build_pair` builds a method's trainer and joint's on the same weights;
:func:`method_epoch` picks the epoch they are measured at.
"""

from __future__ import annotations

import copy
import random
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from mmbalance.balancer import EpochContext
from mmbalance.datasets.base import DatasetSpec, TensorDictDataset
from mmbalance.errors import ConfigError, UnsupportedError
from mmbalance.methods import METHODS
from mmbalance.models import MODELS
from mmbalance.registry import config_fields
from mmbalance.tasks import make_task
from mmbalance.train import TrainConfig, Trainer, batch_to_device, make_loader, seed_everything

__all__ = [
    "InitialModels",
    "SYNTHETIC_TASKS", "BenchCase", "PAPER_CASES", "random_batches", "default_epoch", "method_epoch",
    "build_pair",
]

SYNTHETIC_TASKS = ("synthetic_cls2", "synthetic_cls3", "synthetic_reg3", "synthetic_seg4")


@dataclass(frozen=True)
class BenchCase:
    """A model + input shapes to benchmark on: a registered dataset, or a paper-shaped random one."""

    name: str
    spec: DatasetSpec
    model: str
    model_preset: str | None
    batch_size: int  # the paper's batch size (used on CUDA); CPU runs use --batch-size
    train_preset: str | None = None


def _paper_cases() -> dict[str, BenchCase]:
    mosi = DatasetSpec(
        task="reg",
        modalities={"text": (50, 768), "audio": (50, 5), "vision": (50, 20)},
        num_outputs=1,
        default_model="mult",
        default_preset="mosi",
    )
    iemocap = DatasetSpec(
        task="cls",
        modalities={"audio": (350, 130), "vision": (50, 342), "text": (22, 1024)},
        num_outputs=4,
        default_model="mult",
        default_preset="iemocap",
    )
    food = DatasetSpec(
        task="cls",
        modalities={"image": (3, 224, 224), "text": (50,)},
        num_outputs=101,
        default_model="vit_bert",
        default_preset="food101",
    )
    brats = DatasetSpec(
        task="seg",
        modalities={"flair": (1, 160, 160), "t1ce": (1, 160, 160), "t1": (1, 160, 160), "t2": (1, 160, 160)},
        num_outputs=4,
        target_shape=(160, 160),
        default_model="deeplab",
        default_preset="brats",
    )
    return {
        "paper_mosi": BenchCase("paper_mosi", mosi, "mult", "mosi", 64, "mosi"),
        "paper_iemocap": BenchCase("paper_iemocap", iemocap, "mult", "iemocap", 64, "iemocap"),
        "paper_food101": BenchCase("paper_food101", food, "vit_bert", "food101", 128, "food101"),
        "paper_brats": BenchCase("paper_brats", brats, "deeplab", "brats", 64, "brats"),
    }


PAPER_CASES = _paper_cases()


def random_batches(spec: DatasetSpec, batch_size: int, n: int, seed: int = 0) -> TensorDictDataset:
    """``n * batch_size`` random samples of ``spec``'s shapes (token ids for 1-D int inputs)."""
    g = torch.Generator().manual_seed(seed)
    size = n * batch_size
    tensors: dict[str, torch.Tensor] = {}
    for m, shape in spec.modalities.items():
        if len(shape) == 1:  # token ids (Food-101 text): ids in [1, 30000), no padding
            tensors[m] = torch.randint(1, 30000, (size, *shape), generator=g)
        else:
            tensors[m] = torch.randn(size, *shape, generator=g)
    if spec.task == "cls":
        tensors["target"] = torch.randint(0, spec.num_outputs, (size,), generator=g)
    elif spec.task == "reg":
        tensors["target"] = torch.empty(size).uniform_(-3, 3, generator=g)
    else:
        tensors["target"] = torch.randint(0, spec.num_outputs, (size, *spec.target_shape), generator=g)
    return TensorDictDataset(tensors)


def _method_overrides(method: str, spec: DatasetSpec) -> dict[str, Any]:
    """Required options for timing: ``unimodal`` trains the first modality."""
    if "modality" in config_fields(METHODS.get(method).Config):
        return {"modality": spec.modality_names[0]}
    return {}


def default_epoch(config: Any, num_epochs: int) -> int:
    """The epoch a method is benchmarked at by default: the last of ``num_epochs`` (past every
    warm-up), or the method's ``modulation_ends`` when its modulation window closes earlier."""
    last = num_epochs - 1
    ends = getattr(config, "modulation_ends", None)
    return last if ends is None else max(0, min(last, ends))


def method_epoch(method: str, spec: DatasetSpec, num_epochs: int, method_preset: str | None = None) -> int:
    """:func:`default_epoch` of ``method``'s config (with ``method_preset`` when it defines it)."""
    preset = method_preset if method_preset in (METHODS.get(method).presets or {}) else None
    return default_epoch(METHODS.resolve_config(method, preset, _method_overrides(method, spec)), num_epochs)


class InitialModels:
    """The initial model of the last (model, preset, shapes, seed) asked for, built once and kept on
    the device, with the RNG states right after building it.

    :meth:`get` seeds as ``seed_everything(seed)`` does, then returns a copy of that model and leaves
    the Python, NumPy and torch CPU RNGs where building it anew would have left them, so everything
    drawn afterwards (a balancer's heads, dropout masks) is what it would be without the cache.
    Only the last key is kept: a paper-sized model is a gigabyte.
    """

    def __init__(self) -> None:
        self._key: tuple[Any, ...] | None = None
        self._model: torch.nn.Module | None = None
        self._rng: tuple[Any, Any, torch.Tensor] | None = None

    def get(
        self, model_name: str, preset: str | None, spec: DatasetSpec, seed: int, deterministic: bool,
        device: torch.device,
    ) -> torch.nn.Module:
        key = (model_name, preset, repr(spec), seed, str(device))
        seed_everything(seed, deterministic)
        if key != self._key:
            self._key, self._model = None, None  # free the previous case's model before building
            model = MODELS.build(model_name, preset)(spec)
            self._rng = (random.getstate(), np.random.get_state(), torch.get_rng_state())
            self._model, self._key = model.to(device), key
        assert self._model is not None and self._rng is not None
        random.setstate(self._rng[0])
        np.random.set_state(self._rng[1])
        torch.set_rng_state(self._rng[2])
        return copy.deepcopy(self._model)


_INITIAL_MODELS = InitialModels()  # per process: consecutive pairs of one case share the build


def build_pair(
    method: str,
    spec: DatasetSpec,
    model_name: str,
    *,
    model_preset: str | None,
    train_set: TensorDictDataset,
    val_set: TensorDictDataset,
    cfg: TrainConfig,
    device: torch.device,
    epoch: int,
    method_preset: str | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> tuple[dict[str, Trainer], list[dict[str, torch.Tensor]]]:
    """Trainers ``{"method", "joint"}`` on identical initial weights, their epoch-level work done
    (untimed), and the training batches on the device. ``overrides``: method config fields.

    The epoch-level work runs for epoch 0, where every method's state starts (a first boosting
    stage, a first estimate), then for ``epoch``, the epoch the steps will run at (its window or
    warm-up state); the epochs between are skipped.
    """
    from mmbalance.methods.joint import Joint

    cls = METHODS.get(method)
    if not cls.supports(task=spec.task, modalities=len(spec.modalities)):
        raise UnsupportedError(
            f"method {method!r} does not support task {spec.task!r} with {len(spec.modalities)} modalities"
        )
    if not 0 <= epoch < cfg.epochs:
        raise ConfigError(f"epoch must be in [0, {cfg.epochs - 1}] (the training epochs), got {epoch}")
    task = make_task(spec.task, spec.num_outputs, **dict(spec.task_options))
    model = _INITIAL_MODELS.get(model_name, model_preset, spec, cfg.seed, cfg.deterministic, device)
    joint_model = copy.deepcopy(model)
    preset = method_preset if method_preset in (cls.presets or {}) else None
    balancer = METHODS.build(method, preset, **{**_method_overrides(method, spec), **(overrides or {})})
    train_loader = make_loader(train_set, cfg, device, train=True)
    val_loader = make_loader(val_set, cfg, device, train=False)
    trainers = {
        "method": Trainer(model, balancer, task, cfg, device, len(train_loader)),
        "joint": Trainer(joint_model, Joint(), task, cfg, device, len(train_loader)),
    }
    for t in trainers.values():  # epoch-level work (prototypes, teachers), untimed
        t.model.train()
        for e in sorted({0, epoch}):
            t.balancer.on_train_epoch_start(
                EpochContext(
                    model=t.model, epoch=e, num_epochs=cfg.epochs, train_loader=train_loader,
                    val_loader=val_loader, task=task, device=device, optimizer=t.optimizer,
                    to_device=lambda b: batch_to_device(b, device),
                )
            )
    return trainers, [batch_to_device(b, device) for b in train_loader]
