"""Cost measurement: step time and memory of a method against ``joint``, side by side.

Contract (DESIGN "Performance contract"):

* both trainers run in one process, on the same model weights and the same batches, steps strictly
  alternating (joint, method, joint, method, ...) so that machine noise hits both alike;
* each timed step is device-synchronised before and after; ``warmup`` steps are discarded; the
  median and the inter-quartile range (IQR) of the remaining steps are reported in milliseconds;
* wall-clock ratios robust to a loaded machine are measured in blocks (:func:`time_blocks`): each
  block interleaves the trainers' steps (alternating which goes first), so both see the same
  conditions, and gives one paired ratio, of the two trainers' fastest steps in the block
  (:func:`block_ratios`); :mod:`mmbalance.bootstrap` turns the block ratios into a confidence
  interval. The minimum because noise on a shared machine only ever adds time to a step (another
  process preempting it, evicting its caches): a block's fastest step is its least disturbed one,
  while a sum or a median of steps of about a millisecond moves by whole scheduler slices
  depending on which steps another process preempted;
* memory: on CUDA, the peak allocated bytes during the method's steps (after
  ``reset_peak_memory_stats``) minus joint's, measured in separate passes, plus the bytes the
  method keeps resident between steps and joint does not (its own parameters, buffers and
  optimizer state: both trainers are resident during both passes, so the peaks alone cancel them);
  on CPU, where no allocator peak exists, the exact bytes of what the method keeps across steps: its
  own parameters, a gradient for each trainable one (allocated by every step's backward, even when
  the gradients are set to None between steps), its buffers and its optimizers' state
  (``persistent_state_bytes``).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

__all__ = [
    "StepTimes",
    "persistent_state_bytes",
    "optimizer_state_bytes",
    "time_interleaved",
    "time_blocks",
    "block_ratios",
    "summarize_ms",
    "peak_memory_bytes",
    "compare_cost",
    "memory_cost",
]


@dataclass(frozen=True)
class StepTimes:
    """Timed steps of one trainer (milliseconds, warm-up removed)."""

    ms: tuple[float, ...]

    @property
    def median(self) -> float:
        return statistics.median(self.ms)

    @property
    def iqr(self) -> float:
        if len(self.ms) < 2:
            return 0.0
        q = statistics.quantiles(self.ms, n=4, method="inclusive")
        return q[2] - q[0]


def summarize_ms(samples: Sequence[float]) -> dict[str, float]:
    st = StepTimes(tuple(samples))
    return {"median": st.median, "iqr": st.iqr, "n": len(samples)}


def _tensor_bytes(t: Tensor | None) -> int:
    return 0 if t is None else t.numel() * t.element_size()


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of every tensor in an optimizer's per-parameter state (Adam moments, momentum)."""
    total = 0
    for state in optimizer.state.values():
        for v in state.values():
            if isinstance(v, Tensor):
                total += _tensor_bytes(v)
    return total


def persistent_state_bytes(
    module: nn.Module, optimizers: Iterable[torch.optim.Optimizer] = (), *, gradients: bool = True
) -> int:
    """Exact bytes of a module's parameters, their gradients, its buffers, and optimizer state.

    A trainable parameter (``requires_grad``) counts its gradient whether or not ``p.grad`` is set
    right now: optimizers set gradients to None after each step, but every backward allocates them
    again, so they are part of what the module costs per step. ``gradients=False`` leaves gradients
    out (what stays resident between steps whose gradients are set to None). Shared tensors are
    counted once. For a balancer: ``persistent_state_bytes(b, b.auxiliary_optimizers())``.
    """
    seen: set[int] = set()
    total = 0
    for p in module.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        grad = _tensor_bytes(p.grad) if p.grad is not None else (_tensor_bytes(p) if p.requires_grad else 0)
        total += _tensor_bytes(p) + (grad if gradients else 0)
    for b in module.buffers():
        if id(b) not in seen:
            seen.add(id(b))
            total += _tensor_bytes(b)
    for opt in optimizers:
        total += optimizer_state_bytes(opt)
    return total


