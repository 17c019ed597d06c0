"""Running (or resuming) a matrix plan: one JSON row per run, failures contained, nothing lost.

Each run is written to ``<out>/<run_id>.json`` atomically (:func:`mmbalance.results.write_json_atomic`).
Re-running the same matrix skips runs whose file says ``ok`` or ``unsupported``, and retries
``failed`` runs and unreadable files. A method that does not support a dataset's task or modality
count gets an ``unsupported`` row without training (the table shows ``-``). A run that raises is
recorded as ``failed`` with its error and traceback, and the matrix goes on; a user's Ctrl-C
(``KeyboardInterrupt``) stops the matrix without recording the interrupted run. The plan goes to
``<out>/_matrix/<hash>.json``, from which tables know the expected cells. Runs train through an
executor (:mod:`mmbalance.executor`); rows are written here, as runs complete.
"""

from __future__ import annotations

import os
import sys
import time
import traceback
from collections import Counter
from collections.abc import Mapping
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from mmbalance.errors import ResultError
from mmbalance.executor import Executor, LocalExecutor, RunFn
from mmbalance.matrix import MatrixSpec, PlannedRun, plan_hash, plan_matrix, select_shard
from mmbalance.results import PLAN_DIR, read_row, write_json_atomic, write_row
from mmbalance.runner import environment
from mmbalance.train import resolve_device

__all__ = ["MatrixReport", "run_matrix", "PRIMARY_METRIC", "DONE_STATUSES"]

# The metric the progress line shows, per task.
PRIMARY_METRIC = {"cls": "acc", "reg": "mae", "seg": "dice_mean"}
DONE_STATUSES = ("ok", "unsupported")  # a resume skips these; failed runs are retried


@dataclass
class MatrixReport:
    """What one invocation of :func:`run_matrix` did."""

    out: Path
    planned: int
    selected: int
    outcomes: list[tuple[PlannedRun, str, bool]] = field(default_factory=list)  # (run, status, skipped)

    @property
    def counts(self) -> Counter[str]:
        return Counter(status for _, status, _ in self.outcomes)

    @property
    def skipped(self) -> int:
        return sum(1 for *_, skipped in self.outcomes if skipped)

    @property
    def failed(self) -> list[PlannedRun]:
        return [run for run, status, _ in self.outcomes if status == "failed"]

    def summary(self) -> str:
        c = self.counts
        shard = f" (shard of {self.planned})" if self.selected != self.planned else ""
        return (
            f"{self.selected} runs{shard}: {c['ok']} ok, {c['unsupported']} unsupported, {c['failed']} failed; "
            f"{self.skipped} already done; results in {self.out}"
        )


def _base_row(run: PlannedRun, status: str, env: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "run_id": run.run_id,
        "status": status,
        "method": run.method,
        "label": run.label,
        "dataset": run.dataset,
        "task": run.task,
        "seed": run.seed,
        "config": dict(run.resolved.config) if run.resolved else {},
        "metrics": {},
        "history": [],
        "cost": {},
        "env": dict(env),
        "command": run.command(),
    }


def _failed_row(run: PlannedRun, exc: BaseException, env: Mapping[str, Any]) -> dict[str, Any]:
    row = _base_row(run, "failed", env)
    tb = "".join(traceback.format_exception(exc))
    row["error"] = {"type": type(exc).__name__, "message": str(exc), "traceback": tb}
    return row


def _previous_status(path: Path) -> tuple[str | None, str | None]:
    """(status of an existing row file, reason it is unusable)."""
    if not path.exists():
        return None, None
    try:
        return read_row(path).status, None
    except ResultError as exc:
        return None, str(exc)


def _outcome_text(row: Mapping[str, Any], task: str) -> str:
    status = row.get("status")
    if status == "unsupported":
        return str(row.get("reason") or "")
    if status != "ok":
        err = row.get("error") or {}
        lines = str(err.get("message", "")).splitlines()
        return f"{err.get('type', 'error')}: {lines[0] if lines else ''}"
    key = PRIMARY_METRIC.get(task, "")
    value = (row.get("metrics", {}).get("test") or {}).get(key)
    if value is None:
        return ""
    return f"test {key} {value * 100:.2f}%" if key != "mae" else f"test {key} {value:.4f}"


