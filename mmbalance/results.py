"""Result rows: the on-disk record of one run, loading with validation, and aggregation over seeds.

One run is one JSON file ``<dir>/<run_id>.json`` (written by :func:`write_row` through
:func:`mmbalance.output.write_json_atomic`, so a reader or a killed writer never sees half a file).
The row's fields are fixed by issue 3 (:data:`ROW_FIELDS`), plus ``label`` (the display name of the
method, e.g. ``unimodal[text]``), ``error`` on a failed row, ``reason`` on an unsupported one and
``divergence`` on a diverged one::

    run_id      12 hex digits, hash of the resolved run (also the file name)
    status      "ok" | "failed" | "unsupported" | "diverged"
    method, label, dataset, task ("cls" | "reg" | "seg"), seed
    config      {"method": {...}, "train": {...}, "dataset": {...}, "model": {...}} (resolved)
    metrics     {"val": {name: float}, "test": {name: float}, "best_epoch": int}
    history     [per-epoch object: losses, "val" metrics, "diagnostics", per-modality scores]
    cost        {"step_ms_median", "step_ms_iqr", "step_time_ratio", "peak_mem_bytes", ...}
    env         {"device", "device_type", "threads", "torch", "mmbalance", "git_commit", "dirty", ...}
    command     the command that reproduces the run
    error       failed rows: {"type", "message", "traceback"}
    divergence  diverged rows: {"step": int | null, "epoch": int | null, "type", "reason"}

Validation is a schema with type and depth limits (:data:`MAX_DEPTH`): a row nested deeper, or
with a field of the wrong type (a history entry that is not an object, ...), is reported as
malformed with its path, never a crash of the reader.

Non-finite floats (a Pearson correlation of a constant prediction) are stored as ``null`` so the
files are strict JSON; aggregation reads ``null`` metrics as NaN.

:func:`load_rows` never raises on a bad file: a corrupt, truncated or invalid file is returned as a
:class:`Problem` (path + reason) and skipped, so one broken file cannot hide a whole table.
A matrix also writes its plan to ``<dir>/_matrix/<hash>.json`` (:func:`load_plan` reads it back), so
tables know which cells are expected but still missing.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import statistics
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mmbalance.errors import ResultError
from mmbalance.output import strict_json, write_json_atomic

__all__ = [
    "ROW_FIELDS",
    "STATUSES",
    "COST_FIELDS",
    "PLAN_DIR",
    "ResultRow",
    "Problem",
    "LoadedRows",
    "Stat",
    "PlannedCell",
    "Plan",
    "write_json_atomic",
    "write_row",
    "read_row",
    "load_rows",
    "load_plan",
    "summarize",
    "aggregate",
    "aggregate_cost",
    "config_conflicts",
]

ROW_FIELDS = (
    "run_id", "status", "method", "dataset", "task", "seed",
    "config", "metrics", "history", "cost", "env", "command",
)
STATUSES = ("ok", "failed", "unsupported", "diverged")
TASKS = ("cls", "reg", "seg")
# The cost fields tables aggregate (numbers or null).
COST_FIELDS = ("step_ms_median", "step_ms_iqr", "step_time_ratio", "peak_mem_bytes", "mem_overhead_bytes")
PLAN_DIR = "_matrix"  # sub-folder of a results folder holding matrix plans (not rows)

MAX_DEPTH = 32  # nesting limit of a row's JSON (ours reach about 7)

_RUN_ID_RE = re.compile(r"^[0-9a-f]{12}$")


# -- the row -------------------------------------------------------------------------------------
def _need(cond: bool, reason: str) -> None:
    if not cond:
        raise ResultError(reason)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number_or_null(v: Any) -> bool:
    return v is None or (isinstance(v, int | float) and not isinstance(v, bool))


def _depth(value: Any) -> int:
    """Nesting depth of decoded JSON, without recursion (a scalar is 0, ``[]`` is 1)."""
    deepest, stack = 0, [(value, 0)]
    while stack:
        v, d = stack.pop()
        if isinstance(v, dict | list):
            deepest = max(deepest, d + 1)
            if deepest > MAX_DEPTH:
                return deepest
            stack.extend((x, d + 1) for x in (v.values() if isinstance(v, dict) else v))
    return deepest


def _check_history(history: list[Any]) -> None:
    for i, record in enumerate(history):
        _need(isinstance(record, dict), f"history[{i}] must be an object, got {type(record).__name__}")
        epoch = record.get("epoch")
        _need(epoch is None or _is_int(epoch), f"history[{i}].epoch must be an integer, got {epoch!r}")
        for key in ("val", "diagnostics", "terms"):
            value = record.get(key)
            _need(value is None or isinstance(value, dict),
                  f"history[{i}].{key} must be an object, got {type(value).__name__}")
            for name, v in (value or {}).items():
                _need(_is_number_or_null(v), f"history[{i}].{key}.{name} must be a number or null, got {v!r}")


def _check_status_fields(data: Mapping[str, Any], status: str) -> None:
    """The fields a status requires: metrics and cost of an ok row, error, reason, divergence."""
    metrics, cost = data["metrics"], data["cost"]
    if status == "ok":
        for split in ("val", "test"):
            values = metrics.get(split)
            _need(isinstance(values, dict) and bool(values), f"metrics.{split} must be a non-empty object")
            for k, v in values.items():
                _need(_is_number_or_null(v), f"metrics.{split}.{k} must be a number or null, got {v!r}")
        best = metrics.get("best_epoch")
        _need(_is_int(best), f"metrics.best_epoch must be an integer, got {best!r}")
        for k in COST_FIELDS:
            _need(_is_number_or_null(cost.get(k)), f"cost.{k} must be a number or null, got {cost.get(k)!r}")
    error = data.get("error")
    if status == "failed":
        _need(
            isinstance(error, dict)
            and isinstance(error.get("type"), str)
            and isinstance(error.get("message"), str),
            "a failed row needs error.type and error.message strings",
        )
    if status == "unsupported":
        reason = data.get("reason")
        _need(reason is None or isinstance(reason, str),
              f"reason must be a string, got {type(reason).__name__}")
    if status == "diverged":
        div = data.get("divergence")
        _need(isinstance(div, dict) and isinstance(div.get("reason"), str),
              "a diverged row needs a divergence object with a reason string")
        for key in ("step", "epoch"):
            _need(div.get(key) is None or _is_int(div.get(key)),
                  f"divergence.{key} must be an integer or null, got {div.get(key)!r}")


@dataclass(frozen=True)
class ResultRow:
    """One validated result row. ``data`` keeps the full JSON object (extra fields included)."""

    run_id: str
    status: str
    method: str
    label: str
    dataset: str
    task: str
    seed: int
    config: Mapping[str, Any]
    metrics: Mapping[str, Any]
    history: Sequence[Any]
    cost: Mapping[str, Any]
    env: Mapping[str, Any]
    command: str | None
    error: Mapping[str, Any] | None = None
    data: Mapping[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_dict(cls, data: Any) -> ResultRow:
        """Validate a decoded row.

        Raises:
            ResultError: naming the first field that is missing or has the wrong type or value.
        """
        _need(isinstance(data, dict), f"expected a JSON object, got {type(data).__name__}")
        _need(_depth(data) <= MAX_DEPTH, f"nested deeper than {MAX_DEPTH} levels")
        missing = [f for f in ROW_FIELDS if f not in data]
        _need(not missing, f"missing field(s) {', '.join(missing)}")
        run_id, status = data["run_id"], data["status"]
        _need(isinstance(run_id, str) and bool(_RUN_ID_RE.match(run_id)),
              f"run_id must be 12 hex digits, got {run_id!r}")
        _need(isinstance(status, str) and status in STATUSES,
              f"status must be one of {STATUSES}, got {status!r}")
        for name in ("method", "dataset"):
            _need(isinstance(data[name], str) and bool(data[name]),
                  f"{name} must be a non-empty string, got {data[name]!r}")
        label = data.get("label", data["method"])
        _need(isinstance(label, str) and bool(label), f"label must be a non-empty string, got {label!r}")
        _need(isinstance(data["task"], str) and data["task"] in TASKS,
              f"task must be one of {TASKS}, got {data['task']!r}")
        _need(_is_int(data["seed"]), f"seed must be an integer, got {data['seed']!r}")
        for name in ("config", "metrics", "cost", "env"):
            _need(isinstance(data[name], dict), f"{name} must be an object, got {type(data[name]).__name__}")
        _need(isinstance(data["history"], list),
              f"history must be a list, got {type(data['history']).__name__}")
        _need(data["command"] is None or isinstance(data["command"], str), "command must be a string or null")
        _check_history(data["history"])
        _check_status_fields(data, status)
        metrics, cost, error = data["metrics"], data["cost"], data.get("error")
        return cls(
            run_id=run_id,
            status=status,
            method=data["method"],
            label=label,
            dataset=data["dataset"],
            task=data["task"],
            seed=data["seed"],
            config=data["config"],
            metrics=metrics,
            history=data["history"],
            cost=cost,
            env=data["env"],
            command=data["command"],
            error=error if isinstance(error, dict) else None,
            data=data,
        )

    def to_dict(self) -> dict[str, Any]:
        """The JSON object of this row (the validated input, extra fields included)."""
        return dict(self.data)

    def metric(self, split: str, name: str) -> float | None:
        """``metrics[split][name]`` as a float (NaN for null); None when the row lacks it."""
        values = self.metrics.get(split) or {}
        if name not in values:
            return None
        v = values[name]
        return math.nan if v is None else float(v)

    @property
    def device(self) -> str | None:
        device = self.env.get("device")
        return device if isinstance(device, str) else None


def write_row(directory: str | os.PathLike[str], row: Mapping[str, Any]) -> Path:
    """Validate ``row`` and write it atomically to ``<directory>/<run_id>.json``."""
    validated = ResultRow.from_dict(strict_json(row))
    return write_json_atomic(Path(directory) / f"{validated.run_id}.json", row)


def read_row(path: str | os.PathLike[str]) -> ResultRow:
    """Read and validate one row file.

    Raises:
        ResultError: naming the path and the reason (unreadable, not JSON, truncated, invalid, or a
            ``run_id`` that differs from the file name).
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ResultError(f"{path}: cannot read ({exc.strerror or exc})") from exc
    except UnicodeDecodeError as exc:
        raise ResultError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from exc
    if not text.strip():
        raise ResultError(f"{path}: empty file")
    try:
        data = json.loads(text)
    except RecursionError as exc:
        raise ResultError(f"{path}: malformed row: JSON nested too deep to read") from exc
    except json.JSONDecodeError as exc:
        stripped = text.rstrip()
        # A cut-off file ends inside a value: the parser fails at the end, inside an unterminated
        # string, or the text lacks the closing bracket of a complete document.
        truncated = (
            exc.pos >= len(stripped)
            or exc.msg.startswith("Unterminated string")
            or not stripped.endswith(("}", "]"))
        )
        what = "truncated JSON" if truncated else "invalid JSON"
        raise ResultError(f"{path}: {what} ({exc.msg}: line {exc.lineno} column {exc.colno})") from exc
    try:
        row = ResultRow.from_dict(data)
    except ResultError as exc:
        raise ResultError(f"{path}: {exc}") from exc
    if path.stem != row.run_id:
        raise ResultError(f"{path}: run_id {row.run_id!r} differs from the file name {path.name!r}")
    return row


