"""CGGM's premises, checked once with clear errors: at ``setup`` (task, model, encoder groups) and
on the first training batch (features, the metric ε, the closed form's premise)."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from mmbalance.errors import ConfigError, ShapeError, UnsupportedError
from mmbalance.methods._cggm_formulas import head_input_upsampling, output_gradient
from mmbalance.models.base import ModelOutput, MultimodalModel
from mmbalance.tasks import ClassificationTask, RegressionTask, SegmentationTask, Task

__all__ = ["check_setup", "check_first_batch"]


def check_setup(
    model: MultimodalModel, task: Task, config: Any, tasks: frozenset[str]
) -> list[list[nn.Parameter]]:
    """Validate the task and model for CGGM; return ``model.modality_parameters(m)`` per modality.

    Raises:
        UnsupportedError: fewer than 2 modalities, an undeclared task, a task without ``score``,
            ``eps_metric="neg_mae"`` off regression, an ``out_layer`` that is not Linear / Conv2d,
            ``direction="paper"`` on a task with no closed-form gradient.
        ConfigError: an empty encoder group, or a parameter in two modalities' groups.

    Warns when ``side_stream`` is on but the model is not on a CUDA device (nothing to overlap).
    """
    if len(model.modalities) < 2:
        raise UnsupportedError(f"cggm needs at least 2 modalities, the model has {model.modalities}")
    if task.name not in tasks:
        raise UnsupportedError(f"cggm supports tasks {sorted(tasks)}, got task {task.name!r}")
    if not callable(getattr(task, "score", None)):
        raise UnsupportedError(
            f"cggm reads ε from task.score; task {type(task).__name__!r} has no score(prediction, target)"
        )
    if config.eps_metric == "neg_mae" and not isinstance(task, RegressionTask):
        raise UnsupportedError(f"eps_metric='neg_mae' needs a regression task, got task {task.name!r}")
    if not isinstance(model.out_layer, nn.Linear | nn.Conv2d):
        raise UnsupportedError(
            f"cggm needs model.out_layer to be nn.Linear or nn.Conv2d, got {type(model.out_layer).__name__}"
        )
    if config.direction == "paper" and not has_closed_form(task):
        output_gradient(task, torch.zeros(1, 1), torch.zeros(1))  # raises UnsupportedError
    groups: list[list[nn.Parameter]] = []
    seen: dict[int, str] = {}
    for m in model.modalities:
        params = list(model.modality_parameters(m))
        if not params:
            raise ConfigError(
                f"model.modality_parameters({m!r}) is empty; cggm needs each encoder's parameters"
            )
        for p in params:
            if id(p) in seen:
                raise ConfigError(f"a parameter is in modality_parameters of both {seen[id(p)]!r} and {m!r}")
            seen[id(p)] = m
        groups.append(params)
    device = model.out_layer.weight.device
    if getattr(config, "side_stream", False) and device.type != "cuda":
        message = f"cggm: side_stream=True has no effect on device {str(device)!r} (CUDA streams only)"
        warnings.warn(message, stacklevel=3)
    return groups


def has_closed_form(task: Task) -> bool:
    """Whether the paper mode's closed-form output gradient covers the task."""
    return isinstance(task, ClassificationTask | RegressionTask | SegmentationTask)


def check_first_batch(
    modalities: Sequence[str], output: ModelOutput, scores: Sequence[Any], task: Task, out_layer: nn.Module,
    head_weights: Sequence[Tensor], direction: str | None,
) -> tuple[bool, bool | None]:
    """Once, on the first training batch: every encoder output is present, each ε is a floating
    0-d score, the heads' ``out_layer`` weights have the fusion ``out_layer``'s shape (the official
    cosine compares them; the closed form needs it), and (paper mode, grad_cos)
    ``prediction == [upsample](out_layer(head_input))``.

    Returns:
        ``(closed_form, align_corners)``: whether the closed-form gradients apply to this model, and
        the upsampling's ``align_corners`` (None without upsampling).
    """
    missing = [m for m in modalities if m not in output.features]
    if missing:
        raise ShapeError(f"ModelOutput.features lacks modalities {missing}; cggm needs every encoder output")
    for m, s in zip(modalities, scores, strict=True):
        if not (isinstance(s, Tensor) and s.dim() == 0 and s.is_floating_point()):
            got = type(s).__name__
            if isinstance(s, Tensor):
                got = f"{got} {tuple(s.shape)} {s.dtype}"
            raise UnsupportedError(
                f"task.score must return a 0-d floating tensor to give ε (higher is better); task "
                f"{type(task).__name__!r} gave {got} for modality {m!r}"
            )
    paper = direction == "paper"
    if paper and output.head_input is None:
        raise UnsupportedError(
            "direction='paper' needs ModelOutput.head_input (the input of model.out_layer); "
            "the model gives None"
        )
    shapes = {m: tuple(w.shape) for m, w in zip(modalities, head_weights, strict=True)}
    fusion_shape = tuple(out_layer.weight.shape)
    if any(shape != fusion_shape for shape in shapes.values()):
        if direction is not None:
            raise ConfigError(
                f"direction={direction!r} compares each head's out_layer weight with model.out_layer's "
                f"{fusion_shape}; the heads' weights are {shapes}"
            )
        message = f"cggm: head weights {shapes} differ from model.out_layer's {fusion_shape}; no grad_cos"
        warnings.warn(message, stacklevel=3)
        return False, None
    if not has_closed_form(task) or output.head_input is None:
        return False, None
    ok, align_corners = head_input_upsampling(out_layer, output.head_input, output.prediction)
    if not ok and paper:
        raise UnsupportedError(
            "direction='paper' needs prediction == model.out_layer(head_input) (optionally bilinearly "
            f"upsampled); this model's prediction {tuple(output.prediction.shape)} does not match"
        )
    if not ok:
        warnings.warn(
            "cggm: model prediction != model.out_layer(head_input) (optionally bilinearly upsampled); "
            "the grad_cos diagnostic is left out",
            stacklevel=3,
        )
    return ok, align_corners
