"""Parameter-shared unimodal predictions: the model's own fusion and head on one modality alone.

ARL and DGL (Wei, Luo, Luo; ICCV 2025) add no unimodal heads. The prediction of modality m alone is
the multimodal model's fusion module and head applied to the features with every other modality
zeroed: the official ``ConcatFusion_AUXI`` / ``ConcatFusion_DGL`` compute
``fc_out(cat(x, zeros_like(y)))`` with the fusion layer ``fc_out`` itself. For a linear concat head
this is ``W_m z_m + b``; for any other fusion it is the same rule, "the other modalities absent".

Contracts:

* ``features`` are the encoder outputs (``ModelOutput.features``); the result has the fused
  prediction's shape for every modality, in ``model.modalities`` order.
* The passes run in the model's current mode (training mode during a step, as the official code),
  but never change a normalisation layer's running statistics: a zero-padded batch would otherwise
  shift the BatchNorm statistics used for the full input at evaluation (DeepLab's fusion has one).
* ``detach_params=True`` (DGL's "unimodal gradient truncation"): the fusion and head parameters are
  used as constants, so the unimodal loss reaches the encoders only. One backward of the summed
  loss then gives exactly what the official code gets from two backward passes with the fusion
  gradients reset in between.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call

from mmbalance.models.base import MultimodalModel

__all__ = ["shared_unimodal_predictions", "frozen_running_stats"]


@contextlib.contextmanager
def frozen_running_stats(module: nn.Module) -> Iterator[None]:
    """Inside the block, BatchNorm layers of ``module`` normalise as usual (batch statistics in
    training mode) but leave ``running_mean`` / ``running_var`` / ``num_batches_tracked`` unchanged
    (momentum 0, counter restored)."""
    norms = [
        m for m in module.modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats and m.training
    ]
    saved = [(m.momentum, m.num_batches_tracked.clone()) for m in norms]
    try:
        for m in norms:
            m.momentum = 0.0
        yield
    finally:
        for m, (momentum, count) in zip(norms, saved, strict=True):
            m.momentum = momentum
            m.num_batches_tracked.copy_(count)


def _constants(module: nn.Module) -> dict[str, Tensor]:
    return {name: p.detach() for name, p in module.named_parameters()}


def shared_unimodal_predictions(
    model: MultimodalModel,
    features: Mapping[str, Tensor],
    *,
    detach_params: bool = False,
) -> dict[str, Tensor]:
    """``{m: head(fusion({m: features[m], others: 0}))}`` for every modality of ``model``.

    ``detach_params`` makes the fusion and head parameters constants of these passes (gradients
    reach ``features`` only).
    """
    fusion_params: dict[str, Any] | None = None
    head_params: dict[str, Any] | None = None
    if detach_params:
        fusion_params, head_params = _constants(model.fusion), _constants(model.head)
    zeros = {m: torch.zeros_like(features[m]) for m in model.modalities}
    out: dict[str, Tensor] = {}
    with frozen_running_stats(model.fusion), frozen_running_stats(model.head):
        for m in model.modalities:
            alone = {n: (features[n] if n == m else zeros[n]) for n in model.modalities}
            if fusion_params is None or head_params is None:
                out[m] = model.fuse(alone).prediction
            else:
                fused = functional_call(model.fusion, fusion_params, (alone,))
                out[m] = functional_call(model.head, head_params, (fused,))[0]
    return out
