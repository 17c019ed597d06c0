"""What a running matrix prints: one line per run on stderr, and a progress bar when runs train in
parallel.

With one run at a time (the local executor), each line is written in two parts: the run's head
(``[3/9] cggm on synthetic_cls2, seed 0 (1a2b3c4d5e6f): ``) when it starts, its outcome (``ok in 4.1
s: test acc 85.00%``) when it ends, so the line in progress shows what trains now. With several
runs in flight (the Ray executor), a tqdm bar over the runs to train shows done / running / failed
and an ETA, and each run's complete line is written above it as the run ends.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, TextIO

if TYPE_CHECKING:
    from mmbalance.claims import ClaimInfo
    from mmbalance.matrix import PlannedRun

__all__ = ["MatrixProgress", "PRIMARY_METRIC", "outcome_text"]

# The metric the progress line shows, per task.
PRIMARY_METRIC = {"cls": "acc", "reg": "mae", "seg": "dice_mean"}


def outcome_text(row: Mapping[str, Any], task: str) -> str:
    """The end of a run's line: its error, reason or primary test metric."""
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


def _how(row: Mapping[str, Any]) -> str:
    """`` (resumed from epoch 3, node n2, attempt 2)``: how the run was carried out, when notable."""
    parts = []
    if row.get("resumed_from_epoch") is not None:
        parts.append(f"resumed from epoch {row['resumed_from_epoch']}")
    node = (row.get("env") or {}).get("ray_task_id") and (row.get("env") or {}).get("node")
    if node:
        parts.append(f"node {node}")
    if (row.get("attempts") or 1) > 1:
        parts.append(f"attempt {row['attempts']}")
    return f" ({', '.join(parts)})" if parts else ""


class MatrixProgress:
    """Progress lines of one :func:`~mmbalance.matrix_run.run_matrix` call.

    Args:
        selected: the runs of this invocation, in plan order (they are numbered ``[i/n]``).
        stream: where lines go (stderr).
        quiet: print nothing.
        parallel: several runs in flight: complete lines at the end of each run, and a bar.
    """

    def __init__(self, selected: Sequence[PlannedRun], stream: TextIO, *, quiet: bool,
                 parallel: bool) -> None:
        width = len(str(len(selected)))
        self._heads = {
            run.run_id: f"[{i:>{width}}/{len(selected)}] {run.label} on {run.dataset}, seed {run.seed} "
            f"({run.run_id}): "
            for i, run in enumerate(selected, 1)
        }
        self.stream, self.quiet, self.parallel = stream, quiet, parallel
        self._notes: dict[str, str] = {}
        self._bar: Any = None
        self._failed = 0

    def _line(self, text: str) -> None:
        if self.quiet:
            return
        if self._bar is not None:
            self._bar.write(text, file=self.stream)
        else:
            print(text, file=self.stream, flush=True)

    def begin_training(self, count: int) -> None:
        """``count`` runs are about to be submitted (the bar's total, in parallel mode)."""
        if self.parallel and not self.quiet and count:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=count, unit="run", file=self.stream, desc="matrix", dynamic_ncols=True)
            self._postfix(0)

    def _postfix(self, running: int) -> None:
        if self._bar is not None:
            self._bar.set_postfix_str(f"running {running}, failed {self._failed}", refresh=True)

    def done(self, run: PlannedRun, status: str, note: str = "already done") -> None:
        """A run not trained now: its row already says ``status``."""
        self._line(self._heads[run.run_id] + f"{status}, {note}")

    def claimed(self, run: PlannedRun, holder: ClaimInfo) -> None:
        """A run skipped: another live process holds its claim."""
        self._line(self._heads[run.run_id] + f"claimed by {holder.describe()}, skipped")

    def submitted(self, run: PlannedRun, note: str) -> None:
        """``run`` is handed to the executor; ``note`` (``retrying failed run, ``) opens its outcome."""
        self._notes[run.run_id] = note

    def started(self, run: PlannedRun) -> None:
        """One run at a time: the run starts now (its head is printed, the outcome follows)."""
        if not self.quiet and not self.parallel:
            head = self._heads[run.run_id] + self._notes.get(run.run_id, "")
            print(head, end="", file=self.stream, flush=True)

    def finished(self, run: PlannedRun, row: Mapping[str, Any], seconds: float | None,
                 running: int = 0) -> None:
        """The run's row was written."""
        status = row["status"]
        took = f" in {seconds:.1f} s" if seconds is not None else ""
        end = f"{status}{took}{_how(row)}: {outcome_text(row, run.task)}".rstrip(": ")
        if status == "failed":
            self._failed += 1
        if self.parallel:
            self._line(self._heads[run.run_id] + self._notes.pop(run.run_id, "") + end)
            if self._bar is not None:
                self._bar.update(1)
                self._postfix(running)
        elif not self.quiet:
            self._notes.pop(run.run_id, None)
            print(end, file=self.stream, flush=True)

    def unsupported(self, run: PlannedRun, row: Mapping[str, Any]) -> None:
        """An unsupported run's row was written (no training)."""
        self._line(self._heads[run.run_id] + f"unsupported: {outcome_text(row, run.task)}".rstrip(": "))

    def stopped(self, why: str) -> None:
        """The matrix stops (``not written``, ``interrupted``): end the line in progress."""
        if self.quiet:
            return
        self.close()
        if self.parallel:
            print(f"matrix {why}", file=self.stream, flush=True)
        else:
            print(why, file=self.stream, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
