"""Intra-op CPU threads per run: one for small models, torch's default for large ones.

The rule of ``threads="auto"`` (the default of ``mmbalance run`` / ``matrix`` / ``bench`` and of
:func:`mmbalance.runner.run_one`): on CPU, a run uses **one** intra-op thread when one forward pass
of its model on one training batch costs fewer than :data:`ONE_THREAD_BELOW_FLOPS` = 10⁹ FLOPs
(matrix products and convolutions, ``torch.utils.flop_counter``), and torch's default count
otherwise. On CUDA the model runs on the GPU and the count is left at torch's default.

Why 10⁹: a small model's step is hundreds of small operators. ATen splits an operator across
threads only above 32,768 elements (``at::internal::GRAIN_SIZE``) and every split costs a
fork/join of the thread pool, so such steps gain little from more threads, while two processes
whose threads each want every core slow each other down by one to two orders of magnitude (the
quick start's tiny models on a shared 2-core machine). Every synthetic task's model lies below the
limit (forward at batch 64: ``synthetic_cls2`` 2.6 MFLOPs, ``synthetic_cls3`` 3.7 M,
``synthetic_reg3`` 27 M, ``synthetic_seg4`` 355 M); the paper models lie above it (MulT at the MOSI
shapes 4.2 GFLOPs, IEMOCAP 15 G; ViT/BERT and DeepLabv3+ far more), where operators are large
enough for intra-op parallelism to pay.

The count used is recorded in the row (``env.threads``) with the rule's inputs
(``env.threads_rule``); neither enters the run id. Results differ in their last bits between
thread counts, which is why the count is recorded and a results folder does not mix counts
(:func:`mmbalance.matrix_run.check_thread_count`).
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Literal

from mmbalance.errors import ConfigError

if TYPE_CHECKING:  # torch is imported where it is used: the CLI parses --threads without it
    import torch
    from torch import Tensor, nn

__all__ = [
    "ONE_THREAD_BELOW_FLOPS",
    "ThreadSetting",
    "parse_threads",
    "check_threads",
    "forward_flops",
    "auto_threads",
    "decide_threads",
    "intra_op_threads",
]

ONE_THREAD_BELOW_FLOPS = 10**9  # forward FLOPs on one training batch (see the module docstring)
ThreadSetting = int | Literal["auto"]


def check_threads(value: Any, option: str = "threads") -> ThreadSetting:
    """``value`` if it is ``"auto"`` or an integer >= 1; ConfigError naming ``option`` otherwise."""
    if value == "auto" or (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
        return value
    raise ConfigError(f"{option} must be 'auto' or an integer >= 1, got {value!r}")


def parse_threads(text: str) -> ThreadSetting:
    """argparse type of ``--threads``: ``auto`` or an integer >= 1."""
    if text == "auto":
        return "auto"
    expected = "--threads must be 'auto' or an integer >= 1"
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{expected}, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{expected}, got {value}")
    return value


def forward_flops(model: nn.Module, batch: Mapping[str, Tensor]) -> int:
    """FLOPs of one forward pass of ``model`` on ``batch``, leaving the model and the RNGs as they were.

    The pass runs in eval mode (no dropout draws, no BatchNorm statistics updates) without
    gradients, inside ``torch.random.fork_rng``, so training that follows is unchanged.
    """
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    training = model.training
    devices = [d for d in {t.device for t in batch.values()} if d.type == "cuda"]
    try:
        model.eval()
        with torch.random.fork_rng(devices=devices), torch.no_grad():
            with FlopCounterMode(display=False) as counter:
                model(batch)
    finally:
        model.train(training)
    return int(counter.get_total_flops())


def auto_threads(flops: int, default: int) -> int:
    """The rule: 1 below :data:`ONE_THREAD_BELOW_FLOPS` forward FLOPs, else ``default``."""
    return 1 if flops < ONE_THREAD_BELOW_FLOPS else default


def decide_threads(
    setting: ThreadSetting | None,
    model: nn.Module,
    batch: Mapping[str, Tensor] | None,
    device: torch.device,
) -> tuple[int, dict[str, Any]]:
    """The intra-op thread count of a run and the record of how it was chosen (``env.threads_rule``).

    ``setting``: ``"auto"`` (the rule), an integer (that count), or None (keep torch's current
    count). ``batch``: one training batch on ``device`` (needed on CPU, unused elsewhere). The
    forward FLOPs are measured for every CPU run, so that rows made with a fixed count can be
    checked against the rule later.
    """
    import torch

    current = torch.get_num_threads()
    if setting is not None:
        check_threads(setting)
    record: dict[str, Any] = {"setting": "current" if setting is None else setting}
    if device.type != "cpu":
        record["reason"] = f"{device.type}: the model runs on the accelerator; torch's default count"
        return (setting if isinstance(setting, int) else current), record
    if batch is None:
        raise ValueError("decide_threads needs a training batch on CPU (the rule reads its forward FLOPs)")
    flops = forward_flops(model, batch)
    record.update(forward_flops=flops, one_thread_below_flops=ONE_THREAD_BELOW_FLOPS)
    if setting == "auto":
        record["default_threads"] = current
        return auto_threads(flops, current), record
    return (current if setting is None else setting), record


@contextmanager
def intra_op_threads(count: int) -> Iterator[int]:
    """Set torch's intra-op thread count for the block, then restore the previous one."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield count
    finally:
        torch.set_num_threads(previous)
