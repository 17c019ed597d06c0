"""load_results / load_history: one DataFrame row per run / per epoch, malformed files skipped with a
warning naming them, and the README's example reproducing a cell of the committed synthetic table."""

from __future__ import annotations

import json
import math
import runpy
from pathlib import Path

import pytest

import mmbalance
from mmbalance.errors import ResultError
from mmbalance.results import load_rows, write_row
from mmbalance.tables import metric_table
from tests.result_rows import make_row

ROOT = Path(__file__).resolve().parents[1]
SYNTHETIC = ROOT / "results" / "synthetic"


@pytest.fixture
def folder(tmp_path):
    config = {
        "method": {"rho": 1.3, "weights": [0.2, 0.8]},
        "train": {"epochs": 2, "seed": 0},
        "dataset": {},
        "model": {},
    }
    rows = [
        make_row("joint", "synthetic_cls2", 0, {"acc": 0.90, "f1_weighted": 0.89}),
        make_row("joint", "synthetic_cls2", 1, {"acc": 0.92, "f1_weighted": 0.91}),
        make_row("cggm", "synthetic_cls2", 0, {"acc": 0.95, "f1_weighted": 0.94}, config=config, ratio=1.5),
        make_row("cggm", "synthetic_reg3", 0, {"mae": 0.7, "corr": None}, task="reg"),
        make_row("ogm_ge", "synthetic_cls2", 0, status="failed"),
        make_row("pmr", "synthetic_reg3", 0, task="reg", status="unsupported"),
    ]
    rows[0]["history"] = [
        {
            "epoch": 0,
            "train_loss": 1.0,
            "terms": {"task": 1.0},
            "val": {"acc": 0.6, "score/a": 0.5},
            "diagnostics": {},
        },
        {
            "epoch": 1,
            "train_loss": 0.5,
            "terms": {"task": 0.5},
            "val": {"acc": 0.8, "score/a": None},
            "diagnostics": {},
        },
    ]
    for row in rows:
        write_row(tmp_path, row)
    (tmp_path / "0123456789ab.json").write_text(json.dumps(make_row("joint", "x", 9, {"acc": 1.0}))[:50])
    bad_schema = make_row("joint", "x", 8, {"acc": 1.0})
    bad_schema["seed"] = "eight"
    (tmp_path / f"{bad_schema['run_id']}.json").write_text(json.dumps(bad_schema))
    return tmp_path


def test_one_row_per_run_with_flattened_config_and_metrics(folder):
    with pytest.warns(UserWarning) as caught:
        runs = mmbalance.load_results(folder)
    messages = sorted(str(w.message) for w in caught)
    assert len(messages) == 2 and "0123456789ab.json: truncated JSON" in messages[0]
    assert "seed must be an integer, got 'eight'" in messages[1] and messages[1].startswith(
        f"skipped {folder}"
    )
    assert runs.attrs["problems"] == [m.removeprefix("skipped ") for m in messages]
    assert len(runs) == 6
    assert list(runs[["dataset", "method", "seed"]].itertuples(index=False, name=None)) == [
        ("synthetic_cls2", "cggm", 0),
        ("synthetic_cls2", "joint", 0),
        ("synthetic_cls2", "joint", 1),
        ("synthetic_cls2", "ogm_ge", 0),
        ("synthetic_reg3", "cggm", 0),
        ("synthetic_reg3", "pmr", 0),
    ]
    cggm = runs[(runs.method == "cggm") & (runs.dataset == "synthetic_cls2")].iloc[0]
    assert cggm["test.acc"] == 0.95 and cggm["val.f1_weighted"] == 0.94 and cggm["best_epoch"] == 0
    assert cggm["config.method.rho"] == 1.3 and cggm["config.method.weights"] == (0.2, 0.8)
    assert cggm["cost.step_time_ratio"] == 1.5 and cggm["env.device"] == "cpu (x86_64, 1 threads)"
    assert Path(cggm["path"]) == folder / f"{cggm['run_id']}.json"
    reg = runs[(runs.method == "cggm") & (runs.dataset == "synthetic_reg3")].iloc[0]
    assert math.isnan(reg["test.corr"]) and reg["test.mae"] == 0.7  # a stored null is NaN
    failed = runs[runs.status == "failed"].iloc[0]
    assert failed["error"].startswith("NonFiniteLossError: loss term 'task' is nan") and math.isnan(
        failed["test.acc"]
    )
    assert runs.groupby(["label", "dataset"])["test.acc"].mean()[
        ("joint", "synthetic_cls2")
    ] == pytest.approx(0.91)


def test_files_lists_and_errors(folder, tmp_path):
    one = next(p for p in folder.glob("*.json") if "ogm_ge" in p.read_text())
    assert list(mmbalance.load_results(one)["method"]) == ["ogm_ge"]
    with pytest.warns(UserWarning):
        twice = mmbalance.load_results([folder, one])
    assert len(twice) == 7
    with pytest.raises(ResultError, match="results folder '.*nowhere' does not exist"):
        mmbalance.load_results(tmp_path / "nowhere")
    with pytest.raises(ResultError, match="no results folder or row file given"):
        mmbalance.load_results([])
    empty = tmp_path / "empty"
    empty.mkdir()
    assert mmbalance.load_results(empty).empty


def test_history_per_epoch(folder):
    with pytest.warns(UserWarning):
        runs = mmbalance.load_results(folder)
        history = mmbalance.load_history(folder)
    joint0 = history[(history.label == "joint") & (history.seed == 0)]
    assert list(joint0["epoch"]) == [0, 1] and list(joint0["train_loss"]) == [1.0, 0.5]
    assert list(joint0["terms.task"]) == [1.0, 0.5] and joint0["val.score/a"].iloc[0] == 0.5
    assert math.isnan(joint0["val.score/a"].iloc[1])
    chosen = mmbalance.load_history(runs[runs.method == "cggm"])  # a filtered frame chooses the runs
    assert set(chosen["method"]) == {"cggm"} and set(chosen["dataset"]) == {
        "synthetic_cls2",
        "synthetic_reg3",
    }
    with pytest.raises(ResultError, match="'path' column"):
        mmbalance.load_history(runs.drop(columns="path"))


def _readme_example() -> str:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    block = readme.split("<!-- load-results-example:start -->", 1)[1].split(
        "<!-- load-results-example:end -->"
    )[0]
    return block.split("```python", 1)[1].rsplit("```", 1)[0]


def test_readme_example_reproduces_a_cell_of_the_synthetic_table(tmp_path, capsys, monkeypatch):
    code = _readme_example()
    assert len([line for line in code.splitlines() if line.strip()]) <= 5
    monkeypatch.chdir(ROOT)
    script = tmp_path / "example.py"
    script.write_text(code)
    runpy.run_path(str(script), run_name="example")
    printed = capsys.readouterr().out.strip()
    # the same cell rendered by the table code from the same rows, and in the committed table
    table = metric_table(load_rows(SYNTHETIC / "rows").rows, marks=False, max_width=0)
    joint = next(line for line in table.splitlines() if line.startswith("| joint "))
    header = next(line for line in table.splitlines() if line.startswith("| method "))
    column = [c.strip() for c in header.split("|")].index("synthetic_cls2 acc ↑")
    assert printed == joint.split("|")[column].strip()
    assert printed in (SYNTHETIC / "README.md").read_text(encoding="utf-8")
