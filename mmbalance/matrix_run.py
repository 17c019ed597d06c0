"""Running (or resuming) a matrix plan: one JSON row per run, failures contained, nothing lost.

Each run is written to ``<out>/<run_id>.json`` atomically (:func:`mmbalance.output.write_json_atomic`).
Re-running the same matrix skips runs whose file says ``ok``, ``unsupported`` or ``diverged``, and
retries ``failed`` runs and unreadable files. A method that does not support a dataset's task or
modality count gets an ``unsupported`` row without training (the table shows ``-``). A run that
raises, or whose method calls ``sys.exit``, is recorded as ``failed`` with its error and traceback,
and the matrix goes on; a user's Ctrl-C (``KeyboardInterrupt``) stops the matrix without recording
the interrupted run. A run whose loss diverges is recorded ``diverged`` (see :mod:`mmbalance.runner`).

Before anything trains: the output folder is created and probed with a write (an unusable ``--out``
is a one-line error, not a lost result), temporary files of killed writers are removed, and rows
already in the folder that were made on CPU with another intra-op thread count stop the matrix
(results differ in their last bits between thread counts, so a table would mix them). A row that
cannot be written (full disk, read-only folder) ends the matrix with a one-line error naming the
path and the errno; every row written before stays. The plan goes to ``<out>/_matrix/<hash>.json``,
from which tables know the expected cells.
"""

from __future__ import annotations

import functools
import json
import os
import sys
import time
import traceback
from collections import Counter
from collections.abc import Mapping, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import torch

from mmbalance.errors import ConfigError, OutputError, ResultError
from mmbalance.executor import Executor, LocalExecutor, RunFn
from mmbalance.matrix import MatrixSpec, PlannedRun, plan_hash, plan_matrix, select_shard
from mmbalance.output import prepare_output, remove_stale_temps, write_json_atomic
from mmbalance.results import PLAN_DIR, ResultRow, load_rows, read_row, write_row
from mmbalance.runner import environment, run_one
from mmbalance.threads import ThreadSetting, auto_threads, check_threads
from mmbalance.train import resolve_device

__all__ = ["MatrixReport", "run_matrix", "check_thread_count", "PRIMARY_METRIC", "DONE_STATUSES"]