@dataclass(frozen=True)
class Problem:
    """A file that could not be used, and why."""

    path: Path
    reason: str

    def __str__(self) -> str:
        return f"{self.path}: {self.reason}"


@dataclass(frozen=True)
class LoadedRows:
    """Valid rows (sorted by file name) and the files skipped, with reasons."""

    rows: tuple[ResultRow, ...]
    problems: tuple[Problem, ...]


def load_rows(directory: str | os.PathLike[str]) -> LoadedRows:
    """Load every ``*.json`` row directly in ``directory``; bad files become :class:`Problem`\\ s.

    Hidden files (temporaries of an interrupted write) and the ``_matrix`` plan folder are ignored.

    Raises:
        ResultError: ``directory`` does not exist or is not a folder.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise ResultError(f"results folder {str(directory)!r} does not exist or is not a folder")
    rows: list[ResultRow] = []
    problems: list[Problem] = []
    for path in sorted(directory.glob("*.json")):
        if path.name.startswith(".") or not path.is_file():
            continue
        try:
            rows.append(read_row(path))
        except ResultError as exc:
            reason = str(exc)
            prefix = f"{path}: "
            problems.append(Problem(path, reason[len(prefix):] if reason.startswith(prefix) else reason))
    return LoadedRows(tuple(rows), tuple(problems))


# -- matrix plans --------------------------------------------------------------------------------
@dataclass(frozen=True)
class PlannedCell:
    """One planned run of a matrix: what a table expects to find."""

    run_id: str
    label: str
    method: str
    dataset: str
    task: str
    seed: int
    unsupported: bool


@dataclass(frozen=True)
class Plan:
    """The union of the plans found in a results folder, in matrix order."""

    cells: tuple[PlannedCell, ...] = ()

    @property
    def labels(self) -> list[str]:
        return list(dict.fromkeys(c.label for c in self.cells))

    @property
    def datasets(self) -> list[str]:
        return list(dict.fromkeys(c.dataset for c in self.cells))

    def __bool__(self) -> bool:
        return bool(self.cells)

    def relabel(self, rows: Iterable[ResultRow]) -> list[ResultRow]:
        """``rows`` under this plan's label for each planned run id: the same run written by another
        spec (where a variant had another name) shows under this plan's name."""
        labels = {c.run_id: c.label for c in self.cells}
        return [
            dataclasses.replace(r, label=labels[r.run_id]) if labels.get(r.run_id, r.label) != r.label else r
            for r in rows
        ]