def _resident_bytes(balancer: Any) -> int:
    """What a balancer keeps on its device between steps (parameters, buffers, own optimizers' state)."""
    return persistent_state_bytes(balancer, balancer.auxiliary_optimizers(), gradients=False)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_interleaved(
    trainers: Mapping[str, Any],
    batches: Sequence[Mapping[str, Tensor]],
    *,
    steps: int,
    warmup: int,
    device: torch.device,
    epoch: int,
) -> dict[str, StepTimes]:
    """Alternate one ``train_step`` of each trainer per batch; return the timed steps of each.

    ``trainers`` maps a name to an object with ``train_step(batch, epoch, step_in_epoch)`` (a
    :class:`mmbalance.train.Trainer`). Batches are reused cyclically and must already be on the
    device. Warm-up steps run in the same alternation and are discarded. ``epoch`` is passed to
    every step; it has no default because a method's cost depends on it (warm-ups, windows).
    """
    if not batches:
        raise ValueError("batches must contain at least one batch")
    samples: dict[str, list[float]] = {name: [] for name in trainers}
    for i in range(warmup + steps):
        batch = batches[i % len(batches)]
        for name, trainer in trainers.items():
            _sync(device)
            t0 = time.perf_counter()
            trainer.train_step(batch, epoch, i % max(1, len(batches)))
            _sync(device)
            if i >= warmup:
                samples[name].append((time.perf_counter() - t0) * 1e3)
    for trainer in trainers.values():
        flush = getattr(trainer, "flush_terms", None)
        if flush is not None:
            flush()
    return {name: StepTimes(tuple(v)) for name, v in samples.items()}


def time_blocks(
    trainers: Mapping[str, Any],
    batches: Sequence[Mapping[str, Tensor]],
    *,
    blocks: int,
    steps: int,
    device: torch.device,
    epoch: int,
) -> dict[str, list[tuple[float, ...]]]:
    """``blocks`` blocks of ``steps`` interleaved steps per trainer; the step times of each block.

    Within a block the trainers take turns step by step, in the given order on even steps and in
    reverse order on odd ones (so neither always runs right after the other). Batches are reused
    cyclically, already on the device; no warm-up is run here (run it before). Returns
    ``{name: [block_0_ms, block_1_ms, ...]}``, each a tuple of ``steps`` milliseconds.
    """
    if not batches:
        raise ValueError("batches must contain at least one batch")
    if blocks < 1 or steps < 1:
        raise ValueError(f"blocks and steps must be integers >= 1, got {blocks!r} and {steps!r}")
    names = list(trainers)
    out: dict[str, list[tuple[float, ...]]] = {name: [] for name in names}
    i = 0
    for _ in range(blocks):
        block: dict[str, list[float]] = {name: [] for name in names}
        for k in range(steps):
            batch = batches[i % len(batches)]
            for name in names if k % 2 == 0 else reversed(names):
                _sync(device)
                t0 = time.perf_counter()
                trainers[name].train_step(batch, epoch, i % len(batches))
                _sync(device)
                block[name].append((time.perf_counter() - t0) * 1e3)
            i += 1
        for name in names:
            out[name].append(tuple(block[name]))
    for trainer in trainers.values():
        flush = getattr(trainer, "flush_terms", None)
        if flush is not None:
            flush()
    return out


def block_ratios(method: Sequence[Sequence[float]], joint: Sequence[Sequence[float]]) -> list[float]:
    """Per block, the method's fastest step time over joint's (see the module docstring)."""
    if len(method) != len(joint):
        raise ValueError(f"method has {len(method)} blocks and joint {len(joint)}; expected the same")
    if any(not m or not j for m, j in zip(method, joint, strict=True)):
        raise ValueError("every block must hold at least one step time of each trainer")
    return [min(m) / min(j) for m, j in zip(method, joint, strict=True)]