# The metric the progress line shows, per task.
PRIMARY_METRIC = {"cls": "acc", "reg": "mae", "seg": "dice_mean"}
DONE_STATUSES = ("ok", "unsupported", "diverged")  # a resume skips these; failed runs are retried


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
        diverged = f", {c['diverged']} diverged" if c["diverged"] else ""
        return (
            f"{self.selected} runs{shard}: {c['ok']} ok, {c['unsupported']} unsupported, {c['failed']} failed"
            f"{diverged}; {self.skipped} already done; results in {self.out}"
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
    message = f"the run called sys.exit({exc.code!r})" if isinstance(exc, SystemExit) else str(exc)
    tb = "".join(traceback.format_exception(exc))
    row["error"] = {"type": type(exc).__name__, "message": message, "traceback": tb}
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
    if status == "diverged":
        return str((row.get("divergence") or {}).get("reason", ""))
    if status != "ok":
        err = row.get("error") or {}
        lines = str(err.get("message", "")).splitlines()
        return f"{err.get('type', 'error')}: {lines[0] if lines else ''}"
    key = PRIMARY_METRIC.get(task, "")
    value = (row.get("metrics", {}).get("test") or {}).get(key)
    if value is None:
        return ""
    return f"test {key} {value * 100:.2f}%" if key != "mae" else f"test {key} {value:.4f}"


def check_thread_count(
    rows: Sequence[ResultRow], device: torch.device, threads: ThreadSetting, out: Path
) -> None:
    """Refuse to add rows made with another CPU thread count than the folder's rows were made with.

    ``threads`` is the setting of this command: a count, or ``"auto"`` (:mod:`mmbalance.threads`),
    under which each existing CPU row is held to the count the rule gives for its recorded forward
    FLOPs (``env.threads_rule.forward_flops``) on this machine; a row without that record (made
    before the rule existed) cannot be checked and stops the command.

    Raises:
        ConfigError: naming the folder, the count of the existing row, the count asked now, and how
            to proceed.
    """
    if device.type != "cpu":
        return
    for row in rows:
        made = row.env.get("threads")
        if row.status not in ("ok", "diverged") or row.env.get("device_type") != "cpu":
            continue
        if not isinstance(made, int) or isinstance(made, bool):
            continue
        expected: int | None = threads if isinstance(threads, int) else None
        if threads == "auto":
            flops = (row.env.get("threads_rule") or {}).get("forward_flops")
            if not isinstance(flops, int):
                raise ConfigError(
                    f"results folder {str(out)!r} holds CPU rows made with {made} intra-op thread(s) and no "
                    f"record of the thread rule's input (e.g. run {row.run_id}); `--threads auto` cannot "
                    f"tell whether it would mix thread counts: run with `mmbalance --threads {made} ...`, "
                    "or write to another --out"
                )
            expected = auto_threads(flops, torch.get_num_threads())
        if made != expected:
            raise ConfigError(
                f"results folder {str(out)!r} holds CPU rows made with {made} intra-op thread(s) (e.g. run "
                f"{row.run_id}), but this command would run with {expected} (--threads {threads}); "
                "results differ between thread counts, so the folder would mix them: run with "
                f"`mmbalance --threads {made} ...`, or write to another --out"
            )


def _write_plan(out: Path, spec: MatrixSpec, runs: Sequence[PlannedRun]) -> None:
    """Write the plan unless the same plan is already there (a finished matrix writes nothing)."""
    plan = {"spec": spec.to_dict(), "spec_file": spec.source, "runs": [r.plan_entry() for r in runs]}
    path = out / PLAN_DIR / f"{plan_hash(runs)}.json"
    if path.parent.exists() and not path.parent.is_dir():
        raise OutputError(f"{str(path.parent)!r} is a file; a results folder keeps its matrix plans there")
    try:
        if json.loads(path.read_text(encoding="utf-8")).get("runs") == plan["runs"]:
            return
    except (OSError, ValueError, AttributeError, RecursionError):
        pass  # missing or unreadable: write it
    write_json_atomic(path, plan)


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
    threads: ThreadSetting = "auto",
) -> MatrixReport:
    """Run (or resume) the matrix's runs of ``shard`` into ``out``; one progress line per run.

    Runs train through ``executor`` (default: a :class:`~mmbalance.executor.LocalExecutor` calling
    ``run_fn(resolved_run, device=..., quiet=..., command=...)``, default
    :func:`mmbalance.runner.run_one` with ``threads``: ``"auto"`` or a count, see
    :mod:`mmbalance.threads`).

    Raises:
        ConfigError / RegistryError: invalid spec, shard, override or device, or a thread count that
            differs from the folder's rows (before any run).
        OutputError: the output folder is unusable (before any run), or a row cannot be written.
        KeyboardInterrupt: the user stopped the matrix; rows written so far stay.
    """
    stream = stream if stream is not None else sys.stderr
    try:
        dev = resolve_device(device if device is not None else spec.device)
    except ConfigError as exc:
        raise ConfigError(f"{exc} (--device)" if device is not None else f"{spec.source}: {exc}") from exc
    runs = plan_matrix(spec, set_overrides=set_overrides, data_root=data_root)
    selected = select_shard(runs, shard)
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise OutputError(f"--out {str(out)!r} is a file, expected a folder")
    remove_stale_temps(out)
    remove_stale_temps(out / PLAN_DIR)
    previous = {run.run_id: _previous_status(out / f"{run.run_id}.json") for run in selected}
    todo = [run for run in selected if previous[run.run_id][0] not in DONE_STATUSES]
    if todo:
        prepare_output(out)
        check_thread_count(load_rows(out).rows, dev, check_threads(threads), out)
    _write_plan(out, spec, runs)
    report = MatrixReport(out=out, planned=len(runs), selected=len(selected))
    width = len(str(len(selected)))
    heads = {
        run.run_id: f"[{i:>{width}}/{len(selected)}] {run.label} on {run.dataset}, seed {run.seed} "
        f"({run.run_id}): "
        for i, run in enumerate(selected, 1)
    }

    def announce(run: PlannedRun) -> None:
        status, unreadable = previous[run.run_id]
        note = f"re-running ({unreadable}), " if unreadable else ""
        note = "retrying failed run, " if status == "failed" else note
        if not quiet:
            print(heads[run.run_id] + note, end="", file=stream, flush=True)

    env: dict[str, Any] = {}
    if executor is None:
        run_fn = run_fn if run_fn is not None else functools.partial(run_one, threads=threads)
        executor = LocalExecutor(run_fn, dev)
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
    try:
        write_row(out, row)
    except OutputError:
        if not quiet:  # end the progress line; the error itself is the caller's one line
            print("not written", file=stream, flush=True)
        raise
    status = row["status"]
    report.outcomes.append((run, status, False))
    if not quiet:
        took = f" in {seconds:.1f} s" if seconds is not None else ""
        print(f"{status}{took}: {_outcome_text(row, run.task)}".rstrip(": "), file=stream, flush=True)
