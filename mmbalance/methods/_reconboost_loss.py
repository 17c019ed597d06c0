"""ReconBoost's losses and stage schedule, as pure functions (hand-checked in
``tests/methods/test_reconboost.py``).

Port of ``huacong/ReconBoost:train.py`` (the phase-1 loss of ``main``: the learner's weighted
log-likelihood against the ensemble of the other modalities, and the memory-consolidation term) and
``schedule.py`` (fixed round robin). Regression and segmentation use the per-sample task loss in
place of the log-likelihood (an mmbalance adaptation; details in ``methods/reconboost.md``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from mmbalance.errors import ShapeError
from mmbalance.methods._precision import upcast
from mmbalance.tasks import Task

__all__ = ["boosting_loss", "consolidation_loss", "stage_modality"]


def stage_modality(stage: int, modalities: tuple[str, ...]) -> str:
    """Round robin in the model's modality order (``schedule.py``, fixed mode)."""
    return modalities[stage % len(modalities)]


def boosting_loss(
    prediction: Tensor, others: Tensor | None, target: Tensor, task: Task, weight1: float, weight2: float
) -> Tensor:
    """The reconcilement loss of the learner being boosted.

    cls (official): ``mean_i [ −w₁ mean_k(y_ik log p_ik) + w₂ mean_k(y_ik q_ik log p_ik) ]`` with
    one-hot ``y``, ``p = softmax(prediction)``, ``q = softmax(others)`` (no gradient), i.e.
    ``mean_i (w₂ q_i,y − w₁) log p_i,y / K``. reg / seg (adaptation): ``mean_i (w₁ − w₂ q_i) ℓ_i / K``
    with the per-sample task loss ``ℓ_i`` of the learner and ``q_i = exp(−ℓ_i(others))`` (for
    unsmoothed CE, the same formula). ``others=None`` (no other member yet) is ``q = 1``, as the
    official empty-ensemble constant ``c0`` gives ``softmax`` of one column.
    """
    k = int(prediction.shape[1])
    if others is not None and others.shape != prediction.shape:
        raise ShapeError(f"others {tuple(others.shape)} and prediction {tuple(prediction.shape)} differ")
    if task.name == "cls":
        y = target.long().reshape(-1, 1)
        log_p = F.log_softmax(upcast(prediction), dim=1).gather(1, y).squeeze(1)
        if others is None:
            q = torch.ones_like(log_p)
        else:
            q = F.softmax(upcast(others.detach()), dim=1).gather(1, y).squeeze(1)
        return ((weight2 * q - weight1) * log_p).mean() / k
    loss = task.loss(upcast(prediction), target, reduction="none")
    if others is None:
        q = torch.ones_like(loss)
    else:
        with torch.no_grad():
            q = torch.exp(-task.loss(upcast(others.detach()), target, reduction="none"))
    return ((weight1 - weight2 * q) * loss).mean() / k


def consolidation_loss(prediction: Tensor, previous: Tensor, task_name: str) -> Tensor:
    """``MSE(softmax(prediction), softmax(previous))`` over the class dim (raw values for regression);
    ``previous`` carries no gradient. (Official: both operands detached.)"""
    if task_name == "reg":
        return F.mse_loss(upcast(prediction), upcast(previous.detach()))
    return F.mse_loss(F.softmax(upcast(prediction), dim=1), F.softmax(upcast(previous.detach()), dim=1))