def peak_memory_bytes(
    trainer: Any, batches: Sequence[Mapping[str, Tensor]], *, steps: int, device: torch.device, epoch: int
) -> int | None:
    """CUDA peak allocated bytes over ``steps`` training steps at epoch ``epoch`` (None on CPU)."""
    if device.type != "cuda":
        return None
    _sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    for i in range(steps):
        trainer.train_step(batches[i % len(batches)], epoch, i)
    _sync(device)
    return int(torch.cuda.max_memory_allocated(device))


def compare_cost(
    method_trainer: Any,
    joint_trainer: Any,
    batches: Sequence[Mapping[str, Tensor]],
    *,
    steps: int,
    warmup: int,
    device: torch.device,
    epoch: int,
) -> dict[str, Any]:
    """The ``cost`` fields of a result row: method vs joint on the same batches, interleaved.

    ``epoch`` is the epoch index the steps run at (what the balancer's hooks read: a method with
    a warm-up or a modulation window must be timed inside it). Returns ``step_ms_median``,
    ``step_ms_iqr``, ``joint_step_ms_median``, ``joint_step_ms_iqr``,
    ``step_time_ratio`` (ratio of medians), ``peak_mem_bytes`` and ``mem_overhead_bytes`` (see the
    module docstring for CPU vs CUDA), ``timed_steps``, ``memory_kind`` and ``epoch``.
    """
    times = time_interleaved(
        {"joint": joint_trainer, "method": method_trainer},
        batches, steps=steps, warmup=warmup, device=device, epoch=epoch,
    )
    m, j = times["method"], times["joint"]
    cost: dict[str, Any] = {
        "step_ms_median": m.median,
        "step_ms_iqr": m.iqr,
        "joint_step_ms_median": j.median,
        "joint_step_ms_iqr": j.iqr,
        "step_time_ratio": m.median / j.median if j.median > 0 else float("nan"),
        "timed_steps": len(m.ms),
        "epoch": epoch,
    }
    cost.update(memory_cost(method_trainer, joint_trainer, batches, device=device, epoch=epoch, steps=steps))
    return cost


def memory_cost(
    method_trainer: Any,
    joint_trainer: Any,
    batches: Sequence[Mapping[str, Tensor]],
    *,
    device: torch.device,
    epoch: int,
    steps: int = 5,
) -> dict[str, Any]:
    """``peak_mem_bytes``, ``mem_overhead_bytes`` and ``memory_kind`` of the method against joint.

    CUDA: peak allocated bytes over ``min(steps, 5)`` steps of each trainer, in separate passes, and
    their difference plus the bytes the method keeps resident and joint does not (both trainers are
    resident during both passes, so the peaks alone cancel them). CPU: the exact persistent bytes of
    the method's own state (its parameters, their gradients, buffers, its optimizers' state) over
    joint's, and the whole trainer's as peak.
    """
    if device.type == "cuda":
        n = min(5, max(1, steps))
        peak_j = peak_memory_bytes(joint_trainer, batches, steps=n, device=device, epoch=epoch) or 0
        peak_m = peak_memory_bytes(method_trainer, batches, steps=n, device=device, epoch=epoch) or 0
        resident = _resident_bytes(method_trainer.balancer) - _resident_bytes(joint_trainer.balancer)
        return {
            "peak_mem_bytes": peak_m,
            "mem_overhead_bytes": int(peak_m - peak_j + resident),
            "memory_kind": "cuda_peak_allocated",
        }
    b_m = method_trainer.balancer
    b_j = joint_trainer.balancer
    extra_m = persistent_state_bytes(b_m, b_m.auxiliary_optimizers())
    extra_j = persistent_state_bytes(b_j, b_j.auxiliary_optimizers())
    base = persistent_state_bytes(method_trainer.model, [method_trainer.optimizer])
    return {
        "peak_mem_bytes": base + extra_m,
        "mem_overhead_bytes": int(extra_m - extra_j),
        "memory_kind": "cpu_persistent_state",
    }
