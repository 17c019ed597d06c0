"""Shared set-ups of the method tests: the tiny problem's trainer, an epoch start, a short synthetic fit."""

from __future__ import annotations

import math

import torch

from mmbalance.balancer import Balancer, EpochContext
from mmbalance.datasets import DATASETS
from mmbalance.methods import METHODS
from mmbalance.models import MODELS
from mmbalance.tasks import make_task
from mmbalance.train import FitResult, TrainConfig, Trainer, fit, seed_everything

from ..conftest import tiny_model, tiny_splits

CPU = torch.device("cpu")


def tiny_trainer(balancer: Balancer, seed: int = 0) -> tuple[Trainer, list[dict[str, torch.Tensor]]]:
    """A Trainer of ``balancer`` on conftest's tiny problem (modalities a, b; 3 classes) and the first
    three training batches of 16."""
    splits, _ = tiny_splits()
    cfg = TrainConfig(batch_size=16, seed=seed, eval_modality_scores=False, cost_steps=0)
    torch.manual_seed(seed)
    trainer = Trainer(tiny_model(seed=seed), balancer, make_task("cls", 3), cfg, CPU, steps_per_epoch=3)
    data = splits["train"].tensors
    return trainer, [{k: v[i * 16:(i + 1) * 16] for k, v in data.items()} for i in range(3)]


def start_epoch(trainer: Trainer, epoch: int) -> None:
    """Call the balancer's ``on_train_epoch_start`` for ``epoch`` (no loaders: for methods that only
    read the epoch index)."""
    ctx = EpochContext(
        model=trainer.model, epoch=epoch, num_epochs=10, train_loader=None, val_loader=None,
        task=trainer.task, device=CPU, optimizer=trainer.optimizer, to_device=lambda b: b,
    )
    trainer.balancer.on_train_epoch_start(ctx)


def fit_synthetic(method: str, dataset: str, epochs: int = 2, **overrides) -> FitResult:
    """``fit`` of ``method`` (config ``overrides``) on ``dataset`` with 64 training samples, two
    batches of 16 per epoch; asserts that the validation and test metrics are finite."""
    ds = DATASETS.build(dataset, n_train=64, n_val=32, n_test=32)
    spec = ds.spec
    task = make_task(spec.task, spec.num_outputs, **dict(spec.task_options))
    cfg = TrainConfig(epochs=epochs, batch_size=16, max_train_batches=2, eval_modality_scores=False,
                      cost_steps=0)
    seed_everything(0)
    model = MODELS.build(spec.default_model)(spec)
    balancer = METHODS.build(method, None, **overrides)
    result = fit(model, balancer, {s: ds.split(s) for s in ("train", "val", "test")}, spec, task, cfg, CPU)
    for split in (result.val, result.test):
        assert all(math.isfinite(v) for v in split.values()), split
    assert result.steps == 2 * epochs
    return result
