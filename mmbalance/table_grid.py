"""Which cells and columns a table has: the (label, dataset) grid of result rows and a matrix plan,
the metric columns of each task, their conventions and display scale. Shared by
:mod:`mmbalance.tables` (GitHub / LaTeX) and :mod:`mmbalance.table_csv`."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from mmbalance.errors import ConfigError
from mmbalance.results import Plan, ResultRow

__all__ = [
    "FORMATS",
    "LAYOUTS",
    "SPLITS",
    "DEFAULT_MAX_WIDTH",
    "DEFAULT_METRICS",
    "TASK_METRICS",
    "METRIC_NOTES",
    "PAPER_TABLES",
    "MARK_UNSUPPORTED",
    "MARK_FAILED",
    "MARK_MISSING",
    "MARK_NA",
    "MARK_DIVERGED",
    "LEGEND",
    "COST_COLUMNS",
    "Cell",
    "Grid",
    "build_grid",
    "cell_mark",
    "order_labels",
    "metric_scale",
    "direction",
    "check",
    "check_width",
    "columns_for",
    "present_metrics",
    "validate_metrics",
    "devices",
    "higher_is_better",
]

FORMATS = ("github", "latex", "csv")
LAYOUTS = ("default", "paper")
SPLITS = ("test", "val")
DEFAULT_MAX_WIDTH = 100  # characters of a GitHub table line before it is split per dataset

# Columns of the default layout per task (``--metrics`` chooses others).
DEFAULT_METRICS: Mapping[str, tuple[str, ...]] = {
    "cls": ("acc", "f1_weighted"),
    "reg": ("mae", "corr", "acc2_has0"),
    "seg": ("dice_mean", "dice_mean_monai"),
}
# Every metric a task's suite reports (what ``--metrics`` may ask for, besides ``loss``).
TASK_METRICS: Mapping[str, tuple[str, ...]] = {
    "cls": ("acc", "f1_macro", "f1_weighted"),
    "reg": ("mae", "corr", "acc2_has0", "acc2_non0", "acc2_cggm", "f1_has0", "f1_non0", "f1_cggm", "acc7"),
    "seg": (
        "dice_wt", "dice_tc", "dice_et", "dice_mean",
        "dice_wt_monai", "dice_tc_monai", "dice_et_monai", "dice_mean_monai",
    ),
}
_CGGM_DICE = "per-slice Dice of the CGGM code (eps 1e-3; a region empty in prediction and truth counts as 1)"
_MONAI_DICE = "MONAI DiceMetric, ignore_empty=True (no smoothing; slices with an empty truth region left out)"
# The convention of each metric, named in the captions.
METRIC_NOTES: Mapping[str, str] = {
    "acc": "accuracy",
    "f1_weighted": "F1 per class weighted by label support (sklearn average='weighted')",
    "f1_macro": "unweighted mean of the per-class F1",
    "mae": "mean absolute error",
    "corr": "Pearson r",
    "acc2_has0": "MMSA has-0: every sample, y >= 0 vs p >= 0",
    "f1_has0": "weighted F1 in MMSA's has-0 classes",
    "acc2_non0": "MMSA non-0: zero labels dropped, y > 0 vs p > 0",
    "f1_non0": "weighted F1 in MMSA's non-0 classes",
    "acc2_cggm": "CGGM code (eval_senti): every sample, zero labels negative, y > 0 vs p > 0",
    "f1_cggm": "CGGM code: f1_score(p > 0, y > 0, average='weighted'), weighted by predicted counts",
    "acc7": "7-class accuracy of the scores rounded after clipping to [-3, 3]",
    **{f"dice_{r}": _CGGM_DICE for r in ("wt", "tc", "et", "mean")},
    **{f"dice_{r}_monai": _MONAI_DICE + ", reduction='mean_batch'" for r in ("wt", "tc", "et")},
    "dice_mean_monai": _MONAI_DICE + ", reduction='mean'",
    "loss": "the task loss",
}
_MOSI_COLUMNS = (
    ("Acc-2", "acc2_cggm"), ("Acc-7", "acc7"), ("F1", "f1_cggm"), ("MAE", "mae"), ("Corr", "corr"),
)
_BRATS_COLUMNS = (("WT", "dice_wt"), ("TC", "dice_tc"), ("ET", "dice_et"), ("Avg", "dice_mean"))
# dataset name -> (title, ((column header, metric key), ...)), the paper's tables.
PAPER_TABLES: Mapping[str, tuple[str, tuple[tuple[str, str], ...]]] = {
    "food101": ("UPMC Food-101", (("Acc", "acc"), ("F1", "f1_weighted"))),
    "mosi": ("CMU-MOSI", _MOSI_COLUMNS),
    "mosei": ("CMU-MOSEI", _MOSI_COLUMNS),
    "iemocap": ("IEMOCAP", (("Acc", "acc"), ("F1", "f1_weighted"))),
    "brats2021": ("BraTS 2021", _BRATS_COLUMNS),
}
_PERCENT = frozenset(m for task in TASK_METRICS.values() for m in task if m not in ("mae", "corr"))
_MIB = float(2**20)
# The cost table's columns: (header, cost field, scale, decimals); memory in MiB (2**20 bytes).
COST_COLUMNS = (
    ("step-time ratio", "step_time_ratio", 1.0, 2),
    ("mem MiB", "mem_overhead_bytes", 1.0 / _MIB, 2),
)
MARK_UNSUPPORTED, MARK_FAILED, MARK_MISSING, MARK_NA = "-", "x", "...", "n/a"
MARK_DIVERGED = "div"
LEGEND = "Marks: - unsupported, x failed, ... missing"  # div (diverged) is explained by its note


def higher_is_better() -> Mapping[str, bool]:
    """:data:`mmbalance.tasks.METRIC_HIGHER_IS_BETTER`, imported on first use: the command line's
    option lists (which import this module) do not import torch."""
    from mmbalance.tasks import METRIC_HIGHER_IS_BETTER

    return METRIC_HIGHER_IS_BETTER


# -- the grid: which cells exist and what is in them -----------------------------------------------
@dataclass
class Cell:
    ok: list[ResultRow] = field(default_factory=list)
    failed: list[ResultRow] = field(default_factory=list)
    diverged: list[ResultRow] = field(default_factory=list)
    unsupported: bool = False
    expected: bool = False


@dataclass
class Grid:
    labels: list[str]
    datasets: list[str]
    tasks: dict[str, str]
    cells: dict[tuple[str, str], Cell]

    def cell(self, label: str, dataset: str) -> Cell:
        return self.cells.get((label, dataset)) or Cell()


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


def build_grid(rows: Sequence[ResultRow], plan: Plan | None) -> Grid:
    plan = plan or Plan()
    cells: dict[tuple[str, str], Cell] = {}
    tasks: dict[str, str] = {}
    for pc in plan.cells:
        cell = cells.setdefault((pc.label, pc.dataset), Cell())
        cell.expected = True
        cell.unsupported = cell.unsupported or pc.unsupported
        tasks.setdefault(pc.dataset, pc.task)
    for row in rows:
        cell = cells.setdefault((row.label, row.dataset), Cell())
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
                cells.setdefault((lb, d), Cell()).expected = True
    return Grid(labels, datasets, tasks, cells)


def cell_mark(cell: Cell) -> str:
    if cell.unsupported:
        return MARK_UNSUPPORTED
    if cell.failed:
        return MARK_FAILED
    if cell.diverged:
        return MARK_DIVERGED
    return MARK_MISSING if cell.expected else MARK_UNSUPPORTED


# -- columns -------------------------------------------------------------------------------------
def metric_scale(metric: str) -> tuple[float, int]:
    return (100.0, 2) if metric in _PERCENT else (1.0, 3)


def direction(metric: str) -> bool | None:
    if metric.startswith("score/"):  # per-modality task score: higher is better by contract
        return True
    return higher_is_better().get(metric)


def check(name: str, value: str, allowed: Sequence[str]) -> None:
    if value not in allowed:
        raise ConfigError(f"{name} must be one of {', '.join(allowed)}; got {value!r}")


def columns_for(
    dataset: str, task: str | None, metrics: Sequence[str] | None, present: set[str]
) -> list[str]:
    """The metric columns of ``dataset``: the task's defaults, or those of ``metrics`` it has."""
    if metrics is None:
        return list(DEFAULT_METRICS.get(task or "", ())) or sorted(present)
    allowed = set(TASK_METRICS.get(task or "", ())) | {"loss"} | present
    return [m for m in metrics if m in allowed]


def present_metrics(grid: Grid, dataset: str, split: str) -> set[str]:
    out: set[str] = set()
    for lb in grid.labels:
        for row in grid.cell(lb, dataset).ok:
            out.update((row.metrics.get(split) or {}).keys())
    return out


def validate_metrics(metrics: Sequence[str] | None, rows: Sequence[ResultRow], split: str) -> None:
    if metrics is None:
        return
    if not metrics:
        raise ConfigError("metrics must name at least one metric; got an empty list")
    known = set(higher_is_better())
    for row in rows:
        if row.status == "ok":
            known.update((row.metrics.get(split) or {}).keys())
    unknown = [m for m in metrics if m not in known]
    if unknown:
        names = ", ".join(map(repr, unknown))
        raise ConfigError(f"unknown metric(s) {names} for --metrics; known: {', '.join(sorted(known))}")


def check_width(max_width: int | None) -> None:
    if max_width is None:
        return
    if isinstance(max_width, bool) or not isinstance(max_width, int) or max_width < 0:
        raise ConfigError(f"max_width must be an integer >= 0 (0 or None: never split), got {max_width!r}")


def devices(rows: Sequence[ResultRow]) -> list[str]:
    return sorted({r.device for r in rows if r.status == "ok" and r.device})
