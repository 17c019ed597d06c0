"""Per-epoch curves of result rows: validation scores per modality, the validation metric, the
training loss, and the balancer's diagnostics (CGGM's Fig. 2 / Fig. 3 quantities and others).

A row's ``history`` holds one record per epoch with ``train_loss``, the validation metrics ``val``
(with the per-modality scores ``score/<m>``: the task score with the other modalities zeroed) and
a ``diagnostics`` dict (whatever the method's :meth:`~mmbalance.balancer.Balancer.diagnostics`
returned; empty for the baselines). Panels:

* ``val score``: the per-modality validation scores, one line per modality (every run has them
  when it was trained with ``eval_modality_scores``, joint and the other baselines included);
* ``val metric``: the task's primary validation metric (acc, MAE or Dice); ``train loss``;
* one panel per diagnostic: keys ``name/<modality>`` share a panel with one line per modality
  (CGGM: ε_i, B_i, cos_i, grad_cos_i, grad_norm_i), other keys get a panel each.

Three views: :func:`plot_run` (one run), :func:`plot_runs` with several rows (overlaid, one colour
per run) and :func:`plot_seed_mean` (per label, the mean over seeds with a ± one-std band,
against joint's runs on the same dataset). Every axis is labelled. All axes are linear: where a
few values would flatten the rest (B can reach ±1e6 at degenerate steps of the official CGGM),
the y-range follows the bulk of the curves (within 5 interquartile ranges) and the panel says how
many values lie off the axis and their extremes, instead of a symlog axis nobody can read.

``mmbalance plot`` calls these (matplotlib, Agg backend, no display).
"""

from __future__ import annotations

import math
import os
import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from mmbalance.errors import ResultError

__all__ = [
    "PANEL_TITLES",
    "PANEL_YLABELS",
    "diagnostic_series",
    "run_figure",
    "plot_run",
    "plot_runs",
    "plot_seed_mean",
    "seed_mean_figure",
    "robust_limits",
]

# Known panels, in drawing order, with their titles and y-axis labels.
PANEL_TITLES: dict[str, str] = {
    "val score": "validation score per modality (other modalities zeroed)",
    "val metric": "validation metric (model selection)",
    "train loss": "training loss (mean over the epoch)",
    "eps": "ε_i: head metric on the training batch",
    "B": "B_i: magnitude coefficient (mean over the epoch's steps)",
    "grad_norm": "encoder gradient norm before modulation",
    "grad_cos": "cos(∇W_fi L, ∇W_F L): head vs fusion gradient",
    "cos": "cos_i used in L_gm",
    "L_gm": "L_gm (direction loss)",
    "frac_small_sum": "fraction of steps with |Σ Δε| < 1/batch",
    "frac_negative_B": "fraction of steps with a negative raw B",
}
PANEL_YLABELS: dict[str, str] = {
    "val score": "task score",
    "train loss": "loss",
    "eps": "ε (head metric)",
    "B": "B (coefficient)",
    "grad_norm": "L2 norm",
    "grad_cos": "cosine",
    "cos": "cosine",
    "L_gm": "L_gm",
    "frac_small_sum": "fraction of steps",
    "frac_negative_B": "fraction of steps",
}
PRIMARY_METRIC = {"cls": "acc", "reg": "mae", "seg": "dice_mean"}
_BAND = {"B": ("B_min", "B_max")}
_BAND_KEYS = {k for pair in _BAND.values() for k in pair}
_STYLES = ("-", "--", ":", "-.")  # line style per modality when runs are overlaid
_OUTLIER_IQRS = 5.0  # values further than this many interquartile ranges off the quartiles leave the axis

Row = Mapping[str, Any]
Series = dict[str, dict[str, list[float]]]  # panel -> line -> value per epoch


def _number(value: Any) -> float:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else math.nan