def run_matrix(
    spec: MatrixSpec,
    out: str | os.PathLike[str],
    *,
    shard: tuple[int, int] | None = None,
    set_overrides: Mapping[str, Any] | None = None,
    data_root: str | None = None,
    device: str | None = None,
    quiet: bool = False,
    stream: TextIO | None = None,
    run_fn: RunFn | None = None,
    executor: Executor | None = None,
) -> MatrixReport:
    """Run (or resume) the matrix's runs of ``shard`` into ``out``; one progress line per run.

    Runs train through ``executor`` (default: a :class:`~mmbalance.executor.LocalExecutor` calling
    ``run_fn(resolved_run, device=..., quiet=..., command=...)``, default
    :func:`mmbalance.runner.run_one`).

    Raises:
        ConfigError / RegistryError: invalid spec, shard, override or device (before any run).
        KeyboardInterrupt: the user stopped the matrix; rows written so far stay.
    """
    stream = stream if stream is not None else sys.stderr
    dev = resolve_device(device if device is not None else spec.device)
    runs = plan_matrix(spec, set_overrides=set_overrides, data_root=data_root)
    selected = select_shard(runs, shard)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    plan = {"spec": spec.to_dict(), "spec_file": spec.source, "runs": [r.plan_entry() for r in runs]}
    write_json_atomic(out / PLAN_DIR / f"{plan_hash(runs)}.json", plan)
    previous = {run.run_id: _previous_status(out / f"{run.run_id}.json") for run in selected}
    report = MatrixReport(out=out, planned=len(runs), selected=len(selected))
    width = len(str(len(selected)))
    heads = {
        run.run_id: f"[{i:>{width}}/{len(selected)}] {run.label} on {run.dataset}, seed {run.seed} ({run.run_id}): "
        for i, run in enumerate(selected, 1)
    }

    def announce(run: PlannedRun) -> None:
        status, unreadable = previous[run.run_id]
        note = "retrying failed run, " if status == "failed" else f"re-running ({unreadable}), " if unreadable else ""
        if not quiet:
            print(heads[run.run_id] + note, end="", file=stream, flush=True)

    env: dict[str, Any] = {}
    executor = executor if executor is not None else LocalExecutor(run_fn, dev)
    futures: dict[Future, PlannedRun] = {}
    for run in selected:
        status = previous[run.run_id][0]
        if status in DONE_STATUSES:
            report.outcomes.append((run, status, True))
            if not quiet:
                print(heads[run.run_id] + f"{status}, already done", file=stream, flush=True)
        elif run.resolved is None:
            announce(run)
            env = env or environment(dev)
            row = _base_row(run, "unsupported", env)
            row["reason"] = run.unsupported_reason
            _record(out, run, row, report, None, quiet, stream)
        else:
            futures[executor.submit(run, announce)] = run
    started = time.perf_counter()
    try:
        for future in executor.as_completed(list(futures)):
            run = futures.pop(future)
            exc = future.exception()
            if exc is not None:
                env = env or environment(dev)
                row = _failed_row(run, exc, env)
            else:
                row = future.result()
                if row.get("run_id") != run.run_id:
                    raise RuntimeError(
                        f"run_one returned run_id {row.get('run_id')!r} for planned run {run.run_id}; "
                        "run ids must not depend on anything outside the resolved run"
                    )
                row.setdefault("label", run.label)
            _record(out, run, row, report, time.perf_counter() - started, quiet, stream)
            started = time.perf_counter()
    except KeyboardInterrupt:
        if not quiet:
            print("interrupted", file=stream, flush=True)
        raise
    return report


def _record(
    out: Path,
    run: PlannedRun,
    row: dict[str, Any],
    report: MatrixReport,
    seconds: float | None,
    quiet: bool,
    stream: TextIO,
) -> None:
    write_row(out, row)
    status = row["status"]
    report.outcomes.append((run, status, False))
    if not quiet:
        took = f" in {seconds:.1f} s" if seconds is not None else ""
        print(f"{status}{took}: {_outcome_text(row, run.task)}".rstrip(": "), file=stream, flush=True)
