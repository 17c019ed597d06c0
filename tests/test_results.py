"""Result rows: atomic writes, validation, corrupt-file reporting, aggregation over seeds."""

from __future__ import annotations

import json
import math
import os
import statistics

import pytest

from mmbalance.errors import ResultError
from mmbalance.results import (
    PLAN_DIR,
    ResultRow,
    aggregate,
    aggregate_cost,
    config_conflicts,
    load_plan,
    load_rows,
    read_row,
    summarize,
    write_json_atomic,
    write_row,
)
from tests.result_rows import make_row


def test_write_read_round_trip_and_nan_as_null(tmp_path):
    row = make_row("joint", "mosi", 0, {"mae": 0.75, "corr": float("nan")}, task="reg")
    path = write_row(tmp_path, row)
    assert path.name == f"{row['run_id']}.json"
    text = path.read_text()
    assert "NaN" not in text and '"corr": null' in text  # strict JSON
    back = read_row(path)
    assert back.label == "joint" and back.seed == 0 and back.task == "reg"
    assert back.metric("test", "mae") == 0.75
    assert math.isnan(back.metric("test", "corr"))
    assert back.metric("test", "acc") is None
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp file left


def test_atomic_write_keeps_old_file_when_replace_fails(tmp_path, monkeypatch):
    target = tmp_path / "x.json"
    write_json_atomic(target, {"v": 1})

    def boom(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError, match="disk full"):
        write_json_atomic(target, {"v": 2})
    assert json.loads(target.read_text()) == {"v": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.json"]  # temp file removed


def test_write_row_rejects_invalid_row(tmp_path):
    row = make_row("joint", "mosi", 0, {"mae": 0.7}, task="reg")
    row["status"] = "done"
    with pytest.raises(ResultError, match=r"status must be one of .*'done'"):
        write_row(tmp_path, row)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "mutate, reason",
    [
        (lambda d: d.pop("metrics"), r"missing field\(s\) metrics"),
        (lambda d: d.update(seed="0"), r"seed must be an integer, got '0'"),
        (lambda d: d.update(task="det"), r"task must be one of .*'det'"),
        (
            lambda d: d["metrics"]["test"].update(acc="high"),
            r"metrics.test.acc must be a number or null, got 'high'",
        ),
        (lambda d: d["metrics"].pop("best_epoch"), r"metrics.best_epoch must be an integer"),
        (lambda d: d["cost"].update(step_time_ratio=[1]), r"cost.step_time_ratio must be a number or null"),
        (lambda d: d.update(run_id="XYZ"), r"run_id must be 12 hex digits, got 'XYZ'"),
    ],
)
def test_row_validation_names_the_field(mutate, reason):
    data = make_row("joint", "food101", 1, {"acc": 0.9})
    mutate(data)
    with pytest.raises(ResultError, match=reason):
        ResultRow.from_dict(data)


def test_failed_row_needs_error():
    data = make_row("joint", "food101", 1, status="failed")
    assert ResultRow.from_dict(data).error["type"] == "NonFiniteLossError"
    del data["error"]
    with pytest.raises(ResultError, match="error.type and error.message"):
        ResultRow.from_dict(data)


