"""A short ``fit`` of a balancer on one embedded synthetic task (a few batches per epoch, CPU)."""

from __future__ import annotations

import math

import torch

from mmbalance.datasets import DATASETS
from mmbalance.models import MODELS
from mmbalance.tasks import make_task
from mmbalance.train import FitResult, TrainConfig, fit

__all__ = ["short_fit"]


def short_fit(balancer, ds_name: str, epochs: int = 2, batches: int = 2) -> tuple[FitResult, object]:
    """Train ``balancer`` on ``ds_name`` with the dataset's default model; check that every test
    metric is finite; return the result and the dataset spec."""
    ds = DATASETS.build(ds_name)
    spec = ds.spec
    task = make_task(spec.task, spec.num_outputs, **dict(spec.task_options))
    torch.manual_seed(0)
    model = MODELS.build(spec.default_model)(spec)
    cfg = TrainConfig(
        epochs=epochs, batch_size=32, eval_modality_scores=False, cost_steps=0, max_train_batches=batches
    )
    splits = {s: ds.split(s) for s in ("train", "val", "test")}
    result = fit(model, balancer, splits, spec, task, cfg, torch.device("cpu"))
    assert all(math.isfinite(v) for v in result.test.values() if isinstance(v, float)), result.test
    return result, spec
