"""Shared set-ups of the method tests, in one place.

* the tiny problem of ``tests/conftest.py`` (modalities a, b; 3 classes; 48 samples a split):
  :func:`tiny_trainer` (a Trainer and the training split cut into batches), :func:`start_epoch`,
  :func:`fit_tiny`, and :func:`float64_problem` for checks against float64 hand values;
* "reproduces joint" checks: :func:`joint_and` builds a Joint trainer and the method's, :func:`train_steps`
  steps them in lockstep, :func:`assert_same_parameters` compares them bit for bit, and
  :func:`assert_fits_like_joint` does the same for a whole ``fit``;
* :func:`short_fit`: a short ``fit`` of a method on an embedded synthetic task, with its sanity checks.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from mmbalance.balancer import Balancer, EpochContext
from mmbalance.checkpoint import RunCheckpoint
from mmbalance.datasets import DATASETS
from mmbalance.datasets.base import DatasetSpec, TensorDictDataset
from mmbalance.methods import METHODS
from mmbalance.methods.joint import Joint
from mmbalance.models import MODELS
from mmbalance.models.base import MultimodalModel
from mmbalance.tasks import make_task
from mmbalance.train import (
    FitResult,
    TrainConfig,
    Trainer,
    batch_to_device,
    fit,
    make_loader,
    seed_everything,
)

from ..conftest import tiny_model, tiny_splits

CPU = torch.device("cpu")
Batch = dict[str, Tensor]


# -- the tiny problem --------------------------------------------------------------------------------
def tiny_trainer(
    balancer: Balancer, seed: int = 0, *, batch_size: int = 16, **train_options: Any
) -> tuple[Trainer, list[Batch]]:
    """A Trainer of ``balancer`` on the tiny problem (``tiny_model(seed=seed)``; ``TrainConfig`` with
    ``batch_size``, ``seed`` and ``train_options``) and the training split cut in order into full
    batches of ``batch_size`` (3 of 16, 6 of 8), which make one epoch (``steps_per_epoch``)."""
    splits, _ = tiny_splits()
    cfg = TrainConfig(
        batch_size=batch_size, seed=seed, eval_modality_scores=False, cost_steps=0, **train_options
    )
    data = splits["train"].tensors
    n = len(data["target"])
    starts = range(0, n - batch_size + 1, batch_size)
    batches = [{k: v[i : i + batch_size] for k, v in data.items()} for i in starts]
    torch.manual_seed(seed)
    model = tiny_model(seed=seed)
    trainer = Trainer(model, balancer, make_task("cls", 3), cfg, CPU, steps_per_epoch=len(batches))
    return trainer, batches


def start_epoch(trainer: Trainer, epoch: int, num_epochs: int = 10) -> None:
    """Call the balancer's ``on_train_epoch_start`` for ``epoch`` of ``num_epochs`` (no loaders: for
    methods that only read the epoch index)."""
    ctx = EpochContext(
        model=trainer.model, epoch=epoch, num_epochs=num_epochs, train_loader=None, val_loader=None,
        task=trainer.task, device=CPU, optimizer=trainer.optimizer, to_device=lambda b: b,
    )
    trainer.balancer.on_train_epoch_start(ctx)


def tiny_epoch(
    balancer: Balancer, cfg: TrainConfig, num_epochs: int
) -> tuple[Trainer, EpochContext, list[dict[str, Tensor]]]:
    """A trainer on ``tiny_splits`` / ``tiny_model``, the context of its epoch 0 of ``num_epochs`` with
    the train and validation loaders, and the training batches of one pass on the device."""
    splits, _ = tiny_splits()
    trainer = Trainer(tiny_model(), balancer, make_task("cls", 3), cfg, CPU, steps_per_epoch=3)
    loader = make_loader(splits["train"], cfg, CPU, train=True)
    ctx = EpochContext(
        model=trainer.model, epoch=0, num_epochs=num_epochs, train_loader=loader,
        val_loader=make_loader(splits["val"], cfg, CPU, train=False), task=trainer.task, device=CPU,
        optimizer=trainer.optimizer, to_device=lambda b: batch_to_device(b, CPU),
    )
    return trainer, ctx, [batch_to_device(b, CPU) for b in loader]


def fit_tiny(balancer: Balancer, cfg: TrainConfig) -> tuple[MultimodalModel, FitResult]:
    """``fit`` of ``balancer`` on the tiny problem from ``tiny_model()``; returns the model (in its
    best-validation state, as ``fit`` leaves it) and the result."""
    splits, spec = tiny_splits()
    model = tiny_model()
    result = fit(model, balancer, splits, spec, make_task("cls", 3), cfg, CPU)
    return model, result


def _doubled(dataset: TensorDictDataset) -> TensorDictDataset:
    tensors = dataset.tensors.items()
    return TensorDictDataset({k: v.double() if v.is_floating_point() else v for k, v in tensors})


def float64_problem() -> tuple[MultimodalModel, dict[str, TensorDictDataset], DatasetSpec]:
    """``(model, splits, spec)``: :func:`tiny_model` and :func:`tiny_splits` (defaults) in float64."""
    splits, spec = tiny_splits()
    return tiny_model().to(torch.float64), {name: _doubled(ds) for name, ds in splits.items()}, spec


# -- "reproduces joint" ------------------------------------------------------------------------------
def assert_same_parameters(a: nn.Module, b: nn.Module) -> None:
    """Every parameter of ``a`` equals ``b``'s, bit for bit, in registration order."""
    for index, (p, q) in enumerate(zip(a.parameters(), b.parameters(), strict=True)):
        assert torch.equal(p, q), f"parameter {index} differs"