def diagnostic_series(
    history: Sequence[Mapping[str, Any]], task: str | None = None
) -> tuple[list[int], Series]:
    """``(epochs, {panel: {line: values}})`` from a row's history; missing values are NaN.

    ``name/suffix`` diagnostic keys become panel ``name`` with line ``suffix``; other keys a panel of
    one line named after the key. Validation scores ``score/<m>`` form the panel ``val score``;
    with ``task`` given, its primary validation metric forms ``val metric``; ``train_loss`` forms
    ``train loss``.
    """
    epochs: list[int] = []
    panels: Series = {}
    n = len(history)
    metric = PRIMARY_METRIC.get(task or "")
    for i, record in enumerate(history):
        epochs.append(int(record.get("epoch", i)))
        items = dict(record.get("diagnostics") or {})
        val = record.get("val") or {}
        for key, value in val.items():
            if key.startswith("score/"):
                items["val score/" + key.split("/", 1)[1]] = value
        if metric and metric in val:
            items[f"val metric/{metric}"] = val[metric]
        if "train_loss" in record:
            items["train loss/train loss"] = record["train_loss"]
        for key, value in items.items():
            panel, _, line = key.partition("/")
            panels.setdefault(panel, {}).setdefault(line or key, [math.nan] * n)[i] = _number(value)
    return epochs, panels


def _order(panels: Mapping[str, Any]) -> list[str]:
    known = [p for p in PANEL_TITLES if p in panels]
    rest = sorted(p for p in panels if p not in PANEL_TITLES and p not in _BAND_KEYS)
    return known + rest


def robust_limits(values: Sequence[float]) -> tuple[float, float]:
    """A y-range holding the bulk of ``values``: the extent of the values within 5 interquartile
    ranges of the quartiles (so one value of 1e6 among values near 1 does not flatten them), padded
    by 5 %."""
    finite = sorted(v for v in values if math.isfinite(v))
    if not finite:
        return -1.0, 1.0
    if len(finite) >= 4:
        q1, _, q3 = statistics.quantiles(finite, n=4, method="inclusive")
        spread = (q3 - q1) or max(abs(q1), abs(q3), 1e-12)
        fence_lo, fence_hi = q1 - _OUTLIER_IQRS * spread, q3 + _OUTLIER_IQRS * spread
        finite = [v for v in finite if fence_lo <= v <= fence_hi]
    lo, hi = finite[0], finite[-1]
    pad = 0.05 * (hi - lo) if hi > lo else 0.05 * max(abs(hi), 1.0)
    return lo - pad, hi + pad


def _load(row: Row | str | os.PathLike[str]) -> tuple[dict[str, Any], Path | None]:
    if isinstance(row, Mapping):
        return dict(row), None
    from mmbalance.results import read_row

    return dict(read_row(row).data), Path(row)


def _series(row: Row) -> tuple[list[int], Series]:
    return diagnostic_series(row.get("history") or [], row.get("task"))


def _run_name(row: Row) -> str:
    return f"{row.get('label') or row.get('method', '?')} seed {row.get('seed', '?')}"


