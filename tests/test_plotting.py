"""Diagnostic plots: series extraction, a PNG from a real CGGM history, and the no-diagnostics error."""

from __future__ import annotations

import math

import pytest
import torch

from mmbalance.errors import ResultError
from mmbalance.methods import METHODS
from mmbalance.plotting import diagnostic_series, plot_run
from mmbalance.results import write_row
from mmbalance.tasks import make_task
from mmbalance.train import TrainConfig, fit
from tests.conftest import tiny_model, tiny_splits

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _row(history):
    return {"run_id": "abc123abc123", "method": "cggm", "label": "cggm", "dataset": "toy", "seed": 0, "history": history}


def test_series_groups_modalities_and_fills_gaps():
    history = [
        {"epoch": 0, "diagnostics": {"eps/a": 0.1, "eps/b": 0.2, "L_gm": 1.0}, "val": {"acc": 0.5, "score/a": 0.3}},
        {"epoch": 1, "diagnostics": {"eps/a": 0.4}, "val": {"acc": 0.6, "score/a": 0.35}},
    ]
    epochs, panels = diagnostic_series(history)
    assert epochs == [0, 1]
    assert panels["eps"]["a"] == [0.1, 0.4]
    assert panels["eps"]["b"][0] == 0.2 and math.isnan(panels["eps"]["b"][1])
    assert panels["L_gm"]["L_gm"][0] == 1.0 and math.isnan(panels["L_gm"]["L_gm"][1])
    assert panels["val score"]["a"] == [0.3, 0.35]
    assert "acc" not in panels


def test_plot_of_a_real_cggm_history(tmp_path):
    torch.manual_seed(0)
    splits, spec = tiny_splits(n=32)
    balancer = METHODS.build("cggm", None, direction="official")
    result = fit(tiny_model(), balancer, splits, spec, make_task("cls", 3), TrainConfig(epochs=2, batch_size=16), torch.device("cpu"))
    history = [{"epoch": h["epoch"], "diagnostics": h["diagnostics"], "val": h["val"]} for h in result.history]
    _, panels = diagnostic_series(history)
    assert {"eps", "B", "grad_norm", "grad_cos", "cos", "L_gm", "val score"} <= set(panels)
    out = plot_run(_row(history), tmp_path / "diag.png")
    data = out.read_bytes()
    assert data.startswith(PNG_MAGIC) and len(data) > 10_000


def test_plot_from_row_file_defaults_next_to_it(tmp_path):
    history = [{"epoch": e, "diagnostics": {"B/a": 1.0 + e, "B_min/a": -1e6, "B_max/a": 5.0}} for e in range(3)]
    row = _row(history)
    row.update(
        run_id="abc123abc123", status="ok", task="cls", config={}, cost={}, env={}, command="mmbalance run cggm toy",
        metrics={"val": {"acc": 0.5}, "test": {"acc": 0.4}, "best_epoch": 0},
    )
    row_file = write_row(tmp_path, row)
    out = plot_run(row_file)
    assert out == tmp_path / "abc123abc123.png" and out.read_bytes().startswith(PNG_MAGIC)
    # the CLI: by run id prefix under --dir, to --out
    from mmbalance.cli import main

    assert main(["plot", "abc123", "--dir", str(tmp_path), "--out", str(tmp_path / "cli.png")]) == 0
    assert (tmp_path / "cli.png").read_bytes().startswith(PNG_MAGIC)
    assert main(["plot", "ffff", "--dir", str(tmp_path)]) == 2


def test_no_diagnostics_is_an_error(tmp_path):
    with pytest.raises(ResultError, match="no diagnostics"):
        plot_run(_row([{"epoch": 0, "diagnostics": {}}]), tmp_path / "x.png")
