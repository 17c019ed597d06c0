"""The tidy CSV of a results folder: one line per (table, method, dataset, metric) for analysis."""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence

from mmbalance.results import Plan, ResultRow, Stat, aggregate, aggregate_cost
from mmbalance.table_grid import (
    COST_COLUMNS,
    MARK_NA,
    TASK_METRICS,
    build_grid,
    cell_mark,
    columns_for,
    devices,
    higher_is_better,
    present_metrics,
    validate_metrics,
)

__all__ = ["csv_table", "HEADER"]

HEADER = (
    "table", "split", "method", "dataset", "metric", "higher_is_better", "mean", "std", "n", "mark", "device",
)


def csv_table(rows: Sequence[ResultRow], plan: Plan | None, split: str, metrics: Sequence[str] | None) -> str:
    """The tidy CSV text: metric lines of ``split`` and cost lines, per dataset and label."""
    validate_metrics(metrics, rows, split)
    grid = build_grid(rows, plan)
    stats = aggregate(rows, split)
    cost = aggregate_cost(rows)
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(HEADER)

    def num(v: float | None) -> str:
        return "" if v is None else repr(float(v))

    def values(stat: Stat | None) -> list[str | int]:
        return [num(stat.mean), num(stat.std), stat.n] if stat else ["", "", ""]

    for d in grid.datasets:
        present = present_metrics(grid, d, split)
        if metrics is None:  # every metric the rows report, the task's suite first
            known = TASK_METRICS.get(grid.tasks.get(d) or "", ())
            columns = [m for m in known if m in present or not present] + sorted(present - set(known))
        else:
            columns = columns_for(d, grid.tasks.get(d), metrics, present)
        for lb in grid.labels:
            cell = grid.cell(lb, d)
            device = ";".join(devices(cell.ok))
            for m in columns:
                stat = stats.get((lb, d, m))
                hib = higher_is_better().get(m)
                mark = "" if stat else (MARK_NA if cell.ok else cell_mark(cell))
                higher = "" if hib is None else str(hib).lower()
                writer.writerow(["metric", split, lb, d, m, higher, *values(stat), mark, device])
            for _, key, _, _ in COST_COLUMNS:
                stat = cost.get((lb, d, key))
                mark = "" if stat else (MARK_NA if cell.ok else cell_mark(cell))
                writer.writerow(["cost", "", lb, d, key, "false", *values(stat), mark, device])
    return buf.getvalue()


