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
matrix``), exactly the plan's cells; without one, every (label, dataset) pair seen in the rows. A
row whose run id the plan lists is shown under the plan's label (a variant's name, grid values).

Comparisons (:mod:`mmbalance.table_stats` states each rule): the best mean of a column is bold and
the second best underlined (LaTeX) or italic (GitHub), among the multimodal rows; ``‡`` marks a
cell below the best ``unimodal[...]`` row of its column; a method identical to joint in every run
is labelled ``(≡ joint)``; ``delta=True`` adds after every metric column a ``Δ`` column (row minus
joint over the paired seeds) where ``†`` marks a difference a paired t-test across seeds does not
find significant (p >= 0.05). The caption names the convention of every column (MOSI Acc-2 / F1:
MMSA has-0 / non-0 or the CGGM code's; Dice: CGGM's smoothed Dice or MONAI's ``ignore_empty``).

A GitHub table wider than ``max_width`` characters is split into one table per dataset.

Cost table: step-time ratio (method's median step / joint's, measured side by side) and memory
overhead in MiB (2**20 bytes), with the device(s) in the caption.

``layout="paper"`` renders one table per dataset, listing the methods that dataset has (planned
or with rows), with the paper's columns: UPMC Food-101 (Acc, F1), CMU-MOSI / MOSEI (Acc-2, Acc-7,
F1, MAE, Corr), IEMOCAP (Acc, F1), BraTS 2021 (WT, TC, ET, Avg). F1 is the weighted F1 (the CGGM
code's ``average='weighted'``); MOSI's Acc-2 / F1 follow the CGGM code (``acc2_cggm``,
``f1_cggm``: zero labels negative, F1 weighted by predicted counts), so they compare with the
paper's numbers; Dice is CGGM's (a region empty in both prediction and truth counts as 1). Other
datasets get their default columns. CSV is a tidy long table for further analysis: one line per
cell and metric, every metric the rows report (loss and per-modality ``score/<m>`` included) unless
``metrics`` says otherwise.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from mmbalance.results import Plan, ResultRow, Stat, aggregate, aggregate_cost, config_conflicts
from mmbalance.table_csv import csv_table
from mmbalance.table_grid import (
    COST_COLUMNS,
    DEFAULT_MAX_WIDTH,
    DEFAULT_METRICS,
    FORMATS,
    LAYOUTS,
    LEGEND,
    MARK_NA,
    METRIC_NOTES,
    PAPER_TABLES,
    SPLITS,
    TASK_METRICS,
    Grid,
    build_grid,
    cell_mark,
    check,
    check_width,
    columns_for,
    devices,
    direction,
    metric_scale,
    order_labels,
    present_metrics,
    validate_metrics,
)
from mmbalance.table_render import STYLES, Style, format_stat, render_table
from mmbalance.table_stats import (
    below_single_modality,
    identical_to_joint,
    is_joint,
    joint_of,
    paired_delta,
    rank_marks,
    seed_values,
)

__all__ = [
    "FORMATS",
    "LAYOUTS",
    "SPLITS",
    "DEFAULT_METRICS",
    "TASK_METRICS",
    "PAPER_TABLES",
    "METRIC_NOTES",
    "DEFAULT_MAX_WIDTH",
    "metric_table",
    "cost_table",
    "render_tables",
    "order_labels",
]


# -- metric tables ---------------------------------------------------------------------------------
@dataclass
class _Column:
    dataset: str
    metric: str
    header: str  # plain text, without the arrow


@dataclass
class _Context:
    """Everything the metric tables of one call need, computed once."""

    grid: Grid
    stats: Mapping[tuple[str, str, str], Stat]
    seeds: Mapping[tuple[str, str, str], Mapping[int, float]]
    style: Style
    marks: bool
    delta: bool
    identical: set[str]
    used: set[str] = field(default_factory=set)  # the marks that appear, for the caption


def _no_value(grid: Grid, label: str, dataset: str) -> str:
    cell = grid.cell(label, dataset)
    return MARK_NA if cell.ok else cell_mark(cell)


def _delta_cell(ctx: _Context, label: str, col: _Column, scale: float, decimals: int) -> str:
    if is_joint(label):
        return ""
    joint = ctx.seeds.get((joint_of(label, ctx.grid.labels), col.dataset, col.metric), {})
    delta = paired_delta(ctx.seeds.get((label, col.dataset, col.metric), {}), joint)
    if delta is None:
        return MARK_NA
    ctx.used.add("delta")
    text = ctx.style.signed(delta.diff * scale, decimals)
    if not delta.significant:
        text += ctx.style.dagger
    return text


def _column_cells(ctx: _Context, col: _Column, labels: Sequence[str]) -> list[list[str]]:
    """The cells of one metric column (and of its Δ column), one list per label."""
    scale, decimals = metric_scale(col.metric)
    higher = direction(col.metric)
    stats = {lb: ctx.stats.get((lb, col.dataset, col.metric)) for lb in labels}
    means = {lb: st.mean for lb, st in stats.items() if st is not None}
    ranks: Mapping[str, int] = {}
    below: set[str] = set()
    if ctx.marks and higher is not None:
        ranks = rank_marks(means, higher, scale, decimals)
        below = below_single_modality(means, higher, scale, decimals)
        ctx.used |= {"ranks"} if ranks else set()
        ctx.used |= {"below"} if below else set()
    out = []
    for lb in labels:
        stat = stats[lb]
        if stat is None:
            out.append([_no_value(ctx.grid, lb, col.dataset)] + ([""] if ctx.delta else []))
            continue
        text = format_stat(stat, scale=scale, decimals=decimals, style=ctx.style)
        if lb in ranks:
            text = ctx.style.best(text) if ranks[lb] == 1 else ctx.style.second(text)
        out.append([text + (ctx.style.ddagger if lb in below else "")])
        if ctx.delta:
            out[-1].append(_delta_cell(ctx, lb, col, scale, decimals))
    return out


def _metric_grid(
    ctx: _Context, columns: Sequence[_Column], labels: Sequence[str]
) -> tuple[list[str], list[list[str]]]:
    """Header and body of one metric table."""
    style = ctx.style
    header = ["method"]
    for col in columns:
        header.append(style.text(col.header) + style.arrow(direction(col.metric)))
        if ctx.delta:
            header.append(style.delta)
    shown = [lb for lb in labels if lb in ctx.identical]
    ctx.used |= {"identical"} if shown else set()
    body = [[style.text(lb) + (f" ({style.equiv} joint)" if lb in shown else "")] for lb in labels]
    for col in columns:
        for line, cells in zip(body, _column_cells(ctx, col, labels), strict=True):
            line.extend(cells)
    return header, body


def _metric_caption(ctx: _Context, split: str, columns: Sequence[_Column], title: str | None = None) -> str:
    s = ctx.style
    what = "Test" if split == "test" else "Validation"
    head = f"{s.text(title)}: {what.lower()}" if title else what
    parts = [
        f"{head} metrics at the best-validation epoch, mean {s.pm} std over seeds (n); {s.up} higher / "
        f"{s.down} lower is better; accuracy, F1 and Dice in {s.text('%')}."
    ]
    if "ranks" in ctx.used:
        parts.append(
            f"Best mean of a column in bold, second best {s.second_word}, among the multimodal rows "
            "(equal as displayed, equal mark)."
        )
    if "below" in ctx.used:
        parts.append(f"{s.ddagger} below the best single-modality (unimodal) row of its column.")
    if "identical" in ctx.used:
        parts.append(f"({s.equiv} joint): the same metrics as joint for every seed of every dataset.")
    if "delta" in ctx.used:
        parts.append(
            f"{s.delta}: the column to its left minus joint, mean over the seeds both have; {s.dagger} not "
            f"significant (two-sided paired t-test across seeds, {s.text('p >= 0.05')}, or under 2 pairs)."
        )
    notes: dict[str, list[str]] = {}  # note -> the headers it explains
    for col in columns:
        if col.metric in METRIC_NOTES and col.header not in notes.get(METRIC_NOTES[col.metric], []):
            notes.setdefault(METRIC_NOTES[col.metric], []).append(col.header)
    if notes:
        named = (f"{s.text(', '.join(headers))}: {s.text(note)}" for note, headers in notes.items())
        parts.append("Columns: " + "; ".join(named) + ".")
    parts.append(f"{LEGEND}.")
    ctx.used.clear()
    return " ".join(parts)


def _labels_of(grid: Grid, dataset: str) -> list[str]:
    """The labels a per-dataset table lists: those planned for, or seen on, the dataset."""
    return [lb for lb in grid.labels if (lb, dataset) in grid.cells]


def _fit(whole: str, caption: str, parts: Sequence[tuple[str, str]], max_width: int | None) -> str:
    """``whole``, or the caption then one titled table per dataset when a line is too wide."""
    if not max_width or len(parts) < 2 or max(map(len, whole.splitlines())) <= max_width:
        return whole
    return "\n\n".join([caption, *(f"**{title}**\n\n{table}" for title, table in parts)])


def _dataset_columns(
    grid: Grid, split: str, layout: str, metrics: Sequence[str] | None
) -> list[tuple[str, str, list[_Column]]]:
    """``(dataset, title, columns)`` per dataset; paper columns where the paper has a table."""
    out = []
    for d in grid.datasets:
        if layout == "paper" and d in PAPER_TABLES and metrics is None:
            title, named = PAPER_TABLES[d]
            out.append((d, f"{title} ({d})", [_Column(d, m, name) for name, m in named]))
        else:
            chosen = columns_for(d, grid.tasks.get(d), metrics, present_metrics(grid, d, split))
            out.append((d, d, [_Column(d, m, m) for m in chosen]))
    return out


def metric_table(
    rows: Sequence[ResultRow],
    *,
    plan: Plan | None = None,
    fmt: str = "github",
    split: str = "test",
    layout: str = "default",
    metrics: Sequence[str] | None = None,
    delta: bool = False,
    marks: bool = True,
    max_width: int | None = DEFAULT_MAX_WIDTH,
) -> str:
    """The metric table(s) as text (``fmt`` "github" or "latex"; CSV: :func:`render_tables`).

    Args:
        delta: add a Δ-vs-joint column after every metric column, with the paired t-test mark.
        marks: best / second best, below-single-modality and identical-to-joint marks.
        max_width: GitHub, default layout: one table per dataset when a line of the single table
            would be longer than this; 0 or None never splits.

    Raises:
        ConfigError: unknown ``fmt``, ``split``, ``layout`` or metric name, or a bad ``max_width``.
    """
    check("format", fmt, ("github", "latex"))
    check("split", split, SPLITS)
    check("layout", layout, LAYOUTS)
    check_width(max_width)
    rows = plan.relabel(rows) if plan else rows
    validate_metrics(metrics, rows, split)
    grid = build_grid(rows, plan)
    identical = identical_to_joint(rows, split) if marks else set()
    stats, seeds = aggregate(rows, split), seed_values(rows, split)
    ctx = _Context(grid, stats, seeds, STYLES[fmt], marks, delta, identical)
    per_dataset = _dataset_columns(grid, split, layout, metrics)
    if layout == "paper":
        parts = []
        for d, title, columns in per_dataset:
            header, body = _metric_grid(ctx, columns, _labels_of(grid, d))
            parts.append(render_table(header, body, ctx.style, _metric_caption(ctx, split, columns, title)))
        return "\n\n".join(parts)
    per_dataset = [entry for entry in per_dataset if entry[2]]
    columns = [c for _, _, cols in per_dataset for c in cols]
    if fmt == "latex":  # metric names under a spanning line of dataset names
        header, body = _metric_grid(ctx, columns, grid.labels)
        groups = [(ctx.style.text(d), len(cols) * (2 if delta else 1)) for d, _, cols in per_dataset]
        return render_table(header, body, ctx.style, _metric_caption(ctx, split, columns), groups)
    prefixed = [_Column(c.dataset, c.metric, f"{c.dataset} {c.metric}") for c in columns]
    header, body = _metric_grid(ctx, prefixed, grid.labels)
    caption = _metric_caption(ctx, split, columns)
    whole = render_table(header, body, ctx.style, caption)
    parts = []
    for d, _, cols in per_dataset:
        h, b = _metric_grid(ctx, cols, _labels_of(grid, d))
        ctx.used.clear()
        parts.append((d, render_table(h, b, ctx.style, "").lstrip("\n")))
    return _fit(whole, caption, parts, max_width)


# -- cost ------------------------------------------------------------------------------------------
def _cost_caption(rows: Sequence[ResultRow], style: Style) -> str:
    where = "; ".join(devices(rows)) or "no finished runs"
    if len(devices(rows)) > 1:
        where = f"MIXED devices ({where}): ratios are per run, absolute numbers do not compare"
    text = style.text(
        f"Cost against joint, measured side by side in one process on the same batches, on {where}. "
        "Step-time ratio = method's median step time / joint's; memory overhead in MiB "
        "(1 MiB = 1,048,576 bytes) = CUDA peak allocated minus joint's (on CPU: the method's own "
        f"parameters, gradients, buffers and optimizer state); mean PLUSMINUS std over seeds (n). {LEGEND}."
    )
    return text.replace("PLUSMINUS", style.pm)


def _cost_grid(
    grid: Grid,
    stats: Mapping[tuple[str, str, str], Stat],
    datasets: Sequence[str],
    style: Style,
    prefix: bool,
) -> tuple[list[str], list[list[str]]]:
    header = ["method"]
    for d in datasets:
        for name, *_ in COST_COLUMNS:
            header.append(style.text(f"{d} {name}" if prefix else name) + style.arrow(False))
    body = []
    for lb in grid.labels if len(datasets) > 1 else _labels_of(grid, datasets[0]):
        line = [style.text(lb)]
        for d in datasets:
            for _, key, scale, decimals in COST_COLUMNS:
                stat = stats.get((lb, d, key))
                if stat is None:
                    line.append(_no_value(grid, lb, d))
                else:
                    line.append(format_stat(stat, scale=scale, decimals=decimals, style=style))
        body.append(line)
    return header, body


def cost_table(
    rows: Sequence[ResultRow],
    *,
    plan: Plan | None = None,
    fmt: str = "github",
    max_width: int | None = DEFAULT_MAX_WIDTH,
) -> str:
    """Step-time ratio and memory overhead (MiB) per (label, dataset), device in the caption; one
    GitHub table per dataset when wider than ``max_width`` (as :func:`metric_table`)."""
    check("format", fmt, ("github", "latex"))
    check_width(max_width)
    style = STYLES[fmt]
    rows = plan.relabel(rows) if plan else rows
    grid = build_grid(rows, plan)
    stats = aggregate_cost(rows)
    caption = _cost_caption(rows, style)
    if fmt == "latex":
        header, body = _cost_grid(grid, stats, grid.datasets, style, prefix=False)
        groups = [(style.text(d), len(COST_COLUMNS)) for d in grid.datasets]
        return render_table(header, body, style, caption, groups)
    whole = render_table(*_cost_grid(grid, stats, grid.datasets, style, prefix=True), style, caption)
    parts = [
        (d, render_table(*_cost_grid(grid, stats, [d], style, prefix=False), style, "").lstrip("\n"))
        for d in grid.datasets
    ]
    return _fit(whole, caption, parts, max_width)


# -- the whole output ------------------------------------------------------------------------------
def _notes(rows: Sequence[ResultRow], fmt: str) -> list[str]:
    def with_status(status: str) -> list[ResultRow]:
        return sorted((r for r in rows if r.status == status), key=lambda r: (r.label, r.dataset, r.seed))

    notes = []
    for row in with_status("failed"):
        err = row.error or {}
        message = str(err.get("message", "")).strip().splitlines()
        first = message[0] if message else ""
        where = f"{row.label} on {row.dataset}, seed {row.seed} (run {row.run_id})"
        notes.append(f"x {where}: {err.get('type', '?')}: {first}")
    for row in with_status("diverged"):
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
    delta: bool = False,
    marks: bool = True,
    max_width: int | None = DEFAULT_MAX_WIDTH,
) -> str:
    """Metric table(s), then the cost table, then notes (failed runs, mixed configurations).

    ``fmt="csv"`` gives one tidy CSV with both metric and cost lines instead (``delta``, ``marks``
    and ``max_width`` do not apply to it). Options as in :func:`metric_table`.
    """
    check("format", fmt, FORMATS)
    check("split", split, SPLITS)
    check("layout", layout, LAYOUTS)
    rows = plan.relabel(rows) if plan else rows
    if fmt == "csv":
        return csv_table(rows, plan, split, metrics)
    parts = [
        metric_table(
            rows, plan=plan, fmt=fmt, split=split, layout=layout, metrics=metrics,
            delta=delta, marks=marks, max_width=max_width,
        )
    ]
    if cost:
        parts.append(cost_table(rows, plan=plan, fmt=fmt, max_width=max_width))
    notes = _notes(rows, fmt)
    if notes:
        parts.append("\n".join(notes))
    return "\n\n".join(parts) + "\n"
