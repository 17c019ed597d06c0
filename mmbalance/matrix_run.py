"""Running (or resuming) a matrix plan: one JSON row per run, failures contained, nothing lost or
trained twice.

Each run is written to ``<out>/<run_id>.json`` atomically (:func:`mmbalance.output.write_json_atomic`).
Re-running the same matrix skips runs whose file says ``ok``, ``unsupported`` or ``diverged``, and
retries ``failed`` runs and unreadable files. A method that does not support a dataset's task or
modality count gets an ``unsupported`` row without training (the table shows ``-``). A run that
raises, or whose method calls ``sys.exit``, is recorded as ``failed`` with its error and traceback,
and the matrix goes on; a user's Ctrl-C (``KeyboardInterrupt``) stops the matrix without recording
the interrupted runs (an executor that trains elsewhere cancels them). A run whose loss diverges is
recorded ``diverged`` (see :mod:`mmbalance.runner`).

Where runs train is the executor's business (:mod:`mmbalance.executor`: this process, or Ray
tasks); this module keeps at most ``executor.max_in_flight`` runs submitted. Before submitting a
run it claims it (:mod:`mmbalance.claims`): a run claimed by another live process is skipped, a
stale claim is taken over (recorded in the row's ``takeover``), and a run whose row appeared
meanwhile is not trained again; so several processes on one folder (``--shard``, a second node, a
restarted driver) share the matrix with no run trained twice. Each run gets an epoch checkpoint
folder ``<out>/_ckpt/<run_id>/`` (:mod:`mmbalance.checkpoint`, ``checkpoint_every``), from which a
killed or retried run resumes; it is removed once the run's ``ok`` or ``diverged`` row is written,
unless ``keep_checkpoints``.

Before anything trains: the executor starts (bad executor options are one error, before any run),
the output folder is created and probed with a write (an unusable ``--out`` is a one-line error,
not a lost result), temporary files of killed writers are removed, and rows already in the folder
that were made on CPU with another intra-op thread count stop the matrix (results differ in their
last bits between thread counts, so a table would mix them). A row that cannot be written (full
disk, read-only folder) ends the matrix with a one-line error naming the path and the errno; every
row written before stays. The plan goes to ``<out>/_matrix/<hash>.json``, from which tables know the
expected cells.
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback
from collections import Counter, deque
from collections.abc import Mapping, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import torch

from mmbalance.checkpoint import CheckpointEvery, RunCheckpoint
from mmbalance.claims import DEFAULT_CLAIM_TIMEOUT_S, Claim, ClaimBook, ClaimInfo
from mmbalance.errors import ConfigError, OutputError, ResultError
from mmbalance.executor import Executor, LocalExecutor, RunFailure, RunFn
from mmbalance.matrix import MatrixSpec, PlannedRun, plan_hash, plan_matrix, select_shard
from mmbalance.matrix_progress import PRIMARY_METRIC, MatrixProgress
from mmbalance.output import prepare_output, remove_stale_temps, write_json_atomic
from mmbalance.results import PLAN_DIR, ResultRow, load_rows, read_row, write_row
from mmbalance.runner import environment
from mmbalance.runtime import check_device_name
from mmbalance.threads import ThreadSetting, auto_threads

__all__ = [
    "MatrixReport", "run_matrix", "runs_to_train", "check_thread_count", "PRIMARY_METRIC", "DONE_STATUSES",
]

DONE_STATUSES = ("ok", "unsupported", "diverged")  # a resume skips these; failed runs are retried
CLAIMED = "claimed"  # outcome of a run skipped because another live process holds its claim


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
        return sum(1 for _, status, skipped in self.outcomes if skipped and status != CLAIMED)

    @property
    def failed(self) -> list[PlannedRun]:
        return [run for run, status, _ in self.outcomes if status == "failed"]

    def summary(self) -> str:
        c = self.counts
        shard = f" (shard of {self.planned})" if self.selected != self.planned else ""
        diverged = f", {c['diverged']} diverged" if c["diverged"] else ""
        claimed = f"; {c[CLAIMED]} claimed by other processes" if c[CLAIMED] else ""
        return (
            f"{self.selected} runs{shard}: {c['ok']} ok, {c['unsupported']} unsupported, {c['failed']} failed"
            f"{diverged}; {self.skipped} already done{claimed}; results in {self.out}"
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
    """A ``failed`` row: the error's type, message and traceback (of the process where it failed)."""
    if isinstance(exc, RunFailure):
        record = dict(exc.record)
        row = _base_row(run, "failed", {**env, **record.pop("env", {})})
        row.update(record)
        row["error"] = {"type": exc.type_name, "message": exc.message, "traceback": exc.traceback_text}
        return row
    row = _base_row(run, "failed", env)
    message = f"the run called sys.exit({exc.code!r})" if isinstance(exc, SystemExit) else str(exc)
    tb = "".join(traceback.format_exception(exc))
    row["error"] = {"type": type(exc).__name__, "message": message, "traceback": tb}
    return row