def load_plan(directory: str | os.PathLike[str]) -> tuple[Plan, tuple[Problem, ...]]:
    """Read every plan in ``<directory>/_matrix/`` (written by :mod:`mmbalance.matrix`).

    Returns the merged plan (duplicates removed, first occurrence wins) and the unreadable files.
    """
    folder = Path(directory) / PLAN_DIR
    cells: dict[str, PlannedCell] = {}
    problems: list[Problem] = []
    if not folder.is_dir():
        return Plan(), ()
    for path in sorted(folder.glob("*.json"), key=lambda p: (p.stat().st_mtime_ns, p.name)):
        if path.name.startswith("."):
            continue
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            entries = data["runs"]
            if not isinstance(entries, list):
                raise TypeError("'runs' is not a list")
            for e in entries:
                cell = PlannedCell(
                    run_id=str(e["run_id"]),
                    label=str(e["label"]),
                    method=str(e["method"]),
                    dataset=str(e["dataset"]),
                    task=str(e["task"]),
                    seed=int(e["seed"]),
                    unsupported=bool(e["unsupported"]),
                )
                cells.setdefault(cell.run_id, cell)
        except (OSError, ValueError, KeyError, TypeError, RecursionError) as exc:
            problems.append(Problem(path, f"unreadable matrix plan ({type(exc).__name__}: {exc})"))
    return Plan(tuple(cells.values())), tuple(problems)