def joint_and(
    balancer: Balancer, seed: int = 0, **options: Any
) -> tuple[Trainer, Trainer, list[Batch]]:
    """:func:`tiny_trainer` of ``Joint()`` and of ``balancer`` (built in that order, with the same
    ``seed`` and options: the same initial model), and the batches."""
    joint, batches = tiny_trainer(Joint(), seed, **options)
    trainer, _ = tiny_trainer(balancer, seed, **options)
    return joint, trainer, batches


def train_steps(batches: Sequence[Mapping[str, Tensor]], epoch: int, *trainers: Trainer) -> None:
    """One ``train_step`` of every trainer per batch of ``epoch``, in lockstep (batch-major)."""
    for i, batch in enumerate(batches):
        for trainer in trainers:
            trainer.train_step(batch, epoch, i)


def assert_fits_like_joint(balancer: Balancer, cfg: TrainConfig) -> FitResult:
    """:func:`fit_tiny` of ``Joint()``, then of ``balancer``; asserts that both end with the same
    parameters; returns the balancer's result."""
    joint_model, _ = fit_tiny(Joint(), cfg)
    model, result = fit_tiny(balancer, cfg)
    assert_same_parameters(joint_model, model)
    return result


# -- a short run on a synthetic task -----------------------------------------------------------------
def short_fit(
    method: str | Balancer,
    dataset: str,
    *,
    epochs: int = 2,
    steps: int = 2,
    batch_size: int = 16,
    samples: int | None = None,
    seed: int = 0,
    checkpoint: RunCheckpoint | None = None,
    **config: Any,
) -> FitResult:
    """``fit`` of ``method`` (a registered name, built with the ``config`` overrides, or a balancer)
    on the embedded task ``dataset`` with its default model: ``epochs`` epochs of at most ``steps``
    batches of ``batch_size``; ``samples`` training samples (half as many validation and test ones)
    or the task's own sizes; seeded with ``seed_everything(seed)``; epoch checkpoints as
    ``checkpoint`` says.

    Asserts: one history record per epoch, ``steps`` steps each, and finite loss terms, diagnostics
    and validation / test metrics.
    """
    sizes = {} if samples is None else {"n_train": samples, "n_val": samples // 2, "n_test": samples // 2}
    ds = DATASETS.build(dataset, **sizes)
    spec = ds.spec
    task = make_task(spec.task, spec.num_outputs, **dict(spec.task_options))
    cfg = TrainConfig(
        epochs=epochs, batch_size=batch_size, seed=seed, max_train_batches=steps, eval_modality_scores=False,
        cost_steps=0,
    )
    seed_everything(seed)
    model = MODELS.build(spec.default_model)(spec)
    if isinstance(method, Balancer):
        assert not config, f"config overrides {sorted(config)} go with a method name, not a balancer"
        balancer = method
    else:
        balancer = METHODS.build(method, None, **config)
    splits = {s: ds.split(s) for s in ("train", "val", "test")}
    result = fit(model, balancer, splits, spec, task, cfg, CPU, checkpoint=checkpoint)
    assert len(result.history) == epochs and result.steps == steps * epochs
    for record in result.history:
        assert all(math.isfinite(v) for v in record["terms"].values()), record["terms"]
        assert all(math.isfinite(v) for v in record["diagnostics"].values()), record["diagnostics"]
    for metrics in (result.val, result.test):
        assert all(math.isfinite(v) for v in metrics.values() if isinstance(v, float)), metrics
    return result