def _driver_env(device: torch.device) -> dict[str, Any]:
    """The ``env`` of rows written without training (unsupported, or failed elsewhere): this process's,
    with the run's device when this process sees it (a Ray driver may have no GPU of its own)."""
    if device.type == "cuda" and not torch.cuda.is_available():
        return {**environment(torch.device("cpu")), "device": "cuda (on the cluster)", "device_type": "cuda"}
    return environment(device)


def _previous_status(path: Path) -> tuple[str | None, str | None]:
    """(status of an existing row file, reason it is unusable)."""
    if not path.exists():
        return None, None
    try:
        return read_row(path).status, None
    except ResultError as exc:
        return None, str(exc)


def runs_to_train(
    spec: MatrixSpec,
    out: str | os.PathLike[str],
    *,
    shard: tuple[int, int] | None = None,
    set_overrides: Mapping[str, Any] | None = None,
    data_root: str | None = None,
) -> list[str]:
    """The run ids of the selection without a finished row in ``out`` yet (what a call of
    :func:`run_matrix` would train, claims aside)."""
    runs = select_shard(plan_matrix(spec, set_overrides=set_overrides, data_root=data_root), shard)
    folder = Path(out)
    trainable = [run.run_id for run in runs if run.resolved is not None]
    statuses = {run_id: _previous_status(folder / f"{run_id}.json")[0] for run_id in trainable}
    return [run_id for run_id, status in statuses.items() if status not in DONE_STATUSES]


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


def _check_device(requested: str, from_option: bool, source: str,
                  executor: Executor | None = None) -> torch.device:
    """``check_device_name(requested)``, or ``executor.start(requested)``; a device error names its
    origin (``--device`` or the spec file)."""
    try:
        check_device_name(requested)
        return executor.start(requested) if executor is not None else torch.device("cpu")
    except ConfigError as exc:
        if not str(exc).startswith("device "):  # the executor's other options name themselves
            raise
        raise ConfigError(f"{exc} (--device)" if from_option else f"{source}: {exc}") from exc


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
    claim_timeout: float = DEFAULT_CLAIM_TIMEOUT_S,
    checkpoint_every: CheckpointEvery = "auto",
    keep_checkpoints: bool = False,
    threads: ThreadSetting = "auto",
) -> MatrixReport:
    """Run (or resume) the matrix's runs of ``shard`` into ``out``; one progress line per run.

    Runs train through ``executor`` (default: a :class:`~mmbalance.executor.LocalExecutor` calling
    ``run_fn(resolved_run, device=..., quiet=..., command=..., checkpoint=...)``, default
    :func:`mmbalance.runner.run_one`). ``claim_timeout`` (seconds) makes a claim without a heartbeat
    stale (:mod:`mmbalance.claims`); ``checkpoint_every`` (``"auto"``, or epochs, 0 = never) and
    ``keep_checkpoints`` govern epoch checkpoints (:mod:`mmbalance.checkpoint`). ``threads``: the
    intra-op thread setting of the default local executor (``"auto"`` or a count, see
    :mod:`mmbalance.threads`).

    Raises:
        ConfigError / RegistryError: invalid spec, shard, override, device or executor option, or a
            thread count that differs from the folder's rows (before any run).
        OutputError: the output folder is unusable (before any run), or a row cannot be written.
        KeyboardInterrupt: the user stopped the matrix; rows written so far stay.
    """
    stream = stream if stream is not None else sys.stderr
    requested = device if device is not None else spec.device
    _check_device(requested, device is not None, spec.source)
    runs = plan_matrix(spec, set_overrides=set_overrides, data_root=data_root)
    selected = select_shard(runs, shard)
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise OutputError(f"--out {str(out)!r} is a file, expected a folder")
    remove_stale_temps(out)
    remove_stale_temps(out / PLAN_DIR)
    previous = {run.run_id: _previous_status(out / f"{run.run_id}.json") for run in selected}
    todo = [run for run in selected if previous[run.run_id][0] not in DONE_STATUSES]
    executor = executor if executor is not None else LocalExecutor(run_fn, threads=threads)
    report = MatrixReport(out=out, planned=len(runs), selected=len(selected))
    dev = torch.device("cpu")  # replaced by the executor's device when something is to be done
    try:
        if todo:
            dev = _check_device(requested, device is not None, spec.source, executor)
            prepare_output(out)
            check_thread_count(load_rows(out).rows, dev, executor.threads, out)
        _write_plan(out, spec, runs)
        progress = MatrixProgress(selected, stream, quiet=quiet, parallel=executor.max_in_flight > 1)
        queue = []
        for run in selected:
            status = previous[run.run_id][0]
            if status in DONE_STATUSES:
                report.outcomes.append((run, status, True))
                progress.done(run, status)
            elif run.resolved is None:
                row = _base_row(run, "unsupported", _driver_env(dev))
                row["reason"] = run.unsupported_reason
                _record(out, run, row, report, progress)
                progress.unsupported(run, row)
            else:
                queue.append(run)
        book = ClaimBook(out, claim_timeout)
        book.discard_stale(run.run_id for run in selected if previous[run.run_id][0] in DONE_STATUSES)
        if queue:
            with book:
                _train(queue, out, executor, book, previous, report, progress, dev,
                       checkpoint_every, keep_checkpoints)
    finally:
        executor.close()
    return report


