"""Executors: where the runs of a matrix plan train.

An executor takes planned runs (:class:`mmbalance.matrix.PlannedRun`, already resolved) and returns a
``concurrent.futures.Future`` per run whose result is the run's result row (a dict) or whose
exception is what the run raised. :func:`mmbalance.matrix_run.run_matrix` submits the runs that are
not done yet, then writes each row as its future completes, so an executor decides only *where* and
*when* a run trains, never what is recorded.

Contract of :meth:`Executor.submit` / :meth:`Executor.as_completed`:

* a run's failure (any ``Exception``, and a ``SystemExit`` raised by a method or plugin) is set on
  its future; the executor goes on with the next run;
* a ``KeyboardInterrupt`` (the user's Ctrl-C) is never captured: it propagates out of
  ``as_completed`` and stops the matrix;
* ``on_start(run)``, when given, is called just before the run begins (in this process for
  :class:`LocalExecutor`).

:class:`LocalExecutor` trains in this process, one run at a time, in submission order, lazily: a
run starts when ``as_completed`` reaches it, so rows are written one by one as runs finish.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from mmbalance.matrix import PlannedRun

__all__ = ["Executor", "LocalExecutor", "RunFn"]

# run_fn(resolved_run, device=..., quiet=..., command=...) -> result row
RunFn = Callable[..., dict[str, Any]]


class Executor(ABC):
    """Trains planned runs somewhere; see the module docstring for the contract."""

    @abstractmethod
    def submit(self, run: PlannedRun, on_start: Callable[[PlannedRun], None] | None = None) -> Future:
        """Schedule ``run``; the future's result is its row (a dict)."""

    @abstractmethod
    def as_completed(self, futures: Iterable[Future]) -> Iterator[Future]:
        """Yield ``futures`` as they complete (each exactly once)."""


class LocalExecutor(Executor):
    """Runs ``run_fn(run.resolved, device=..., quiet=True, command=run.command())`` in this process.

    Args:
        run_fn: trains one run and returns its row (default :func:`mmbalance.runner.run_one`).
        device: passed to ``run_fn``.
    """

    def __init__(self, run_fn: RunFn | None = None, device: torch.device | str = "cpu") -> None:
        if run_fn is None:
            from mmbalance.runner import run_one

            run_fn = run_one
        self.run_fn = run_fn
        self.device = device
        self._pending: dict[Future, tuple[PlannedRun, Callable[[PlannedRun], None] | None]] = {}

    def submit(self, run: PlannedRun, on_start: Callable[[PlannedRun], None] | None = None) -> Future:
        if run.resolved is None:
            raise ValueError(
                f"run {run.run_id} ({run.label} on {run.dataset}) is unsupported; nothing to train"
            )
        future: Future = Future()
        self._pending[future] = (run, on_start)
        return future

    def as_completed(self, futures: Iterable[Future]) -> Iterator[Future]:
        for future in futures:
            if future in self._pending:
                self._run(future)
            yield future

    def _run(self, future: Future) -> None:
        run, on_start = self._pending.pop(future)
        if not future.set_running_or_notify_cancel():
            return
        if on_start is not None:
            on_start(run)
        try:
            row = self.run_fn(run.resolved, device=self.device, quiet=True, command=run.command())
        except (Exception, SystemExit) as exc:  # KeyboardInterrupt propagates: the user stops the matrix
            future.set_exception(exc)
        else:
            future.set_result(row)
