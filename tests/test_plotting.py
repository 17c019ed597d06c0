"""Plots: series extraction, any run (baselines too), overlays, seed means against joint, labelled
axes, a linear B axis that survives ±1e6 outliers, and the ``plot`` / ``show`` command lines."""

from __future__ import annotations

import math

import matplotlib.pyplot as plt
import pytest
import torch

from mmbalance.cli import main
from mmbalance.errors import ResultError
from mmbalance.methods import METHODS
from mmbalance.plotting import (
    diagnostic_series,
    plot_run,
    plot_runs,
    plot_seed_mean,
    robust_limits,
    run_figure,
    seed_mean_figure,
)
from mmbalance.results import write_row
from mmbalance.tasks import make_task
from mmbalance.train import TrainConfig, fit
from tests.conftest import tiny_model, tiny_splits
from tests.result_rows import make_row

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _row(history, label="cggm", seed=0, run_id="abc123abc123"):
    return {
        "run_id": run_id,
        "method": label,
        "label": label,
        "dataset": "toy",
        "task": "cls",
        "seed": seed,
        "history": history,
    }


def _baseline_history(scale: float = 1.0) -> list[dict]:
    """Three epochs of a joint-like run: no diagnostics, per-modality scores, the task metric, a loss."""
    return [
        {
            "epoch": e,
            "train_loss": 1.0 - 0.2 * e,
            "diagnostics": {},
            "val": {"acc": scale * (0.5 + 0.1 * e), "score/a": 0.4 + 0.05 * e, "score/b": 0.3},
        }
        for e in range(3)
    ]


def _axes(figure):
    return {ax.get_title(): ax for ax in figure.axes if ax.get_visible()}


def _assert_labelled(figure):
    for ax in figure.axes:
        if ax.get_visible():
            assert ax.get_xlabel() == "epoch" and ax.get_ylabel(), ax.get_title()
            assert ax.get_yscale() == "linear"


def test_series_groups_modalities_and_fills_gaps():
    history = [
        {
            "epoch": 0,
            "diagnostics": {"eps/a": 0.1, "eps/b": 0.2, "L_gm": 1.0},
            "val": {"acc": 0.5, "score/a": 0.3},
        },
        {"epoch": 1, "diagnostics": {"eps/a": 0.4}, "val": {"acc": 0.6, "score/a": 0.35}},
    ]
    epochs, panels = diagnostic_series(history)
    assert epochs == [0, 1]
    assert panels["eps"]["a"] == [0.1, 0.4]
    assert panels["eps"]["b"][0] == 0.2 and math.isnan(panels["eps"]["b"][1])
    assert panels["L_gm"]["L_gm"][0] == 1.0 and math.isnan(panels["L_gm"]["L_gm"][1])
    assert panels["val score"]["a"] == [0.3, 0.35]
    assert "acc" not in panels and "val metric" not in panels  # the metric panel needs the task
    _, with_task = diagnostic_series(history, "cls")
    assert with_task["val metric"] == {"acc": [0.5, 0.6]}


def test_plot_of_a_real_cggm_history(tmp_path):
    torch.manual_seed(0)
    splits, spec = tiny_splits(n=32)
    balancer = METHODS.build("cggm", None, direction="official")
    config = TrainConfig(epochs=2, batch_size=16)
    result = fit(tiny_model(), balancer, splits, spec, make_task("cls", 3), config, torch.device("cpu"))
    history = [{k: h[k] for k in ("epoch", "train_loss", "diagnostics", "val")} for h in result.history]
    _, panels = diagnostic_series(history, "cls")
    assert {
        "eps",
        "B",
        "grad_norm",
        "grad_cos",
        "cos",
        "L_gm",
        "val score",
        "val metric",
        "train loss",
    } <= set(panels)
    figure = run_figure([_row(history)])
    _assert_labelled(figure)
    plt.close(figure)
    out = plot_run(_row(history), tmp_path / "diag.png")
    data = out.read_bytes()
    assert data.startswith(PNG_MAGIC) and len(data) > 10_000


def test_a_baseline_without_diagnostics_is_plotted_with_every_axis_labelled():
    figure = run_figure([_row(_baseline_history(), label="joint")])
    axes = _axes(figure)
    assert set(axes) == {
        "validation score per modality (other modalities zeroed)",
        "validation metric (model selection)",
        "training loss (mean over the epoch)",
    }
    scores = axes["validation score per modality (other modalities zeroed)"]
    assert [line.get_label() for line in scores.lines] == ["a", "b"]
    assert list(scores.lines[0].get_ydata()) == pytest.approx([0.4, 0.45, 0.5])
    assert axes["validation metric (model selection)"].get_ylabel() == "acc"
    _assert_labelled(figure)
    plt.close(figure)


def test_b_stays_on_a_readable_linear_axis_and_says_what_is_off_it():
    # means near 1 but 2e6 at epoch 4, the min..max band reaching -1e6 at epoch 1
    history = [
        {
            "epoch": e,
            "diagnostics": {
                "B/a": 2e6 if e == 4 else 1.0 + 0.1 * e,
                "B_min/a": -1e6 if e == 1 else 0.9,
                "B_max/a": 1.5,
            },
        }
        for e in range(6)
    ]
    figure = run_figure([_row(history)])
    ax = _axes(figure)["B_i: magnitude coefficient (mean over the epoch's steps; band = min..max)"]
    lo, hi = ax.get_ylim()
    assert ax.get_yscale() == "linear" and 0.8 < lo < 0.9 and 1.5 < hi < 1.6  # the bulk fills the axis
    assert [t.get_text() for t in ax.texts] == ["2 value(s) off the axis: min -1e+06, max 2e+06"]
    mean, edge = ax.lines  # the mean line leaves a gap at epoch 4, marked by a triangle on the top edge
    assert math.isnan(mean.get_ydata()[4]) and list(mean.get_ydata()[:2]) == pytest.approx([1.0, 1.1])
    assert edge.get_marker() == "^" and list(edge.get_xdata()) == [4] and list(edge.get_ydata()) == [hi]
    band = ax.collections[0].get_paths()[0].vertices[:, 1]
    assert lo <= band.min() and band.max() <= hi  # the band is clipped to the axis
    plt.close(figure)