def _train(
    queue: Sequence[PlannedRun],
    out: Path,
    executor: Executor,
    book: ClaimBook,
    previous: Mapping[str, tuple[str | None, str | None]],
    report: MatrixReport,
    progress: MatrixProgress,
    dev: torch.device,
    checkpoint_every: CheckpointEvery,
    keep_checkpoints: bool,
) -> None:
    """Claim, submit (at most ``executor.max_in_flight`` at once) and record the runs of ``queue``."""
    pending = deque(queue)
    in_flight: dict[Future, tuple[PlannedRun, Claim, RunCheckpoint | None, float]] = {}
    progress.begin_training(len(queue))
    try:
        while pending or in_flight:
            while pending and len(in_flight) < executor.max_in_flight:
                run = pending.popleft()
                claim = book.acquire(run.run_id)
                if isinstance(claim, ClaimInfo):
                    report.outcomes.append((run, CLAIMED, True))
                    progress.claimed(run, claim)
                    continue
                status, unreadable = _previous_status(out / f"{run.run_id}.json")
                if status in DONE_STATUSES:  # written by another process since this one looked
                    book.release(claim)
                    report.outcomes.append((run, status, True))
                    progress.done(run, status, "done meanwhile by another process")
                    continue
                progress.submitted(run, _note(previous[run.run_id], unreadable, claim))
                checkpoint = None
                if checkpoint_every != 0:
                    checkpoint = RunCheckpoint.in_results(out, run.run_id, checkpoint_every, keep_checkpoints)
                future = executor.submit(run, progress.started, checkpoint)
                in_flight[future] = (run, claim, checkpoint, time.perf_counter())
            if not in_flight:
                break
            future = next(iter(executor.as_completed(list(in_flight))))
            run, claim, checkpoint, began = in_flight.pop(future)
            exc = future.exception()
            if exc is not None:
                row = _failed_row(run, exc, _driver_env(dev))
            else:
                row = future.result()
                if row.get("run_id") != run.run_id:
                    raise RuntimeError(
                        f"run_one returned run_id {row.get('run_id')!r} for planned run {run.run_id}; "
                        "run ids must not depend on anything outside the resolved run"
                    )
                row.setdefault("label", run.label)
            if claim.previous is not None:
                row["takeover"] = claim.takeover_record()
            _record(out, run, row, report, progress)
            seconds = None if progress.parallel else time.perf_counter() - began
            progress.finished(run, row, seconds, executor.running())
            if checkpoint is not None and row["status"] in ("ok", "diverged") and not checkpoint.keep:
                checkpoint.remove()
            book.release(claim)
    except KeyboardInterrupt:
        progress.stopped("interrupted")
        raise
    finally:
        progress.close()


def _note(previous: tuple[str | None, str | None], unreadable: str | None, claim: Claim) -> str:
    """What the run's line says before its outcome: a retry, a re-run or a takeover."""
    if claim.previous is not None or claim.reason is not None:
        who = claim.previous.describe() if claim.previous is not None else "an unreadable claim"
        return f"took over the claim of {who}: {claim.reason}; "
    if previous[0] == "failed":
        return "retrying failed run, "
    reason = unreadable or previous[1]
    return f"re-running ({reason}), " if reason else ""


def _record(out: Path, run: PlannedRun, row: dict[str, Any], report: MatrixReport,
            progress: MatrixProgress) -> None:
    try:
        write_row(out, row)
    except OutputError:
        progress.stopped("not written")  # end the progress line; the error itself is the caller's one line
        raise
    report.outcomes.append((run, row["status"], False))