def test_load_rows_reports_and_skips_bad_files(tmp_path):
    good = make_row("joint", "food101", 0, {"acc": 0.9})
    write_row(tmp_path, good)
    full = json.dumps(make_row("joint", "food101", 1, {"acc": 0.8}), indent=1)
    (tmp_path / "aaaaaaaaaaa1.json").write_text(full[: len(full) // 2])  # truncated (killed writer)
    (tmp_path / "aaaaaaaaaaa2.json").write_text("{not json}")
    (tmp_path / "aaaaaaaaaaa3.json").write_text("")
    (tmp_path / "aaaaaaaaaaa4.json").write_text("[1, 2]")
    (tmp_path / "aaaaaaaaaaa5.json").write_bytes(b"\xff\xfe{}")
    renamed = make_row("joint", "food101", 2, {"acc": 0.7})
    (tmp_path / "bbbbbbbbbbbb.json").write_text(json.dumps(renamed))
    (tmp_path / f".{good['run_id']}.json.123.tmp").write_text("{")  # leftover temp file: ignored
    (tmp_path / PLAN_DIR).mkdir()
    (tmp_path / PLAN_DIR / "plan.json").write_text("{}")  # plans are not rows

    loaded = load_rows(tmp_path)
    assert [r.run_id for r in loaded.rows] == [good["run_id"]]
    reasons = {p.path.name: p.reason for p in loaded.problems}
    assert reasons.keys() == {f"aaaaaaaaaaa{i}.json" for i in range(1, 6)} | {"bbbbbbbbbbbb.json"}
    assert reasons["aaaaaaaaaaa1.json"].startswith("truncated JSON")
    assert reasons["aaaaaaaaaaa2.json"].startswith("invalid JSON")
    assert reasons["aaaaaaaaaaa3.json"] == "empty file"
    assert "expected a JSON object, got list" in reasons["aaaaaaaaaaa4.json"]
    assert "not UTF-8" in reasons["aaaaaaaaaaa5.json"]
    assert "differs from the file name" in reasons["bbbbbbbbbbbb.json"]
    assert all(str(tmp_path) in str(p) for p in loaded.problems)  # each names its path


def test_load_rows_missing_folder(tmp_path):
    with pytest.raises(ResultError, match="does not exist"):
        load_rows(tmp_path / "nope")


def test_summarize_sample_std_and_single_value():
    s = summarize([0.8, 0.9, 1.0])
    assert s.mean == pytest.approx(0.9) and s.n == 3
    assert s.std == pytest.approx(statistics.stdev([0.8, 0.9, 1.0]))
    assert s.std == pytest.approx(0.1)  # ddof=1 by hand: sqrt((0.01 + 0 + 0.01) / 2)
    one = summarize([0.5])
    assert one.mean == 0.5 and one.std is None and one.n == 1


def test_aggregate_groups_by_label_dataset_metric_over_ok_rows():
    rows = [
        ResultRow.from_dict(
            make_row(
                "joint", "food101", s, {"acc": a, "f1_weighted": f}, val={"acc": 0.5, "f1_weighted": 0.5}
            )
        )
        for s, a, f in ((0, 0.8, 0.7), (1, 0.9, 0.8))
    ]
    rows.append(
        ResultRow.from_dict(
            make_row("unimodal[text]", "food101", 0, {"acc": 0.6, "f1_weighted": 0.6}, ratio=0.5)
        )
    )
    rows.append(ResultRow.from_dict(make_row("joint", "food101", 2, status="failed")))
    stats = aggregate(rows)
    assert stats[("joint", "food101", "acc")].mean == pytest.approx(0.85)
    assert stats[("joint", "food101", "acc")].n == 2  # the failed seed is not averaged
    assert stats[("joint", "food101", "f1_weighted")].std == pytest.approx(statistics.stdev([0.7, 0.8]))
    assert stats[("unimodal[text]", "food101", "acc")].std is None
    assert aggregate(rows, "val")[("joint", "food101", "acc")].mean == pytest.approx(0.5)
    cost = aggregate_cost(rows)
    assert cost[("unimodal[text]", "food101", "step_time_ratio")].mean == pytest.approx(0.5)
    with pytest.raises(ValueError, match="split must be"):
        aggregate(rows, "train")


def test_config_conflicts_flags_mixed_configurations():
    a = make_row("joint", "mosi", 0, {"mae": 1.0}, task="reg")
    b = make_row("joint", "mosi", 1, {"mae": 1.0}, task="reg")
    rows = [ResultRow.from_dict(a), ResultRow.from_dict(b)]
    assert config_conflicts(rows) == []  # differ in the seed only
    c = make_row("joint", "mosi", 2, {"mae": 1.0}, task="reg", config={"train": {"epochs": 5, "seed": 2}})
    assert config_conflicts([*rows, ResultRow.from_dict(c)]) == [
        "joint on mosi: rows from 2 different configurations are averaged together"
    ]


def test_load_plan_merges_and_reports_bad_plans(tmp_path):
    entry = {
        "run_id": "0123456789ab",
        "label": "joint",
        "method": "joint",
        "dataset": "mosi",
        "task": "reg",
        "seed": 0,
        "unsupported": False,
    }
    write_json_atomic(tmp_path / PLAN_DIR / "p1.json", {"runs": [entry]})
    (tmp_path / PLAN_DIR / "p2.json").write_text('{"runs": [{"run_id": 1}]}')
    plan, problems = load_plan(tmp_path)
    assert plan.labels == ["joint"] and plan.datasets == ["mosi"]
    assert len(problems) == 1 and problems[0].path.name == "p2.json" and "KeyError" in problems[0].reason
    assert not load_plan(tmp_path / "empty")[0]


@pytest.mark.parametrize(
    "mutate, reason",
    [
        (lambda d: d.update(history=[1, "two"]), r"history\[0\] must be an object, got int"),
        (lambda d: d["history"][0].update(epoch="0"), r"history\[0\].epoch must be an integer, got '0'"),
        (lambda d: d["history"][0].update(val=[0.5]), r"history\[0\].val must be an object, got list"),
        (
            lambda d: d["history"][0].update(diagnostics={"B/a": "big"}),
            r"history\[0\].diagnostics.B/a must be a number or null, got 'big'",
        ),
        (lambda d: d["config"].update(deep=json.loads("[" * 40 + "]" * 40)), r"nested deeper than 32 levels"),
        (lambda d: d.update(status=["ok"]), r"status must be one of .*got \['ok'\]"),
        (lambda d: d.update(task={"cls": 1}), r"task must be one of"),
        (
            lambda d: d.update(status="diverged"),
            r"a diverged row needs a divergence object with a reason string",
        ),
        (
            lambda d: d.update(status="diverged", divergence={"reason": "x", "step": 1.5}),
            r"divergence.step must be an integer or null, got 1.5",
        ),
        (lambda d: d.update(status="unsupported", reason=["no"]), r"reason must be a string, got list"),
    ],
)
def test_row_schema_limits_types_and_depth(mutate, reason):
    data = make_row("joint", "food101", 1, {"acc": 0.9})
    mutate(data)
    with pytest.raises(ResultError, match=reason):
        ResultRow.from_dict(data)


def test_reading_a_row_too_deep_for_the_parser_names_it(tmp_path):
    path = tmp_path / "0123456789ab.json"
    path.write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(ResultError, match=rf"{path}: malformed row: JSON nested too deep to read"):
        read_row(path)
    loaded = load_rows(tmp_path)
    assert loaded.rows == () and "nested too deep" in loaded.problems[0].reason


def test_diverged_row_round_trip(tmp_path):
    row = make_row("joint", "food101", 0, status="ok", test={"acc": 0.5})
    row.update(
        status="diverged", metrics={}, cost={}, divergence={"step": 3, "epoch": 0, "reason": "loss 1e30"}
    )
    back = read_row(write_row(tmp_path, row))
    assert back.status == "diverged" and back.data["divergence"]["step"] == 3
    assert aggregate([back]) == {}  # no metrics: never averaged
