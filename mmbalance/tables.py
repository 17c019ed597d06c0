"""Paper-style tables of result rows: task metrics and cost, as GitHub markdown, LaTeX or CSV.

Metric table: one row per method label, ``joint`` first, then the ``unimodal[...]`` rows, then the
other methods in matrix order (alphabetical when the folder holds no matrix plan). Columns are
dataset x metric with an arrow from :data:`mmbalance.tasks.METRIC_HIGHER_IS_BETTER` (↑ higher is
better, ↓ lower). A cell is ``mean ± std (n)`` over the seeds of its ``ok`` rows (sample std,
ddof=1; with one seed the std is left out: ``mean (1)``). Accuracies, F1 and Dice are shown in %,
MAE and Corr as they are. Marks for a cell without a finished run:

* ``-``   unsupported (the method does not declare the dataset's task or modality count), or not
          part of the matrix (e.g. ``unimodal[audio]`` on a dataset without audio);
* ``x``   failed (``mmbalance show RUN_ID`` gives the error; the notes under the table list them);
* ``div`` diverged (the loss exploded or became NaN; the notes under the table give the step);
* ``...`` missing: expected but not (yet) there.

Which cells are expected: with a matrix plan in the folder (``_matrix/``, written by ``mmbalance
matrix``), exactly the plan's cells; without one, every (label, dataset) pair seen in the rows.

Cost table: step-time ratio (method's median step / joint's, measured side by side) and memory
overhead in MiB (2**20 bytes), with the device(s) in the caption.

``layout="paper"`` renders one table per dataset, listing the methods that dataset has (planned
or with rows), with the paper's columns: UPMC Food-101 (Acc, F1),
CMU-MOSI / MOSEI (Acc-2, Acc-7, F1, MAE, Corr), IEMOCAP (Acc, F1), BraTS 2021 (WT, TC, ET, Avg).
F1 is the weighted F1 (the CGGM code's ``average='weighted'``); MOSI's Acc-2 / F1 are the "has0"
variants (every sample, as the CGGM code's accuracy counts zero labels). Other datasets get their
default columns. CSV is a tidy long table for further analysis: one line per cell and metric, every
metric the rows report (loss and per-modality ``score/<m>`` included) unless ``metrics`` says otherwise.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from tabulate import tabulate

from mmbalance.errors import ConfigError
from mmbalance.results import Plan, ResultRow, Stat, aggregate, aggregate_cost, config_conflicts
from mmbalance.tasks import METRIC_HIGHER_IS_BETTER

__all__ = [
    "FORMATS",
    "LAYOUTS",
    "SPLITS",
    "DEFAULT_METRICS",
    "TASK_METRICS",
    "PAPER_TABLES",
    "metric_table",
    "cost_table",
    "render_tables",
    "order_labels",
]

FORMATS = ("github", "latex", "csv")
LAYOUTS = ("default", "paper")
SPLITS = ("test", "val")

# Columns of the default layout per task (``--metrics`` chooses others).
DEFAULT_METRICS: Mapping[str, tuple[str, ...]] = {
    "cls": ("acc", "f1_weighted"),
    "reg": ("mae", "corr", "acc2_has0"),
    "seg": ("dice_mean",),
}
# Every metric a task's suite reports (what ``--metrics`` may ask for, besides ``loss``).
TASK_METRICS: Mapping[str, tuple[str, ...]] = {
    "cls": ("acc", "f1_macro", "f1_weighted"),
    "reg": ("mae", "corr", "acc2_has0", "acc2_non0", "f1_has0", "f1_non0", "acc7"),
    "seg": ("dice_wt", "dice_tc", "dice_et", "dice_mean"),
}
_MOSI_COLUMNS = (("Acc-2", "acc2_has0"), ("Acc-7", "acc7"), ("F1", "f1_has0"), ("MAE", "mae"), ("Corr", "corr"))
# dataset name -> (title, ((column header, metric key), ...)), the paper's tables.
PAPER_TABLES: Mapping[str, tuple[str, tuple[tuple[str, str], ...]]] = {
    "food101": ("UPMC Food-101", (("Acc", "acc"), ("F1", "f1_weighted"))),
    "mosi": ("CMU-MOSI", _MOSI_COLUMNS),
    "mosei": ("CMU-MOSEI", _MOSI_COLUMNS),
    "iemocap": ("IEMOCAP", (("Acc", "acc"), ("F1", "f1_weighted"))),
    "brats2021": ("BraTS 2021", (("WT", "dice_wt"), ("TC", "dice_tc"), ("ET", "dice_et"), ("Avg", "dice_mean"))),
}
_PERCENT = frozenset(m for task in TASK_METRICS.values() for m in task if m not in ("mae", "corr"))
_MIB = float(2**20)
MARK_UNSUPPORTED, MARK_FAILED, MARK_MISSING, MARK_NA = "-", "x", "...", "n/a"
MARK_DIVERGED = "div"
_LEGEND = "Marks: - unsupported, x failed, ... missing"  # div (diverged) is explained by its note


# -- the grid: which cells exist and what is in them -----------------------------------------------
@dataclass
class _Cell:
    ok: list[ResultRow] = field(default_factory=list)
    failed: list[ResultRow] = field(default_factory=list)
    diverged: list[ResultRow] = field(default_factory=list)
    unsupported: bool = False
    expected: bool = False


@dataclass
class _Grid:
    labels: list[str]
    datasets: list[str]
    tasks: dict[str, str]
    cells: dict[tuple[str, str], _Cell]

    def cell(self, label: str, dataset: str) -> _Cell:
        return self.cells.get((label, dataset)) or _Cell()


def _label_group(label: str) -> int:
    method = label.split("[", 1)[0]
    return 0 if method == "joint" else 1 if method == "unimodal" else 2


def order_labels(labels: Sequence[str], matrix_order: Sequence[str] = ()) -> list[str]:
    """``joint`` first, then ``unimodal[...]``, then the rest; within a group matrix order, then
    alphabetical for labels the matrix does not list."""
    index = {label: i for i, label in enumerate(matrix_order)}
    return sorted(
        dict.fromkeys(labels),
        key=lambda lb: (_label_group(lb), 0 if lb in index else 1, index.get(lb, 0), lb),
    )


def _build_grid(rows: Sequence[ResultRow], plan: Plan | None) -> _Grid:
    plan = plan or Plan()
    cells: dict[tuple[str, str], _Cell] = {}
    tasks: dict[str, str] = {}
    for pc in plan.cells:
        cell = cells.setdefault((pc.label, pc.dataset), _Cell())
        cell.expected = True
        cell.unsupported = cell.unsupported or pc.unsupported
        tasks.setdefault(pc.dataset, pc.task)
    for row in rows:
        cell = cells.setdefault((row.label, row.dataset), _Cell())
        tasks.setdefault(row.dataset, row.task)
        if row.status == "ok":
            cell.ok.append(row)
        elif row.status == "failed":
            cell.failed.append(row)
        elif row.status == "diverged":
            cell.diverged.append(row)
        else:
            cell.unsupported = True
    labels = order_labels([lb for lb, _ in cells], plan.labels)
    datasets = list(dict.fromkeys([*plan.datasets, *sorted({d for _, d in cells})]))
    if not plan:  # without a plan every pair seen in the rows is expected
        for lb in labels:
            for d in datasets:
                cells.setdefault((lb, d), _Cell()).expected = True
    return _Grid(labels, datasets, tasks, cells)


def _mark(cell: _Cell) -> str:
    if cell.unsupported:
        return MARK_UNSUPPORTED
    if cell.failed:
        return MARK_FAILED
    if cell.diverged:
        return MARK_DIVERGED
    return MARK_MISSING if cell.expected else MARK_UNSUPPORTED


# -- formatting ------------------------------------------------------------------------------------
def _arrow(metric: str, fmt: str) -> str:
    if metric.startswith("score/"):  # per-modality task score: higher is better by contract
        up = True
    elif metric in METRIC_HIGHER_IS_BETTER:
        up = METRIC_HIGHER_IS_BETTER[metric]
    else:
        return ""
    if fmt == "latex":
        return r" $\uparrow$" if up else r" $\downarrow$"
    return " ↑" if up else " ↓"


def _num(value: float, decimals: int) -> str:
    return "nan" if math.isnan(value) else f"{value:.{decimals}f}"


def _format_stat(stat: Stat, *, scale: float, decimals: int, fmt: str) -> str:
    pm = r" $\pm$ " if fmt == "latex" else " ± "
    text = _num(stat.mean * scale, decimals)
    if stat.std is not None:
        text += pm + _num(stat.std * scale, decimals)
    return f"{text} ({stat.n})"


def _metric_scale(metric: str) -> tuple[float, int]:
    return (100.0, 2) if metric in _PERCENT else (1.0, 3)


def _latex_escape(text: str) -> str:
    """Escape LaTeX specials outside ``$...$`` math spans (cells carry ``$\\pm$``, headers arrows)."""
    parts = text.split("$")
    for i in range(0, len(parts), 2):  # even parts are text, odd parts are math
        out = parts[i]
        for ch, rep in (("\\", r"\textbackslash{}"), ("&", r"\&"), ("%", r"\%"), ("_", r"\_"), ("#", r"\#")):
            out = out.replace(ch, rep)
        parts[i] = out.replace("[", "{[}").replace("]", "{]}")
    return "$".join(parts)


def _tabulate(header: list[str], body: list[list[str]], fmt: str, caption: str) -> str:
    align = ("left",) + ("right",) * (len(header) - 1)
    if fmt == "latex":
        for sym, tex in (("±", r"$\pm$"), ("↑", r"$\uparrow$"), ("↓", r"$\downarrow$")):
            caption = caption.replace(sym, tex)
        header = [_latex_escape(h) for h in header]
        body = [[_latex_escape(c) for c in r] for r in body]
        tab = tabulate(body, headers=header, tablefmt="latex_raw", disable_numparse=True, colalign=align)
        return "\n".join(["\\begin{table}[t]", "\\centering", f"\\caption{{{_latex_escape(caption)}}}", tab, "\\end{table}"])
    tab = tabulate(body, headers=header, tablefmt="github", disable_numparse=True, colalign=align)
    return f"{caption}\n\n{tab}"


def _check(name: str, value: str, allowed: Sequence[str]) -> None:
    if value not in allowed:
        raise ConfigError(f"{name} must be one of {', '.join(allowed)}; got {value!r}")


def _columns_for(dataset: str, task: str | None, metrics: Sequence[str] | None, present: set[str]) -> list[str]:
    if metrics is None:
        return list(DEFAULT_METRICS.get(task or "", ())) or sorted(present)
    allowed = set(TASK_METRICS.get(task or "", ())) | {"loss"} | present
    return [m for m in metrics if m in allowed]


def _present_metrics(grid: _Grid, dataset: str, split: str) -> set[str]:
    out: set[str] = set()
    for lb in grid.labels:
        for row in grid.cell(lb, dataset).ok:
            out.update((row.metrics.get(split) or {}).keys())
    return out


def _validate_metrics(metrics: Sequence[str] | None, rows: Sequence[ResultRow], split: str) -> None:
    if metrics is None:
        return
    if not metrics:
        raise ConfigError("metrics must name at least one metric; got an empty list")
    known = set(METRIC_HIGHER_IS_BETTER)
    for row in rows:
        if row.status == "ok":
            known.update((row.metrics.get(split) or {}).keys())
    unknown = [m for m in metrics if m not in known]
    if unknown:
        raise ConfigError(f"unknown metric(s) {', '.join(map(repr, unknown))} for --metrics; known: {', '.join(sorted(known))}")


# -- tables ----------------------------------------------------------------------------------------
def _metric_body(
    grid: _Grid,
    stats: Mapping[tuple[str, str, str], Stat],
    columns: Sequence[tuple[str, str]],
    fmt: str,
    labels: Sequence[str] | None = None,
) -> list[list[str]]:
    body = []
    for lb in grid.labels if labels is None else labels:
        line = [lb]
        for dataset, metric in columns:
            cell = grid.cell(lb, dataset)
            stat = stats.get((lb, dataset, metric))
            if stat is not None:
                scale, decimals = _metric_scale(metric)
                line.append(_format_stat(stat, scale=scale, decimals=decimals, fmt=fmt))
            elif cell.ok:
                line.append(MARK_NA)
            else:
                line.append(_mark(cell))
        body.append(line)
    return body


def _metric_caption(split: str, title: str | None = None) -> str:
    what = "Test" if split == "test" else "Validation"
    head = f"{title}: {what.lower()}" if title else what
    return (
        f"{head} metrics at the best-validation epoch, mean ± std over seeds (n); ↑ higher / ↓ lower is "
        f"better; accuracy, F1 and Dice in %. {_LEGEND}."
    )


def metric_table(
    rows: Sequence[ResultRow],
    *,
    plan: Plan | None = None,
    fmt: str = "github",
    split: str = "test",
    layout: str = "default",
    metrics: Sequence[str] | None = None,
) -> str:
    """The metric table(s) as text (``fmt`` "github" or "latex"; CSV: :func:`render_tables`).

    Raises:
        ConfigError: unknown ``fmt``, ``split``, ``layout`` or metric name.
    """
    _check("format", fmt, ("github", "latex"))
    _check("split", split, SPLITS)
    _check("layout", layout, LAYOUTS)
    _validate_metrics(metrics, rows, split)
    grid = _build_grid(rows, plan)
    stats = aggregate(rows, split)
    if layout == "default":
        columns: list[tuple[str, str]] = []
        header = ["method"]
        for d in grid.datasets:
            for m in _columns_for(d, grid.tasks.get(d), metrics, _present_metrics(grid, d, split)):
                columns.append((d, m))
                header.append(f"{d} {m}{_arrow(m, fmt)}")
        return _tabulate(header, _metric_body(grid, stats, columns, fmt), fmt, _metric_caption(split))
    parts = []
    for d in grid.datasets:
        if d in PAPER_TABLES and metrics is None:
            title, named = PAPER_TABLES[d]
            title = f"{title} ({d})"
        else:
            title = d
            named = tuple((m, m) for m in _columns_for(d, grid.tasks.get(d), metrics, _present_metrics(grid, d, split)))
        header = ["method", *(f"{name}{_arrow(m, fmt)}" for name, m in named)]
        labels = [lb for lb in grid.labels if (lb, d) in grid.cells]  # only the methods this dataset has
        body = _metric_body(grid, stats, [(d, m) for _, m in named], fmt, labels)
        parts.append(_tabulate(header, body, fmt, _metric_caption(split, title)))
    return "\n\n".join(parts)


def _devices(rows: Sequence[ResultRow]) -> list[str]:
    return sorted({r.device for r in rows if r.status == "ok" and r.device})


def _cost_caption(rows: Sequence[ResultRow]) -> str:
    devices = _devices(rows)
    where = "; ".join(devices) if devices else "no finished runs"
    if len(devices) > 1:
        where = f"MIXED devices ({where}): ratios are per run, absolute numbers do not compare"
    return (
        f"Cost against joint, measured side by side in one process on the same batches, on {where}. "
        "Step-time ratio = method's median step time / joint's; memory overhead in MiB = CUDA peak "
        "allocated minus joint's (on CPU: the method's own parameters, gradients, buffers and "
        f"optimizer state); mean ± std over seeds (n). {_LEGEND}."
    )


_COST_COLUMNS = (("step-time ratio", "step_time_ratio", 1.0, 2), ("mem MiB", "mem_overhead_bytes", 1.0 / _MIB, 2))


def cost_table(rows: Sequence[ResultRow], *, plan: Plan | None = None, fmt: str = "github") -> str:
    """Step-time ratio and memory overhead per (label, dataset), device in the caption."""
    _check("format", fmt, ("github", "latex"))
    grid = _build_grid(rows, plan)
    stats = aggregate_cost(rows)
    down = r" $\downarrow$" if fmt == "latex" else " ↓"
    header = ["method"]
    for d in grid.datasets:
        header += [f"{d} {name}{down}" for name, *_ in _COST_COLUMNS]
    body = []
    for lb in grid.labels:
        line = [lb]
        for d in grid.datasets:
            cell = grid.cell(lb, d)
            for _, key, scale, decimals in _COST_COLUMNS:
                stat = stats.get((lb, d, key))
                if stat is not None:
                    line.append(_format_stat(stat, scale=scale, decimals=decimals, fmt=fmt))
                else:
                    line.append(MARK_NA if cell.ok else _mark(cell))
        body.append(line)
    return _tabulate(header, body, fmt, _cost_caption(rows))


def _csv_table(rows: Sequence[ResultRow], plan: Plan | None, split: str, metrics: Sequence[str] | None) -> str:
    _validate_metrics(metrics, rows, split)
    grid = _build_grid(rows, plan)
    stats = aggregate(rows, split)
    cost = aggregate_cost(rows)
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["table", "split", "method", "dataset", "metric", "higher_is_better", "mean", "std", "n", "mark", "device"])

    def num(v: float | None) -> str:
        return "" if v is None else repr(float(v))

    for d in grid.datasets:
        present = _present_metrics(grid, d, split)
        if metrics is None:  # every metric the rows report, the task's suite first
            known = TASK_METRICS.get(grid.tasks.get(d) or "", ())
            columns = [m for m in known if m in present or not present] + sorted(present - set(known))
        else:
            columns = _columns_for(d, grid.tasks.get(d), metrics, present)
        for lb in grid.labels:
            cell = grid.cell(lb, d)
            device = ";".join(_devices(cell.ok))
            for m in columns:
                stat = stats.get((lb, d, m))
                hib = METRIC_HIGHER_IS_BETTER.get(m)
                mark = "" if stat else (MARK_NA if cell.ok else _mark(cell))
                writer.writerow(
                    ["metric", split, lb, d, m, "" if hib is None else str(hib).lower(),
                     num(stat.mean) if stat else "", num(stat.std) if stat else "", stat.n if stat else "", mark, device]
                )
            for _, key, _, _ in _COST_COLUMNS:
                stat = cost.get((lb, d, key))
                mark = "" if stat else (MARK_NA if cell.ok else _mark(cell))
                writer.writerow(
                    ["cost", "", lb, d, key, "false",
                     num(stat.mean) if stat else "", num(stat.std) if stat else "", stat.n if stat else "", mark, device]
                )
    return buf.getvalue()


def _notes(rows: Sequence[ResultRow], fmt: str) -> list[str]:
    notes = []
    for row in sorted((r for r in rows if r.status == "failed"), key=lambda r: (r.label, r.dataset, r.seed)):
        err = row.error or {}
        message = str(err.get("message", "")).strip().splitlines()
        first = message[0] if message else ""
        notes.append(f"x {row.label} on {row.dataset}, seed {row.seed} (run {row.run_id}): {err.get('type', '?')}: {first}")
    diverged = sorted((r for r in rows if r.status == "diverged"), key=lambda r: (r.label, r.dataset, r.seed))
    for row in diverged:
        reason = str((row.data.get("divergence") or {}).get("reason", "")).strip()
        where = f"{row.label} on {row.dataset}, seed {row.seed} (run {row.run_id})"
        notes.append(f"div {where}: diverged: {reason}")
    notes += [f"warning: {c}" for c in config_conflicts(rows)]
    if fmt == "latex":
        return [f"% {n}" for n in notes]
    return notes


def render_tables(
    rows: Sequence[ResultRow],
    *,
    plan: Plan | None = None,
    fmt: str = "github",
    split: str = "test",
    layout: str = "default",
    metrics: Sequence[str] | None = None,
    cost: bool = True,
) -> str:
    """Metric table(s), then the cost table, then notes (failed runs, mixed configurations).

    ``fmt="csv"`` gives one tidy CSV with both metric and cost lines instead.
    """
    _check("format", fmt, FORMATS)
    _check("split", split, SPLITS)
    _check("layout", layout, LAYOUTS)
    if fmt == "csv":
        return _csv_table(rows, plan, split, metrics)
    parts = [metric_table(rows, plan=plan, fmt=fmt, split=split, layout=layout, metrics=metrics)]
    if cost:
        parts.append(cost_table(rows, plan=plan, fmt=fmt))
    notes = _notes(rows, fmt)
    if notes:
        parts.append("\n".join(notes))
    return "\n\n".join(parts) + "\n"
