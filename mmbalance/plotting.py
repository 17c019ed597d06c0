"""Per-epoch curves of a run's balancer diagnostics (CGGM's Fig. 2 / Fig. 3 quantities and others).

A result row's ``history`` holds one record per epoch with a ``diagnostics`` dict (whatever the
method's :meth:`~mmbalance.balancer.Balancer.diagnostics` returned) and the validation metrics
``val`` (with the per-modality scores ``score/<m>``). :func:`plot_run` draws one panel per
diagnostic: keys ``name/<modality>`` share a panel with one line per modality (for CGGM: ε_i, B_i,
cos_i, grad_cos_i, grad_norm_i), other keys get a panel each (``L_gm``, the fractions of degenerate
steps), and a last panel shows the per-modality validation scores. Works for any method that logs
diagnostics; a row without any raises :class:`~mmbalance.errors.ResultError`.

``mmbalance plot RUN [--out PNG]`` calls :func:`plot_run` (matplotlib, Agg backend, no display).
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from mmbalance.errors import ResultError

__all__ = ["plot_run", "diagnostic_series", "PANEL_TITLES"]

# Known diagnostic names, in drawing order, with their panel titles.
PANEL_TITLES: dict[str, str] = {
    "eps": "ε_i: head metric on the training batch",
    "B": "B_i: magnitude coefficient (mean; band = min..max)",
    "grad_norm": "encoder gradient norm before modulation",
    "grad_cos": "cos(∇W_fi L, ∇W_F L): head vs fusion gradient",
    "cos": "cos_i used in L_gm",
    "L_gm": "L_gm (direction loss)",
    "frac_small_sum": "fraction of steps with |Σ Δε| < 1/batch",
    "frac_negative_B": "fraction of steps with a negative raw B",
    "val score": "validation score per modality (other modalities zeroed)",
}
_BAND = {"B": ("B_min", "B_max")}
_BAND_KEYS = {k for pair in _BAND.values() for k in pair}


def diagnostic_series(history: Sequence[Mapping[str, Any]]) -> tuple[list[int], dict[str, dict[str, list[float]]]]:
    """``(epochs, {panel: {line: values}})`` from a row's history; missing values are NaN.

    ``name/suffix`` keys become panel ``name`` with line ``suffix``; other keys a panel of one line
    named after the key. Validation scores ``score/<m>`` form the panel ``val score``.
    """
    epochs: list[int] = []
    panels: dict[str, dict[str, list[float]]] = {}
    n = len(history)
    for i, record in enumerate(history):
        epochs.append(int(record.get("epoch", i)))
        items = dict(record.get("diagnostics") or {})
        for key, value in (record.get("val") or {}).items():
            if key.startswith("score/"):
                items["val score/" + key.split("/", 1)[1]] = value
        for key, value in items.items():
            panel, _, line = key.partition("/")
            line = line or key
            series = panels.setdefault(panel, {}).setdefault(line, [math.nan] * n)
            series[i] = float(value) if isinstance(value, int | float) and value is not None else math.nan
    return epochs, panels


def _order(panels: Mapping[str, Any]) -> list[str]:
    known = [p for p in PANEL_TITLES if p in panels and p != "val score"]
    rest = sorted(p for p in panels if p not in PANEL_TITLES and p not in _BAND_KEYS and p != "val score")
    return known + rest + (["val score"] if "val score" in panels else [])


def plot_run(row: Mapping[str, Any] | str | os.PathLike[str], out: str | os.PathLike[str] | None = None) -> Path:
    """Draw the diagnostics of one result row (a dict or a row JSON file) into a PNG.

    Args:
        row: the row, or the path of its JSON file.
        out: the PNG path; default: the row file's path with ``.png`` (``<run_id>.png`` in the
            current folder for a dict).

    Returns:
        The path written.

    Raises:
        ResultError: an unreadable row, or a history without any diagnostics.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from mmbalance.results import read_row

    source: Path | None = None
    if not isinstance(row, Mapping):
        source = Path(row)
        row = dict(read_row(source).data)
    history = row.get("history") or []
    if not any(record.get("diagnostics") for record in history):
        raise ResultError(
            f"run {row.get('run_id', '?')} ({row.get('method', '?')} on {row.get('dataset', '?')}) has no diagnostics "
            f"in its history ({len(history)} epoch record(s)); nothing to plot"
        )
    epochs, panels = diagnostic_series(history)
    names = _order(panels)
    cols = 2 if len(names) > 1 else 1
    rows = math.ceil(len(names) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(6.0 * cols, 2.8 * rows), squeeze=False)
    for ax, name in zip(axes.flat, names, strict=False):
        lines = panels[name]
        large = False
        for label, values in lines.items():
            ax.plot(epochs, values, marker="o", markersize=3, label=label if len(lines) > 1 or label != name else None)
            large |= any(abs(v) > 100 for v in values if not math.isnan(v))
            if name in _BAND:
                lo, hi = (panels.get(k, {}).get(label) for k in _BAND[name])
                if lo is not None and hi is not None:
                    ax.fill_between(epochs, lo, hi, alpha=0.15)
                    large |= any(abs(v) > 100 for v in (*lo, *hi) if not math.isnan(v))
        if large:
            ax.set_yscale("symlog", linthresh=1.0)
        ax.set_title(PANEL_TITLES.get(name, name), fontsize=9)
        ax.set_xlabel("epoch", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
        if any(label != name for label in lines) and len(lines) > 1:
            ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(names):]:
        ax.set_visible(False)
    label = row.get("label") or row.get("method", "?")
    fig.suptitle(f"{label} on {row.get('dataset', '?')}, seed {row.get('seed', '?')} (run {row.get('run_id', '?')})", fontsize=10)
    fig.tight_layout()
    if out is None:
        out = source.with_suffix(".png") if source is not None else Path(f"{row.get('run_id', 'run')}.png")
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
