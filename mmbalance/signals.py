"""Deterministic cost signals of a training step: counts that do not depend on the machine's load.

Wall-clock ratios need a noise model (:mod:`mmbalance.bootstrap`); these do not. For one trainer,
over ``steps`` training steps on fixed batches (after the warm-up, so lazily built parts exist):

* ``flops``: floating-point operations of matrix products and convolutions
  (``torch.utils.flop_counter.FlopCounterMode``);
* ``aten_ops``: ATen operator calls dispatched by the step (forward, backward, gradient edits,
  optimizer steps), counted by a ``TorchDispatchMode``; ``aten_ops_by_name`` breaks them down.
  An extra pass, a clone, an elementwise op or a Python loop over parameters adds calls;
* ``state_bytes``: exact bytes kept across steps by the model, the main optimizer, the balancer
  and its own optimizers (:func:`mmbalance.measure.persistent_state_bytes`);
* on CUDA only: ``peak_allocated_bytes`` (``torch.cuda.max_memory_allocated`` over the counted
  steps) and ``syncs``, the host-device synchronisations the steps caused
  (``torch.cuda.set_sync_debug_mode("warn")``: one warning per synchronising call).

Counts are totals over the ``steps`` counted steps (``SIGNAL_KEYS`` lists the gated ones). The
same code, weights, batches and epoch give the same counts on any machine, so a gate compares
them exactly (:func:`mmbalance.gate.compare`).
"""

from __future__ import annotations

import collections
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode

from mmbalance.measure import persistent_state_bytes

__all__ = ["OpCounter", "SIGNAL_KEYS", "CUDA_SIGNAL_KEYS", "count_signals", "state_bytes"]

SIGNAL_KEYS = ("flops", "aten_ops", "state_bytes")
CUDA_SIGNAL_KEYS = ("peak_allocated_bytes", "syncs")
_SYNC_WARNING = "synchroniz"  # "called a synchronizing CUDA operation"


class OpCounter(TorchDispatchMode):
    """Counts every ATen operator call dispatched while active, by overload packet name.

    ``with OpCounter() as ops: fn()``; then ``ops.total`` and ``ops.by_name`` (a Counter of names
    such as ``"aten.mul_"``). Calls made by the autograd engine for a backward started inside the
    block are counted too (dispatch modes follow the engine's thread-local state).
    """

    def __init__(self) -> None:
        super().__init__()
        self.by_name: collections.Counter[str] = collections.Counter()

    @property
    def total(self) -> int:
        return sum(self.by_name.values())

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        self.by_name[str(func.overloadpacket)] += 1
        return func(*args, **(kwargs or {}))


def state_bytes(trainer: Any) -> int:
    """Persistent bytes of a trainer: model + main optimizer + balancer + its own optimizers."""
    balancer = trainer.balancer
    return persistent_state_bytes(trainer.model, [trainer.optimizer]) + persistent_state_bytes(
        balancer, balancer.auxiliary_optimizers()
    )


def count_signals(
    trainer: Any,
    batches: Sequence[Mapping[str, Tensor]],
    *,
    steps: int,
    epoch: int,
    device: torch.device,
    first_step: int = 0,
) -> dict[str, Any]:
    """Run ``steps`` training steps of ``trainer`` under the counters; return the signals.

    ``trainer`` has ``train_step(batch, epoch, step_in_epoch)``, ``flush_terms()``, ``model``,
    ``optimizer`` and ``balancer`` (a :class:`mmbalance.train.Trainer`). Batches are used cyclically
    from ``first_step`` and must be on ``device``. The loss-term buffer is flushed before counting
    (so the counted steps' host reads do not depend on what ran before) and after.
    """
    from torch.utils.flop_counter import FlopCounterMode

    if steps < 1:
        raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
    if not batches:
        raise ValueError("batches must contain at least one batch")
    trainer.flush_terms()
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        previous_mode = torch.cuda.get_sync_debug_mode()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if cuda:
            torch.cuda.set_sync_debug_mode("warn")
        try:
            with FlopCounterMode(display=False) as flops, OpCounter() as ops:
                for i in range(first_step, first_step + steps):
                    trainer.train_step(batches[i % len(batches)], epoch, i % len(batches))
        finally:
            if cuda:
                torch.cuda.set_sync_debug_mode(previous_mode)
    out: dict[str, Any] = {
        "flops": int(flops.get_total_flops()),
        "aten_ops": ops.total,
        "state_bytes": state_bytes(trainer),
        "aten_ops_by_name": dict(sorted(ops.by_name.items())),
    }
    if cuda:
        torch.cuda.synchronize(device)
        out["peak_allocated_bytes"] = int(torch.cuda.max_memory_allocated(device))
        out["syncs"] = sum(_SYNC_WARNING in str(w.message) for w in caught)
    trainer.flush_terms()
    return out