class _Panels:
    """A grid of axes, one per panel name, with the off-axis bookkeeping of each."""

    def __init__(self, names: Sequence[str], title: str) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        self.names = list(names)
        cols = 2 if len(names) > 1 else 1
        rows = math.ceil(len(names) / cols)
        self.figure, axes = plt.subplots(rows, cols, figsize=(6.0 * cols, 3.0 * rows), squeeze=False)
        self.axes = dict(zip(self.names, axes.flat, strict=False))
        for ax in list(axes.flat)[len(names):]:
            ax.set_visible(False)
        # drawn by finish(), once the y-range of each panel is known
        self.lines: dict[str, list[tuple[Sequence[int], list[float], dict[str, Any]]]] = {}
        self.bands: dict[str, list[tuple[Sequence[int], list[float], list[float], str]]] = {}
        for name in names:
            self.lines[name], self.bands[name] = [], []
        self.figure.suptitle(title, fontsize=10)

    def line(self, panel: str, epochs: Sequence[int], values: Sequence[float], **style: Any) -> str:
        """Add a line (drawn by :meth:`finish`); returns its colour, for a band around it."""
        style.setdefault("color", f"C{len(self.lines[panel]) % 10}")
        self.lines[panel].append((epochs, list(values), style))
        return style["color"]

    def band(
        self, panel: str, epochs: Sequence[int], lo: Sequence[float], hi: Sequence[float], color: str
    ) -> None:
        self.bands[panel].append((epochs, list(lo), list(hi), color))

    def _draw(self, name: str, ax: Any) -> None:
        """Lines and bands within the robust y-range; values off it become edge markers and a note."""
        everything = [v for _, values, _ in self.lines[name] for v in values]
        everything += [v for _, lo, hi, _ in self.bands[name] for v in (*lo, *hi)]
        bottom, top = robust_limits(everything)
        ax.set_ylim(bottom, top)
        for epochs, lo, hi, color in self.bands[name]:
            clip = [[min(max(v, bottom), top) for v in edge] for edge in (lo, hi)]
            ax.fill_between(epochs, *clip, alpha=0.15, linewidth=0, color=color)
        for epochs, values, style in self.lines[name]:
            inside = [v if bottom <= v <= top else math.nan for v in values]
            ax.plot(epochs, inside, marker="o", markersize=3, **style)
            for edge, marker, sign in ((top, "^", 1), (bottom, "v", -1)):
                xs = [e for e, v in zip(epochs, values, strict=True) if sign * (v - edge) > 0]
                if xs:  # a value off the axis: a triangle on its edge, pointing the way
                    edge_style = {"linestyle": "none", "marker": marker, "clip_on": False}
                    ax.plot(xs, [edge] * len(xs), color=style["color"], **edge_style)
        off = [v for v in everything if math.isfinite(v) and not bottom <= v <= top]
        if off:
            note = f"{len(off)} value(s) off the axis: min {min(off):.3g}, max {max(off):.3g}"
            ax.text(0.01, 0.02, note, transform=ax.transAxes, fontsize=7, color="0.3")

    def finish(self, ylabels: Mapping[str, str], titles: Mapping[str, str] | None = None) -> Any:
        titles = {**PANEL_TITLES, **(titles or {})}
        for name, ax in self.axes.items():
            self._draw(name, ax)
            ax.set_title(titles.get(name, name), fontsize=9)
            ax.set_xlabel("epoch", fontsize=8)
            ax.set_ylabel(ylabels.get(name, name), fontsize=8)
            ax.tick_params(labelsize=7)
            ax.grid(alpha=0.3)
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=6)
        height = self.figure.get_figheight()
        self.figure.tight_layout(rect=(0.0, 0.0, 1.0, 1.0 - 0.4 / height))  # room for the title
        return self.figure


def _ylabels(rows: Sequence[Row]) -> dict[str, str]:
    metrics = sorted({PRIMARY_METRIC.get(str(r.get("task")), "") for r in rows} - {""})
    return {**PANEL_YLABELS, "val metric": " / ".join(metrics) or "metric"}


def run_figure(rows: Sequence[Row]) -> Any:
    """The figure of one or several runs overlaid (one colour per run, one line style per modality).

    Raises:
        ResultError: a run without any per-epoch record.
    """
    series = []
    for row in rows:
        history = row.get("history") or []
        if not history:
            what = f"run {row.get('run_id', '?')} ({_run_name(row)} on {row.get('dataset', '?')})"
            raise ResultError(f"{what} has no per-epoch history to plot")
        series.append(diagnostic_series(history, row.get("task")))
    names = _order({p: 1 for _, panels in series for p in panels})
    first = rows[0]
    if len(rows) == 1:
        title = f"{_run_name(first)} on {first.get('dataset', '?')} (run {first.get('run_id', '?')})"
    else:
        title = f"{len(rows)} runs on {', '.join(sorted({str(r.get('dataset', '?')) for r in rows}))}"
    grid = _Panels(names, title)
    several = len(rows) > 1
    for index, (row, (epochs, panels)) in enumerate(zip(rows, series, strict=True)):
        for name in names:
            lines = panels.get(name, {})
            for j, (line, values) in enumerate(lines.items()):
                label = f"{_run_name(row)}: {line}" if several else (line if len(lines) > 1 else None)
                style = {"color": f"C{index % 10}", "linestyle": _STYLES[j % len(_STYLES)]} if several else {}
                color = grid.line(name, epochs, values, label=label, **style)
                lo, hi = (panels.get(k, {}).get(line) for k in _BAND.get(name, ("", "")))
                if lo is not None and hi is not None:
                    grid.band(name, epochs, lo, hi, color)
    return grid.finish(_ylabels(rows), {"B": PANEL_TITLES["B"][:-1] + "; band = min..max)"})


