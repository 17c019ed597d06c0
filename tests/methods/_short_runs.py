"""Short ``fit`` runs of a method on a registered synthetic task (a few steps per epoch), for method tests."""

from __future__ import annotations

import math

import torch

from mmbalance.datasets import DATASETS
from mmbalance.methods import METHODS
from mmbalance.models import MODELS
from mmbalance.tasks import make_task
from mmbalance.train import FitResult, TrainConfig, fit

CPU = torch.device("cpu")


def short_fit(
    method: str, dataset: str, *, epochs: int = 2, steps: int = 2, seed: int = 0, **config: object
) -> FitResult:
    """Train ``method`` (built with ``config``) on ``dataset`` for ``epochs`` epochs of ``steps`` batches of
    16 with the dataset's default model, then test; asserts the history and test metrics are finite."""
    ds = DATASETS.build(dataset)
    spec = ds.spec
    task = make_task(spec.task, spec.num_outputs, **dict(spec.task_options))
    torch.manual_seed(seed)
    model = MODELS.build(spec.default_model)(spec)
    balancer = METHODS.build(method, None, **config)
    cfg = TrainConfig(
        batch_size=16, seed=seed, epochs=epochs, max_train_batches=steps, eval_modality_scores=False,
        cost_steps=0,
    )
    splits = {s: ds.split(s) for s in ("train", "val", "test")}
    result = fit(model, balancer, splits, spec, task, cfg, CPU)
    assert len(result.history) == epochs
    for record in result.history:
        assert all(math.isfinite(v) for v in record["terms"].values()), record["terms"]
        assert all(math.isfinite(v) for v in record["diagnostics"].values()), record["diagnostics"]
    assert all(math.isfinite(v) for v in result.test.values()), result.test
    return result
