"""Executors: where the runs of a matrix plan train.

An executor takes planned runs (:class:`mmbalance.matrix.PlannedRun`, already resolved) and returns a
``concurrent.futures.Future`` per run whose result is the run's result row (a dict) or whose
exception is what the run raised. :func:`mmbalance.matrix_run.run_matrix` claims each run, submits
it, and writes its row as its future completes, keeping at most :attr:`Executor.max_in_flight` runs
submitted at once; so an executor decides only *where* and *when* a run trains, never what is
recorded, which run ids exist, or what is resumed.

Contract:

* :meth:`Executor.start` is called once, before the first submission, with the device the matrix
  asks for (``auto``, ``cpu``, ``cuda[:N]``); it returns the device runs train on and raises
  :class:`~mmbalance.errors.ConfigError` for options that cannot work (before anything runs);
* a run's failure (any ``Exception``, and a ``SystemExit`` raised by a method or plugin) is set on
  its future, as the exception itself or, when the run failed in another process, as a
  :class:`RunFailure`; the executor goes on with the next run;
* a ``KeyboardInterrupt`` (the user's Ctrl-C) is never captured: it propagates out of
  ``as_completed`` and stops the matrix, which then calls :meth:`Executor.close` (in-flight runs
  are cancelled);
* ``on_start(run)``, when given, is called just before the run begins (in this process for
  :class:`LocalExecutor`; executors that train elsewhere do not call it);
* ``checkpoint``, when given, is passed to the run function (``checkpoint=...``): the run resumes
  from it and writes epoch checkpoints (:mod:`mmbalance.checkpoint`).

:class:`LocalExecutor` trains in this process, one run at a time, lazily: a run starts when
``as_completed`` reaches it. The Ray executor (:mod:`mmbalance.executor_ray`) trains each run as one
Ray task.
"""

from __future__ import annotations

import functools
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import Future
from typing import TYPE_CHECKING, Any

import torch

from mmbalance.runtime import resolve_device

if TYPE_CHECKING:
    from mmbalance.checkpoint import RunCheckpoint
    from mmbalance.matrix import PlannedRun

__all__ = ["Executor", "LocalExecutor", "RunFn", "RunFailure"]

# run_fn(resolved_run, device=..., quiet=..., command=..., [checkpoint=...]) -> result row
RunFn = Callable[..., dict[str, Any]]


class RunFailure(Exception):
    """A run that failed in another process or on another node: the original error's type name,
    message and traceback as text, and the execution record to put in its row (``attempts``,
    ``env`` fields such as the node)."""

    def __init__(self, type_name: str, message: str, traceback_text: str,
                 record: Mapping[str, Any] | None = None) -> None:
        super().__init__(message)
        self.type_name, self.message, self.traceback_text = type_name, message, traceback_text
        self.record: dict[str, Any] = dict(record or {})


class Executor(ABC):
    """Trains planned runs somewhere; see the module docstring for the contract."""

    max_in_flight: int = 1  # runs submitted and not yet completed, at most

    @abstractmethod
    def start(self, device: str | torch.device) -> torch.device:
        """Prepare to train on ``device`` (as the matrix asks); return the device runs train on."""

    @property
    def threads(self) -> Any:
        """Intra-op CPU thread setting of each run, a count or ``"auto"`` (:mod:`mmbalance.threads`);
        the rows of a folder must agree on the count it gives."""
        return torch.get_num_threads()

    @abstractmethod
    def submit(self, run: PlannedRun, on_start: Callable[[PlannedRun], None] | None = None,
               checkpoint: RunCheckpoint | None = None) -> Future:
        """Schedule ``run``; the future's result is its row (a dict)."""

    @abstractmethod
    def as_completed(self, futures: Iterable[Future]) -> Iterator[Future]:
        """Yield ``futures`` as they complete (each exactly once)."""

    def running(self) -> int:
        """Runs that have started and not finished (for progress reports)."""
        return 0

    def close(self) -> None:  # noqa: B027 (optional hook, a no-op here)
        """Cancel runs still in flight and release what :meth:`start` acquired."""


class LocalExecutor(Executor):
    """Runs ``run_fn(run.resolved, device=..., quiet=True, command=run.command())`` in this process.

    Args:
        run_fn: trains one run and returns its row (default :func:`mmbalance.runner.run_one` with
            ``threads``).
        device: the device of every run; default: the one the matrix asks for (:meth:`start`).
        threads: the runs' intra-op thread setting, ``"auto"`` or a count (:mod:`mmbalance.threads`);
            a given ``run_fn`` must apply the same setting.
    """

    def __init__(
        self, run_fn: RunFn | None = None, device: torch.device | str | None = None, threads: Any = "auto"
    ) -> None:
        if run_fn is None:
            from mmbalance.runner import run_one

            run_fn = functools.partial(run_one, threads=threads)
        self.run_fn = run_fn
        self._threads = threads
        self.device = resolve_device(device) if device is not None else None
        self._pending: dict[Future, tuple[PlannedRun, Callable[[PlannedRun], None] | None, Any]] = {}
        self._running = False

    @property
    def threads(self) -> Any:
        return self._threads

    def start(self, device: str | torch.device) -> torch.device:
        if self.device is None:
            self.device = resolve_device(device)
        return self.device

    def submit(self, run: PlannedRun, on_start: Callable[[PlannedRun], None] | None = None,
               checkpoint: RunCheckpoint | None = None) -> Future:
        if run.resolved is None:
            raise ValueError(
                f"run {run.run_id} ({run.label} on {run.dataset}) is unsupported; nothing to train"
            )
        future: Future = Future()
        self._pending[future] = (run, on_start, checkpoint)
        return future

    def as_completed(self, futures: Iterable[Future]) -> Iterator[Future]:
        for future in futures:
            if future in self._pending:
                self._run(future)
            yield future

    def running(self) -> int:
        return int(self._running)

    def _run(self, future: Future) -> None:
        if self.device is None:
            raise RuntimeError("LocalExecutor.start(device) must be called before its runs train")
        run, on_start, checkpoint = self._pending.pop(future)
        if not future.set_running_or_notify_cancel():
            return
        if on_start is not None:
            on_start(run)
        extra = {"checkpoint": checkpoint} if checkpoint is not None else {}
        self._running = True
        try:
            row = self.run_fn(run.resolved, device=self.device, quiet=True, command=run.command(), **extra)
        except (Exception, SystemExit) as exc:  # KeyboardInterrupt propagates: the user stops the matrix
            future.set_exception(exc)
        else:
            future.set_result(row)
        finally:
            self._running = False