def test_robust_limits_ignore_a_lone_outlier():
    lo, hi = robust_limits([1.0, 1.1, 0.9, 1.05, 0.95, 1e6])
    assert lo < 0.9 and 1.1 < hi < 3.0
    assert robust_limits([2.0, 2.0]) == pytest.approx((1.9, 2.1))  # flat lines still get a range
    assert robust_limits([math.nan]) == (-1.0, 1.0)


def test_overlay_of_several_runs(tmp_path):
    rows = [
        _row(_baseline_history(), "joint", 0, "a" * 12),
        _row(_baseline_history(0.9), "cggm", 1, "b" * 12),
    ]
    figure = run_figure(rows)
    metric = _axes(figure)["validation metric (model selection)"]
    assert [line.get_label() for line in metric.lines] == ["joint seed 0: acc", "cggm seed 1: acc"]
    assert metric.lines[0].get_color() != metric.lines[1].get_color()
    assert figure.texts[0].get_text() == "2 runs on toy"
    plt.close(figure)
    assert plot_runs(rows, tmp_path / "both.png").read_bytes().startswith(PNG_MAGIC)


def test_seed_mean_against_joint(tmp_path):
    rows = [_row(_baseline_history(s), "cggm", i, f"{i:012x}") for i, s in enumerate((0.8, 1.0, 1.2))]
    rows.append(_row(_baseline_history(), "joint", 0, "f" * 12))
    figure = seed_mean_figure(rows, ["cggm", "joint"])
    metric = _axes(figure)["validation metric (model selection)"]
    assert [line.get_label() for line in metric.lines] == ["cggm", "joint"]
    # epoch 1: acc = s * 0.6 for s = 0.8, 1.0, 1.2 -> mean 0.6, sample std 0.12
    assert list(metric.lines[0].get_ydata()) == pytest.approx([0.5, 0.6, 0.7])
    band = metric.collections[0].get_paths()[0].vertices[:, 1]
    assert min(band) == pytest.approx(0.5 - 0.1) and max(band) == pytest.approx(0.7 + 0.14)
    _assert_labelled(figure)
    plt.close(figure)
    with pytest.raises(ResultError, match="no ok run with label\\(s\\) 'mla'"):
        seed_mean_figure(rows, ["mla"])
    assert plot_seed_mean(rows, "cggm", tmp_path / "mean.png").read_bytes().startswith(PNG_MAGIC)


def test_errors(tmp_path):
    with pytest.raises(ResultError, match="no per-epoch history"):
        plot_run(_row([]), tmp_path / "x.png")
    with pytest.raises(ResultError, match="at least one run"):
        plot_runs([], tmp_path / "x.png")


def _saved_row(tmp_path, label, seed, scale):
    row = make_row(label, "synthetic_cls2", seed, {"acc": 0.5})
    row["history"] = _baseline_history(scale)
    return write_row(tmp_path, row)


def test_plot_and_show_command_lines(tmp_path, capsys, monkeypatch):
    files = [_saved_row(tmp_path, "cggm", s, 1.0 + 0.1 * s) for s in range(2)] + [
        _saved_row(tmp_path, "joint", 0, 1)
    ]
    first = files[0].stem
    # one run by id prefix under --dir: the PNG goes next to the row file unless --out says otherwise
    assert main(["plot", first[:6], "--dir", str(tmp_path)]) == 0
    assert files[0].with_suffix(".png").read_bytes().startswith(PNG_MAGIC)
    assert main(["plot", first[:6], "--dir", str(tmp_path), "--out", str(tmp_path / "one.png")]) == 0
    # several runs overlaid; the seed mean of a label against joint
    assert main(["plot", *(str(f) for f in files), "--out", str(tmp_path / "all.png")]) == 0
    monkeypatch.chdir(tmp_path)
    assert main(["plot", "--label", "cggm", "--dataset", "synthetic_cls2", "--dir", str(tmp_path)]) == 0
    assert (tmp_path / "cggm_synthetic_cls2.png").read_bytes().startswith(PNG_MAGIC)
    capsys.readouterr()
    for argv, message in [
        (["plot", "ffff", "--dir", str(tmp_path)], "no result file or run id 'ffff'"),
        (["plot", "--dir", str(tmp_path)], "plot needs RUN"),
        (["plot", "--label", "cggm", "--dir", str(tmp_path)], "needs --dataset"),
        (["plot", "--label", "mla", "--dataset", "synthetic_cls2", "--dir", str(tmp_path)], "label(s) 'mla'"),
    ]:
        assert main(argv) == 2
        assert message in capsys.readouterr().err
    # show and plot find runs with the same --dir; show keeps --out as an older spelling
    assert main(["show", first[:6], "--dir", str(tmp_path)]) == 0
    shown = capsys.readouterr().out
    assert shown.startswith(f"run {first}: cggm on synthetic_cls2")
    assert main(["show", first[:6], "--out", str(tmp_path)]) == 0
    assert capsys.readouterr().out == shown
