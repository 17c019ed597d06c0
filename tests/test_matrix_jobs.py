"""``mmbalance matrix --jobs N``: worker processes that share a matrix through its claims."""

from __future__ import annotations

import os
import textwrap

import pytest

from mmbalance.cli import main
from mmbalance.errors import ConfigError
from mmbalance.matrix_jobs import RUNS_PER_JOB, _settle, parse_jobs, resolve_jobs, usable_cores, worker_argv
from mmbalance.matrix_run import CLAIMED, MatrixReport
from mmbalance.results import load_rows


def test_parse_and_resolve_jobs():
    assert parse_jobs("auto") == "auto" and parse_jobs("3") == 3
    for bad in ("0", "-1", "two", "1.5"):
        with pytest.raises(ConfigError, match=f"--jobs must be 'auto' or an integer >= 1, got '{bad}'"):
            parse_jobs(bad)
    assert resolve_jobs(3, "local", "cpu", 0) == 3  # a number is taken as given
    # auto on the CPU: one job per RUNS_PER_JOB runs left, at most one per usable core
    assert resolve_jobs("auto", "local", "cpu", 0) == 1
    assert resolve_jobs("auto", "local", "cpu", RUNS_PER_JOB) == 1
    assert resolve_jobs("auto", "local", "cpu", RUNS_PER_JOB + 1) == min(2, usable_cores())
    assert resolve_jobs("auto", "local", "cpu", 10**6) == usable_cores()
    assert resolve_jobs("auto", "local", "cuda", 10**6) == 1  # one device
    assert resolve_jobs("auto", "ray", None, 10**6) == 1  # Ray places the runs
    with pytest.raises(ConfigError, match="--jobs 2 applies to --executor local"):
        resolve_jobs(2, "ray", None, 10)


def test_worker_argv_is_the_command_quiet_without_tables_and_one_job():
    argv = [
        "--threads", "1", "matrix", "s.toml", "--jobs", "4", "-q", "--out", "o", "--no-tables", "--jobs=2",
    ]
    assert worker_argv(argv) == [
        "--threads", "1", "matrix", "s.toml", "--out", "o", "--jobs", "1", "--quiet", "--no-tables",
    ]


def test_runs_claimed_by_other_workers_are_counted_from_the_final_pass(tmp_path):
    class Run:
        def __init__(self, run_id):
            self.run_id = run_id

    a, b, c, d, e = Run("a"), Run("b"), Run("c"), Run("d"), Run("e")
    first = MatrixReport(tmp_path, 5, 5, [
        (a, "ok", True), (b, "ok", False), (c, CLAIMED, True), (d, CLAIMED, True), (e, "ok", True),
    ])
    final = MatrixReport(tmp_path, 5, 5, [
        (a, "ok", True), (b, "ok", True), (c, "failed", True), (d, "ok", False), (e, "ok", True),
    ])
    settled = _settle(first, final, pending={"b", "c", "d", "e"})
    # done before the command: skipped; done by this worker, by another (e: done meanwhile, found
    # before this worker could claim it), or left by a dead one and trained in the final pass: not
    assert settled.outcomes == [
        (a, "ok", True), (b, "ok", False), (c, "failed", False), (d, "ok", False), (e, "ok", False),
    ]
    assert settled.summary().startswith("5 runs: 4 ok, 0 unsupported, 1 failed; 1 already done")


def test_two_jobs_train_the_matrix_once_and_report_every_run(tmp_path, capsys):
    spec = tmp_path / "m.toml"
    spec.write_text(textwrap.dedent("""
        methods = ["joint", "mrd", "ogm_ge"]
        datasets = ["synthetic_cls2", "synthetic_cls3"]
        seeds = [0, 1]
        device = "cpu"
        [overrides]
        epochs = 1
        cost_steps = 2
        cost_warmup = 1
        "dataset.n_train" = 256
        "dataset.n_val" = 64
        "dataset.n_test" = 64
    """))
    out = tmp_path / "out"
    assert main(["matrix", str(spec), "--out", str(out), "--jobs", "2", "--no-tables"]) == 0
    err = capsys.readouterr().err
    assert "12 runs: 12 ok, 0 unsupported, 0 failed; 0 already done" in err
    rows = load_rows(out)
    assert rows.problems == () and len(rows.rows) == 12 and all(r.status == "ok" for r in rows.rows)
    trainers = {r.env["pid"] for r in rows.rows}
    assert os.getpid() in trainers and len(trainers) <= 2  # this process and at most one worker
    assert not list((out / "_claims").iterdir())
    # a second call finds everything done and starts no worker
    assert main(["matrix", str(spec), "--out", str(out), "--jobs", "auto", "--no-tables", "-q"]) == 0
    assert "12 runs: 12 ok, 0 unsupported, 0 failed; 12 already done" in capsys.readouterr().err
