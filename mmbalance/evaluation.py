"""Evaluation and model selection: the metric suite of a method's predictor over a loader, the
best-validation rule, and the copy of the best state that :func:`mmbalance.train.fit` tests at the end.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

from mmbalance.balancer import Balancer
from mmbalance.errors import ConfigError
from mmbalance.models.base import MultimodalModel
from mmbalance.runtime import autocast, batch_to_device
from mmbalance.tasks import METRIC_HIGHER_IS_BETTER, Task

if TYPE_CHECKING:
    from mmbalance.train import TrainConfig

__all__ = ["evaluate", "is_better", "snapshot", "restore"]


@torch.no_grad()
def evaluate(
    model: MultimodalModel,
    balancer: Balancer,
    loader: DataLoader,
    task: Task,
    device: torch.device,
    cfg: TrainConfig,
    *,
    modality_scores: bool = True,
) -> dict[str, float]:
    """Metric suite of ``balancer.predict`` over the whole loader, plus the mean loss and, with
    ``modality_scores``, ``score/<m>``: the task score of the method's own test-time predictor
    (``balancer.predict``) when every other modality's encoder output is zeroed (encoders run once
    per batch). For late-fusion methods (QMF, MLA, UME, ReconBoost) that is their own heads' fusion,
    not the model's unused fusion head. One host sync at the end."""
    model.eval()
    balancer.eval()
    suite = task.metrics()
    loss_sum = torch.zeros((), device=device, dtype=torch.float64)
    score_sums = {m: torch.zeros((), device=device, dtype=torch.float64) for m in model.modalities}
    n = 0
    for batch in loader:
        batch = batch_to_device(batch, device)
        with autocast(cfg, device):
            features, extras = model.encode(batch)
            output = model.fuse(features, extras)
            prediction = balancer.predict(output).float()
            loss_sum += task.loss(prediction, batch["target"], reduction="none").double().sum()
            suite.update(prediction, batch["target"])
            bsz = batch["target"].shape[0]
            if modality_scores and len(model.modalities) > 1:
                for m in model.modalities:
                    only = {k: (f if k == m else torch.zeros_like(f)) for k, f in features.items()}
                    pred_m = balancer.predict(model.fuse(only, extras)).float()
                    score_sums[m] += task.score(pred_m, batch["target"]).double() * bsz
        n += bsz
    if n == 0:
        raise ConfigError("evaluation loader is empty; expected at least one sample")
    metrics = dict(suite.compute())
    metrics["loss"] = float(loss_sum) / n
    if modality_scores and len(model.modalities) > 1:
        for m, s in score_sums.items():
            metrics[f"score/{m}"] = float(s) / n
    return metrics


def is_better(task: Task, new: Mapping[str, float], best: Mapping[str, float] | None) -> bool:
    """Model selection on the task's primary validation metric (ties keep the earlier epoch)."""
    if best is None:
        return True
    key = task.primary_metric
    a, b = new[key], best[key]
    if math.isnan(a):
        return False
    if math.isnan(b):
        return True
    return a > b if METRIC_HIGHER_IS_BETTER[key] else a < b


def _frozen_names(module: nn.Module) -> set[str]:
    return {name for name, p in module.named_parameters() if not p.requires_grad}


def snapshot(module: nn.Module) -> dict[str, Tensor]:
    """Copy of the state that training can change: frozen parameters (e.g. the 195 M-parameter
    ViT/BERT extractors of Food-101) never change, so they are not copied at every best epoch."""
    frozen = _frozen_names(module)
    return {k: v.detach().clone() for k, v in module.state_dict().items() if k not in frozen}


def restore(module: nn.Module, state: Mapping[str, Tensor]) -> None:
    """Load a :func:`snapshot` back; every non-frozen entry must match (RuntimeError otherwise)."""
    missing, unexpected = module.load_state_dict(state, strict=False)
    not_frozen = set(missing) - _frozen_names(module)
    if not_frozen or unexpected:
        raise RuntimeError(
            f"best-state restore mismatch: missing {sorted(not_frozen)}, unexpected {sorted(unexpected)}"
        )
