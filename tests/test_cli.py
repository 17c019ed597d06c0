"""The ``mmbalance`` CLI: every subcommand, ``--help``, and one-line errors for bad input (exit 2)."""

from __future__ import annotations

import json
import sys
import textwrap

import pytest
import torch

from mmbalance.balancer import Balancer
from mmbalance.cli import COMMANDS, build_parser, main
from mmbalance.methods import METHODS, register_method
from mmbalance.results import load_rows, write_row
from tests.result_rows import make_row

TINY = [
    "--set",
    "epochs=1",
    "--set",
    "cost_steps=2",
    "--set",
    "cost_warmup=1",
    "--set",
    "n_train=64",
    "--set",
    "n_val=32",
    "--set",
    "n_test=32",
]


def _user_error(capsys, argv, *fragments):
    """Run ``argv``; assert exit 2 with one ``mmbalance: error:`` line containing ``fragments``."""
    code = main(argv)
    out, err = capsys.readouterr()
    assert code == 2, (out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mmbalance: error: "), err
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


@pytest.mark.parametrize("command", ["list", "run", "matrix", "table", "show"])
def test_each_subcommand_has_help(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    assert f"usage: mmbalance {command}" in capsys.readouterr().out


def test_adding_a_subcommand_is_one_function(capsys):
    def _add_hello(sub):
        p = sub.add_parser("hello", help="say hello")
        p.set_defaults(func=lambda args: print("hello") or 0)

    COMMANDS.append(_add_hello)
    try:
        assert main(["hello"]) == 0
        assert capsys.readouterr().out == "hello\n"
        assert "hello" in build_parser().format_help()
    finally:
        COMMANDS.remove(_add_hello)


# -- list ------------------------------------------------------------------------------------------
def test_list_filters(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    assert "methods:" in out and "datasets:" in out and "models:" in out
    assert "joint" in out and "synthetic_seg4" in out and "Single-modality training" in out
    assert main(["list", "synthetic_*", "--kind", "datasets", "--task", "reg"]) == 0
    out = capsys.readouterr().out
    assert "synthetic_reg3" in out and "synthetic_cls2" not in out and "methods:" not in out
    assert main(["list", "--kind", "datasets", "--modalities", "4"]) == 0
    out = capsys.readouterr().out
    assert "synthetic_seg4" in out and "synthetic_cls3" not in out
    assert main(["list", "nothing_like_this*", "--kind", "methods"]) == 0
    assert "(none match)" in capsys.readouterr().out


def test_list_shows_broken_plugin(tmp_path, monkeypatch, capsys):
    (tmp_path / "broken_cli_plugin.py").write_text("raise ImportError('needs a missing package')\n")
    info = tmp_path / "broken_cli-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: broken_cli\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text("[mmbalance.methods]\nbroken_cli = broken_cli_plugin\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(METHODS, "_plugins_loaded", False)
    try:
        assert main(["list", "--kind", "methods"]) == 0
        line = next(ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("broken_cli"))
        assert "BROKEN" in line and "needs a missing package" in line
        _user_error(
            capsys, ["run", "broken_cli", "synthetic_cls2"], "plugin 'broken_cli'", "failed to import"
        )
    finally:
        METHODS.unregister("broken_cli")
        sys.modules.pop("broken_cli_plugin", None)


# -- run / show / table ----------------------------------------------------------------------------
def test_run_show_table(tmp_path, capsys):
    out_dir = tmp_path / "runs"
    assert (
        main(
            [
                "run",
                "unimodal",
                "synthetic_cls2",
                *TINY,
                "--set",
                "modality=weak",
                "--seed",
                "3",
                "--device",
                "cpu",
                "--out",
                str(out_dir),
                "-q",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert out.startswith("unimodal[weak] on synthetic_cls2, seed 3 (run ")
    assert "acc" in out and "f1_weighted" in out and "row written to" in out
    rows = load_rows(out_dir).rows
    assert len(rows) == 1
    row = rows[0]
    assert row.status == "ok" and row.seed == 3 and row.label == "unimodal[weak]"
    assert row.command.startswith("mmbalance run unimodal synthetic_cls2 --set epochs=1")
    assert set(row.cost) >= {
        "step_ms_median",
        "step_ms_iqr",
        "step_time_ratio",
        "peak_mem_bytes",
        "mem_overhead_bytes",
    }
    assert set(row.env) >= {"device", "torch", "mmbalance", "git_commit", "dirty"}

    assert main(["show", row.run_id[:6], "--out", str(out_dir)]) == 0
    shown = capsys.readouterr().out
    assert shown.startswith(f"run {row.run_id}: unimodal[weak] on synthetic_cls2 (cls), seed 3: OK")
    assert (
        "method.modality" in shown
        and "'weak'" in shown
        and "history:" in shown
        and "step_time_ratio" in shown
    )
    assert main(["show", str(out_dir / f"{row.run_id}.json")]) == 0
    assert capsys.readouterr().out == shown

    assert main(["table", str(out_dir)]) == 0
    table = capsys.readouterr().out
    assert "| unimodal[weak] |" in table
    assert "synthetic_cls2 acc ↑" in table and " (1) |" in table
    for fmt in ("latex", "csv"):
        assert main(["table", str(out_dir), "--format", fmt, "--split", "val", "--layout", "paper"]) == 0
        assert capsys.readouterr().out


def test_matrix_command_prints_tables_and_records_failures(tmp_path, capsys):
    @register_method("test_nan_loss")
    class NanLoss(Balancer):
        tasks = frozenset({"cls"})
        paper = "test method: a NaN loss"

        def loss_terms(self, output, batch, task):
            return {"task": task.loss(output.prediction, batch["target"]) * torch.nan}

    @register_method("test_raises")
    class Raises(Balancer):
        tasks = frozenset({"reg"})
        paper = "test method: raises in its first step"

        def loss_terms(self, output, batch, task):
            raise RuntimeError("boom in a step")

    spec = tmp_path / "m.toml"
    spec.write_text(
        textwrap.dedent("""
        methods = ["joint", "test_nan_loss", "test_raises"]
        datasets = ["synthetic_cls2", "synthetic_reg3"]
        seeds = [0]
        [overrides]
        epochs = 1
        cost_steps = 2
        cost_warmup = 1
        "dataset.n_train" = 64
        "dataset.n_val" = 32
        "dataset.n_test" = 32
    """)
    )
    try:
        code = main(["matrix", str(spec), "--out", str(tmp_path / "out"), "--device", "cpu"])
    finally:
        METHODS.unregister("test_nan_loss")
        METHODS.unregister("test_raises")
    out, err = capsys.readouterr()
    assert code == 1  # a run failed
    assert "6 runs: 2 ok, 2 unsupported, 1 failed, 1 diverged; 0 already done" in err
    assert "diverged in" in err and "loss term 'task' is nan at step 0" in err
    assert "RuntimeError: boom in a step" in err

    def cells(table: str) -> dict[str, list[str]]:
        rows = [ln.split("|") for ln in table.splitlines()]
        return {cols[1].strip(): [c.strip() for c in cols[2:-1]] for cols in rows}

    # wider than 100 characters: one table per dataset, metric tables first
    tables = [cells(t) for t in out.split("\n\n") if t.startswith("| method")]
    assert tables[0]["test_nan_loss"] == ["div", "div"] and tables[1]["test_nan_loss"] == ["-", "-", "-"]
    assert tables[0]["test_raises"] == ["-", "-"] and tables[1]["test_raises"] == ["x", "x", "x"]
    assert "div test_nan_loss on synthetic_cls2, seed 0" in out and "diverged: loss term 'task' is nan" in out
    assert "Cost against joint" in out
    assert (
        main(["matrix", str(spec), "--out", str(tmp_path / "out"), "--shard", "1/2", "--no-tables", "-q"])
        == 2
    )
    assert "unknown method 'test_nan_loss'" in capsys.readouterr().err


# -- bad input: one line, exit 2 -------------------------------------------------------------------
def test_unknown_names(capsys):
    _user_error(capsys, ["run", "cgmm", "synthetic_cls2"], "unknown method 'cgmm'", "Did you mean 'cggm'")
    _user_error(capsys, ["run", "joint", "synthetic_cls5"], "unknown dataset 'synthetic_cls5'", "Available:")
    _user_error(
        capsys,
        ["run", "joint", "synthetic_cls2", "--model", "resnet"],
        "unknown model 'resnet'",
        "Available:",
    )
    _user_error(
        capsys, ["run", "joint", "synthetic_cls2", "--preset", "imagenet"], "unknown preset 'imagenet'"
    )


def test_unknown_key_and_out_of_range(capsys):
    _user_error(
        capsys,
        ["run", "joint", "synthetic_cls2", "--set", "epoch=1"],
        "unknown config key 'epoch'",
        "did you mean 'epochs'",
    )
    _user_error(
        capsys, ["run", "joint", "synthetic_cls2", "--set", "lr=-1"], "lr must be > 0 and finite, got -1"
    )
    _user_error(capsys, ["run", "cggm", "synthetic_cls2", "--set", "rho=-2"], "rho")


def test_unsupported_task(capsys):
    @register_method("test_seg_only_cli")
    class SegOnly(Balancer):
        tasks = frozenset({"seg"})

    try:
        _user_error(
            capsys,
            ["run", "test_seg_only_cli", "synthetic_cls2"],
            "method 'test_seg_only_cli' supports tasks ['seg']",
            "dataset 'synthetic_cls2' is task 'cls'",
        )
    finally:
        METHODS.unregister("test_seg_only_cli")


def test_malformed_options(tmp_path, capsys):
    spec = tmp_path / "m.toml"
    spec.write_text('methods = ["joint"]\ndatasets = ["synthetic_cls2"]\nseeds = [0]\n')
    _user_error(capsys, ["matrix", str(spec), "--shard", "3/2"], "--shard must be K/N", "got '3/2'")
    _user_error(capsys, ["matrix", str(spec), "--shard", "x"], "--shard must be K/N")
    _user_error(capsys, ["matrix", str(spec), "--set", "epochs"], "--set expects key=value", "got 'epochs'")
    _user_error(capsys, ["run", "joint", "synthetic_cls2", "--set", "=1"], "--set expects key=value")
    _user_error(capsys, ["matrix", str(tmp_path / "missing.toml")], "missing.toml", "cannot be read")
    _user_error(
        capsys,
        ["run", "joint", "synthetic_cls2", "--device", "tpu"],
        "device must be 'auto', 'cpu' or 'cuda[:N]', got 'tpu'",
    )
    _user_error(
        capsys,
        ["run", "joint", "synthetic_cls2", "--data-root", str(tmp_path)],
        "--data-root given",
        "reads no files",
    )
    with pytest.raises(SystemExit) as exit_info:  # argparse's own checks: usage + exit 2
        main(["run", "joint", "synthetic_cls2", "--seed", "-1"])
    assert exit_info.value.code == 2 and "--seed must be an integer >= 0" in capsys.readouterr().err


def test_table_reports_corrupt_json_and_goes_on(tmp_path, capsys):
    write_row(tmp_path, make_row("joint", "food101", 0, {"acc": 0.9, "f1_weighted": 0.8}))
    full = json.dumps(make_row("joint", "food101", 1, {"acc": 0.7}))
    (tmp_path / "0123456789ab.json").write_text(full[:40])
    assert main(["table", str(tmp_path)]) == 0
    out, err = capsys.readouterr()
    assert "| joint " in out and "90.00 (1)" in out
    assert err.startswith("mmbalance: warning: skipped ") and "0123456789ab.json: truncated JSON" in err
    _user_error(capsys, ["table", str(tmp_path / "none")], "does not exist")
    empty = tmp_path / "empty"
    empty.mkdir()
    _user_error(capsys, ["table", str(empty)], "no result rows in")
    (tmp_path / "0123456789ab.json").unlink()
    _user_error(capsys, ["table", str(tmp_path), "--metrics", "acc,bogus"], "unknown metric(s) 'bogus'")


def test_show_errors(tmp_path, capsys):
    _user_error(capsys, ["show", "abc123", "--out", str(tmp_path)], "no result file or run id 'abc123'")
    write_row(tmp_path, make_row("joint", "food101", 0, {"acc": 0.9}))
    write_row(tmp_path, make_row("joint", "food101", 1, {"acc": 0.9}))
    _user_error(capsys, ["show", "", "--out", str(tmp_path)], "ambiguous")
    _user_error(capsys, ["show", "abc", "--out", str(tmp_path / "none")], "does not exist")
    bad = tmp_path / "bad.json"
    bad.write_text("{")
    _user_error(capsys, ["show", str(bad)], "bad.json: truncated JSON")