def _save(figure: Any, out: str | os.PathLike[str]) -> Path:
    import matplotlib.pyplot as plt

    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def plot_run(row: Row | str | os.PathLike[str], out: str | os.PathLike[str] | None = None) -> Path:
    """Draw one result row (a dict or a row JSON file) into a PNG and return its path.

    ``out`` defaults to the row file's path with ``.png`` (``<run_id>.png`` here for a dict).

    Raises:
        ResultError: an unreadable row, or one without any per-epoch record.
    """
    data, source = _load(row)
    if out is None:
        out = source.with_suffix(".png") if source is not None else Path(f"{data.get('run_id', 'run')}.png")
    return _save(run_figure([data]), out)


def plot_runs(rows: Sequence[Row | str | os.PathLike[str]], out: str | os.PathLike[str]) -> Path:
    """Several runs overlaid in one PNG (see :func:`run_figure`)."""
    if not rows:
        raise ResultError("plot_runs needs at least one run")
    return _save(run_figure([_load(r)[0] for r in rows]), out)


def _mean_std(runs: Sequence[tuple[list[int], list[float]]]) -> tuple[list[int], list[float], list[float]]:
    """Per epoch over runs: mean and sample std (0 with one run); NaN values left out."""
    by_epoch: dict[int, list[float]] = {}
    for epochs, values in runs:
        for e, v in zip(epochs, values, strict=True):
            if not math.isnan(v):
                by_epoch.setdefault(e, []).append(v)
    epochs = sorted(by_epoch)
    means = [math.fsum(by_epoch[e]) / len(by_epoch[e]) for e in epochs]
    stds = [statistics.stdev(by_epoch[e]) if len(by_epoch[e]) > 1 else 0.0 for e in epochs]
    return epochs, means, stds


def seed_mean_figure(rows: Sequence[Row], labels: Sequence[str]) -> Any:
    """Per label (in ``labels`` order), the mean over its runs ± one sample std, every panel.

    Raises:
        ResultError: a label without any run among ``rows``.
    """
    groups = {lb: [r for r in rows if (r.get("label") or r.get("method")) == lb] for lb in labels}
    empty = [lb for lb, runs in groups.items() if not runs]
    if empty:
        names = ", ".join(map(repr, empty))
        raise ResultError(f"no ok run with label(s) {names} among the {len(rows)} row(s) given")
    series = {lb: [_series(r) for r in runs] for lb, runs in groups.items()}
    names = _order({p: 1 for runs in series.values() for _, panels in runs for p in panels})
    datasets = sorted({str(r.get("dataset", "?")) for runs in groups.values() for r in runs})
    seeds = ", ".join(f"{lb} n={len(runs)}" for lb, runs in groups.items())
    grid = _Panels(names, f"mean ± std over seeds on {', '.join(datasets)} ({seeds})")
    for index, (lb, runs) in enumerate(series.items()):
        for name in names:
            lines = sorted({line for _, panels in runs for line in panels.get(name, {})})
            for j, line in enumerate(lines):
                per_run = [(e, p[name][line]) for e, p in runs if line in p.get(name, {})]
                epochs, mean, std = _mean_std(per_run)
                shown = lb if name in ("val metric", "train loss") or len(lines) == 1 else f"{lb}: {line}"
                style = {"color": f"C{index % 10}", "linestyle": _STYLES[j % len(_STYLES)]}
                color = grid.line(name, epochs, mean, label=shown, **style)
                lo = [m - s for m, s in zip(mean, std, strict=True)]
                grid.band(name, epochs, lo, [m + s for m, s in zip(mean, std, strict=True)], color)
    return grid.finish(_ylabels([r for runs in groups.values() for r in runs]))


def plot_seed_mean(
    rows: Sequence[Row], label: str, out: str | os.PathLike[str], *, against: str | None = "joint"
) -> Path:
    """The seed mean ± std of ``label``'s runs, with ``against``'s runs (None: alone), in one PNG.

    ``rows`` are the ``ok`` rows of one dataset (e.g. ``load_rows(dir).rows`` filtered by dataset).
    """
    labels = [label] + ([against] if against and against != label else [])
    return _save(seed_mean_figure(rows, labels), out)
