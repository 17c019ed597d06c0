"""Result rows as pandas DataFrames, for analysing a matrix or a sweep in Python.

:func:`load_results`: one DataFrame row per run, the config, metrics, cost and environment
flattened into dotted columns. :func:`load_history`: one DataFrame row per (run, epoch) with the
per-epoch losses, validation metrics and balancer diagnostics. Both read the files with
:func:`mmbalance.results.load_rows` / :func:`~mmbalance.results.read_row`, so a file that is not a
valid row (truncated, corrupt, wrong schema) never stops the others: it is skipped with a
``UserWarning`` naming the file and the reason, and listed in ``frame.attrs["problems"]``.

Columns of :func:`load_results`:

* ``run_id``, ``status`` (ok / failed / unsupported), ``method``, ``label``, ``dataset``, ``task``,
  ``seed``, ``command``, ``path`` (the row file), ``error`` (``"Type: message"`` of a failed run);
* ``val.<metric>`` and ``test.<metric>`` (test at the best-validation epoch, ``best_epoch``); a
  metric stored as null (a correlation of a constant prediction) or absent is NaN;
* ``config.<section>.<field>`` (sections method, train, dataset, model; list values as tuples),
  ``cost.<field>`` and ``env.<field>``.

Example (the cell ``joint`` / ``synthetic_cls2`` / ``acc`` of a metric table)::

    runs = mmbalance.load_results("results/synthetic/rows")
    acc = runs.query("label == 'joint' and dataset == 'synthetic_cls2'")["test.acc"] * 100
    print(f"{acc.mean():.2f} ± {acc.std():.2f} ({acc.count()})")
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mmbalance.errors import ResultError
from mmbalance.results import ResultRow, load_plan, load_rows, read_row

if TYPE_CHECKING:
    import pandas

__all__ = ["load_results", "load_history"]

PathLike = str | os.PathLike[str]
_ORDER = ["dataset", "method", "label", "seed", "run_id"]


def _flatten(prefix: str, value: Any, out: dict[str, Any]) -> None:
    if isinstance(value, Mapping):
        for key, inner in value.items():
            _flatten(f"{prefix}.{key}" if prefix else str(key), inner, out)
    else:
        out[prefix] = tuple(value) if isinstance(value, list) else value


def _number(value: Any) -> float:
    return math.nan if value is None else float(value)


def _read(paths: PathLike | Iterable[PathLike]) -> tuple[list[tuple[Path, ResultRow]], list[str]]:
    """Rows of every results folder or row file in ``paths``, and the problems of the others."""
    items = [paths] if isinstance(paths, str | os.PathLike) else list(paths)
    if not items:
        raise ResultError("no results folder or row file given")
    rows: list[tuple[Path, ResultRow]] = []
    problems: list[str] = []
    for item in items:
        path = Path(item)
        if path.is_file():
            try:
                rows.append((path, read_row(path)))
            except ResultError as exc:
                problems.append(str(exc))
            continue
        loaded = load_rows(path)  # raises, naming the folder, when it does not exist
        plan, _ = load_plan(path)  # labels as the tables show them (a variant's name, grid values)
        rows += [(path / f"{row.run_id}.json", row) for row in plan.relabel(loaded.rows)]
        problems += [str(p) for p in loaded.problems]
    for problem in problems:
        warnings.warn(f"skipped {problem}", UserWarning, stacklevel=3)
    return rows, problems


def _frame(records: list[dict[str, Any]], problems: list[str], order: list[str]) -> pandas.DataFrame:
    import pandas

    frame = pandas.DataFrame.from_records(records)
    if frame.empty:
        frame = pandas.DataFrame(columns=order)
    else:
        frame = frame.sort_values(order, kind="stable").reset_index(drop=True)
    frame.attrs["problems"] = problems
    return frame


def load_results(paths: PathLike | Iterable[PathLike]) -> pandas.DataFrame:
    """One row per run in the results folder(s) or row file(s) ``paths`` (module docstring).

    Sorted by dataset, method, label, seed. Folders are read as ``mmbalance table`` reads them
    (the row files directly inside; the ``_matrix`` plan folder is not a row).

    Raises:
        ResultError: a folder that does not exist, or no path at all.
    """
    rows, problems = _read(paths)
    records = []
    for path, row in rows:
        record: dict[str, Any] = {
            "run_id": row.run_id, "status": row.status, "method": row.method, "label": row.label,
            "dataset": row.dataset, "task": row.task, "seed": row.seed, "command": row.command,
            "path": str(path),
            "error": f"{row.error.get('type')}: {row.error.get('message')}" if row.error else None,
        }
        for split in ("val", "test"):
            for name, value in (row.metrics.get(split) or {}).items():
                record[f"{split}.{name}"] = _number(value)
        record["best_epoch"] = row.metrics.get("best_epoch")
        for section in ("config", "cost", "env"):
            _flatten(section, row.data.get(section) or {}, record)
        records.append(record)
    return _frame(records, problems, _ORDER)


def load_history(source: PathLike | Iterable[PathLike] | pandas.DataFrame) -> pandas.DataFrame:
    """One row per (run, epoch): the per-epoch record of each run, flattened.

    Args:
        source: results folder(s) or row file(s), or a frame of :func:`load_results` (its
            ``path`` column says which files to read; filter it first to choose the runs).

    Columns: ``run_id``, ``method``, ``label``, ``dataset``, ``task``, ``seed``, ``epoch`` and the
    record's keys with dots for nesting: ``train_loss``, ``lr``, ``terms.<term>``, ``val.<metric>``
    (``val.score/<modality>``: the per-modality validation score), ``diagnostics.<key>`` (e.g.
    ``diagnostics.B/audio``). Values stored as null are NaN.
    """
    if hasattr(source, "columns"):
        if "path" not in source.columns:
            raise ResultError("load_history needs a frame with the 'path' column of load_results")
        rows, problems = _read([Path(p) for p in source["path"]])
    else:
        rows, problems = _read(source)
    records = []
    for _, row in rows:
        for index, epoch in enumerate(row.history):
            record: dict[str, Any] = {
                "run_id": row.run_id, "method": row.method, "label": row.label, "dataset": row.dataset,
                "task": row.task, "seed": row.seed,
                "epoch": epoch.get("epoch", index) if isinstance(epoch, Mapping) else index,
            }
            if isinstance(epoch, Mapping):
                _flatten("", {k: v for k, v in epoch.items() if k != "epoch"}, record)
            records.append({k: math.nan if v is None else v for k, v in record.items()})
    return _frame(records, problems, [*_ORDER, "epoch"])