# -- aggregation ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Stat:
    """Mean, sample standard deviation (ddof=1) and count. ``std`` is None for a single value:
    one seed says nothing about spread, and tables show it blank rather than a misleading 0."""

    mean: float
    std: float | None
    n: int


def summarize(values: Sequence[float]) -> Stat:
    """:class:`Stat` of ``values`` (NaNs propagate: a NaN seed makes the mean NaN, visibly)."""
    if not values:
        raise ValueError("summarize needs at least one value")
    vals = [float(v) for v in values]
    mean = math.fsum(vals) / len(vals)
    std = statistics.stdev(vals) if len(vals) > 1 else None
    if std is not None and any(math.isnan(v) for v in vals):
        std = math.nan
    return Stat(mean, std, len(vals))


def aggregate(rows: Iterable[ResultRow], split: str = "test") -> dict[tuple[str, str, str], Stat]:
    """Mean, std and n over seeds per ``(label, dataset, metric)``, from the ``ok`` rows' ``split``.

    Raises:
        ValueError: ``split`` is not "val" or "test".
    """
    if split not in ("val", "test"):
        raise ValueError(f"split must be 'val' or 'test', got {split!r}")
    values: dict[tuple[str, str, str], list[float]] = {}
    for row in rows:
        if row.status != "ok":
            continue
        for name in row.metrics.get(split) or {}:
            v = row.metric(split, name)
            if v is not None:
                values.setdefault((row.label, row.dataset, name), []).append(v)
    return {key: summarize(vals) for key, vals in values.items()}


def aggregate_cost(rows: Iterable[ResultRow]) -> dict[tuple[str, str, str], Stat]:
    """Like :func:`aggregate`, over the ``cost`` fields of :data:`COST_FIELDS` (nulls skipped)."""
    values: dict[tuple[str, str, str], list[float]] = {}
    for row in rows:
        if row.status != "ok":
            continue
        for name in COST_FIELDS:
            v = row.cost.get(name)
            if v is not None:
                values.setdefault((row.label, row.dataset, name), []).append(float(v))
    return {key: summarize(vals) for key, vals in values.items()}


def _without_seeds(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {k: _without_seeds(v) for k, v in value.items() if k != "seed"}
    return value


def config_conflicts(rows: Iterable[ResultRow]) -> list[str]:
    """Cells whose ``ok`` rows differ in more than the seed (e.g. runs with different ``--set``
    written to one folder): their mean would mix configurations, so tables warn about them."""
    configs: dict[tuple[str, str], set[str]] = {}
    for row in rows:
        if row.status != "ok":
            continue
        key = json.dumps(_without_seeds(row.config), sort_keys=True, default=str)
        configs.setdefault((row.label, row.dataset), set()).add(key)
    return [
        f"{label} on {dataset}: rows from {len(keys)} different configurations are averaged together"
        for (label, dataset), keys in sorted(configs.items())
        if len(keys) > 1
    ]
