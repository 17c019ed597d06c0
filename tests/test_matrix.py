"""Matrix runner: spec parsing, expansion, shards, --set, resume, failures, and SIGKILL + resume."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from mmbalance.balancer import Balancer
from mmbalance.config import format_set, parse_set
from mmbalance.errors import ConfigError, RegistryError
from mmbalance.matrix import (
    load_spec,
    parse_shard,
    parse_spec,
    plan_matrix,
    select_shard,
)
from mmbalance.matrix_run import run_matrix
from mmbalance.methods import METHODS, register_method
from mmbalance.resolve import ResolvedRun
from mmbalance.results import PLAN_DIR, load_plan, load_rows
from mmbalance.tables import metric_table
from tests.processes import sigkill, wait_for

ROOT = Path(__file__).resolve().parents[1]
TINY = {
    "epochs": 1,
    "cost_steps": 2,
    "cost_warmup": 1,
    "dataset.n_train": 96,
    "dataset.n_val": 48,
    "dataset.n_test": 48,
}


def _spec(**extra):
    data = {
        "methods": ["joint", "unimodal"],
        "datasets": ["synthetic_cls2", "synthetic_reg3"],
        "seeds": [0, 1],
    }
    data.update(extra)
    return parse_spec(data, "test.toml")


@pytest.fixture
def seg_only():
    @register_method("test_seg_only")
    class SegOnly(Balancer):
        tasks = frozenset({"seg"})
        paper = "test method: segmentation only"

    yield "test_seg_only"
    METHODS.unregister("test_seg_only")


class FakeRun:
    """Stands in for run_one: records calls, returns a valid row, fails for chosen labels."""

    def __init__(self, fail=(), interrupt=()):
        self.calls: list[str] = []
        self.fail, self.interrupt = set(fail), set(interrupt)

    def __call__(self, resolved, *, device, quiet, command, checkpoint=None):
        assert isinstance(resolved, ResolvedRun)  # the plan's resolution is used, not redone
        self.calls.append(resolved.run_id)
        if resolved.label in self.interrupt:
            raise KeyboardInterrupt
        if resolved.label in self.fail:
            raise RuntimeError(f"boom in {resolved.label}")
        metric = {"cls": "acc", "reg": "mae", "seg": "dice_mean"}[resolved.task]
        return {
            "run_id": resolved.run_id,
            "status": "ok",
            "method": resolved.method,
            "label": resolved.label,
            "dataset": resolved.dataset,
            "task": resolved.task,
            "seed": resolved.seed,
            "config": resolved.config,
            "metrics": {"val": {metric: 0.5}, "test": {metric: 0.25 + resolved.seed}, "best_epoch": 0},
            "history": [],
            "cost": {},
            "env": {"device": str(device)},
            "command": command,
        }


# -- parsing ---------------------------------------------------------------------------------------
def test_load_spec_flattens_nested_overrides(tmp_path):
    path = tmp_path / "m.toml"
    path.write_text(
        'methods = ["joint", "cggm"]\ndatasets = ["synthetic_cls2"]\nseeds = [0, 1]\n'
        '[overrides]\nepochs = 2\nmodel.hidden = 16\n"dataset.n_train" = 64\n'
        "[method_overrides.cggm]\nrho = 1.2\n[dataset_overrides.synthetic_cls2]\ntrain.lr = 0.01\n"
    )
    spec = load_spec(path)
    assert spec.methods == ("joint", "cggm") and spec.seeds == (0, 1) and spec.device == "auto"
    assert spec.overrides == {"epochs": 2, "model.hidden": 16, "dataset.n_train": 64}
    assert spec.method_overrides == {"cggm": {"rho": 1.2}}
    assert spec.dataset_overrides == {"synthetic_cls2": {"train.lr": 0.01}}


@pytest.mark.parametrize(
    "data, message",
    [
        (
            {"methods": ["joint"], "datasets": ["d"], "seeds": [0], "seed": 1},
            r"unknown key\(s\) 'seed'; valid keys: methods",
        ),
        ({"datasets": ["d"], "seeds": [0]}, r"'methods' must be a non-empty list of names, got None"),
        (
            {"methods": ["joint", "joint"], "datasets": ["d"], "seeds": [0]},
            r"'methods' lists 'joint' more than once",
        ),
        ({"methods": ["joint"], "datasets": ["d"], "seeds": [0, 0]}, r"'seeds' lists a seed more than once"),
        (
            {"methods": ["joint"], "datasets": ["d"], "seeds": [-1]},
            r"'seeds' must be a non-empty list of integers >= 0, got \[-1\]",
        ),
        (
            {"methods": ["joint"], "datasets": ["d"], "seeds": [0], "method_overrides": {"cggm": {"rho": 1}}},
            r"\[method_overrides.cggm\] names 'cggm', which is not in methods \(joint\)",
        ),
        (
            {"methods": ["joint"], "datasets": ["d"], "seeds": [0], "overrides": {"a": {"b": {"c": 1}}}},
            "nests too deep",
        ),
    ],
)
def test_parse_spec_rejects_bad_specs(data, message):
    with pytest.raises(ConfigError, match=message):
        parse_spec(data, "bad.toml")


def test_load_spec_missing_and_malformed(tmp_path):
    with pytest.raises(ConfigError, match="cannot be read"):
        load_spec(tmp_path / "none.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("methods = [joint\n")
    with pytest.raises(ConfigError, match=r"is not valid TOML: .*line 1"):
        load_spec(bad)


@pytest.mark.parametrize(
    "text, expected", [("1/1", (1, 1)), ("2/4", (2, 4)), (" 3 / 3 ", (3, 3)), (None, None)]
)
def test_parse_shard(text, expected):
    assert parse_shard(text) == expected


@pytest.mark.parametrize("text", ["0/3", "4/3", "1/0", "a/b", "1-3", "", "2", "1/2/3", "-1/2"])
def test_parse_shard_malformed(text):
    with pytest.raises(ConfigError, match=rf"--shard must be K/N with integers 1 <= K <= N .*got {text!r}"):
        parse_shard(text)


def test_shards_partition_the_plan():
    runs = plan_matrix(_spec(), set_overrides=TINY)
    ids = [r.run_id for r in runs]
    for n in (1, 2, 3, 5, len(ids)):
        parts = [[r.run_id for r in select_shard(runs, (k, n))] for k in range(1, n + 1)]
        flat = [i for p in parts for i in p]
        assert sorted(flat) == sorted(ids) and len(set(flat)) == len(flat)  # a partition: no overlap
        assert max(map(len, parts)) - min(map(len, parts)) <= 1  # balanced
    n = len(ids) + 2  # more shards than runs: the first len(ids) get one run each, K beyond is an error
    assert [len(select_shard(runs, (k, n))) for k in range(1, len(ids) + 1)] == [1] * len(ids)
    with pytest.raises(ConfigError, match=rf"--shard {n}/{n} selects no run: the matrix has {len(ids)} run"):
        select_shard(runs, (n, n))


def test_parse_set_values_and_round_trip():
    got = parse_set(
        [
            "epochs=3",
            "lr=1e-3",
            "deterministic=false",
            "modality=text",
            'name="two words"',
            "root=/data/mosi",
            "ids=[1, 2]",
            "method.rho=1.2",
            "epochs=4",
        ]
    )
    assert got == {
        "epochs": 4,
        "lr": 1e-3,
        "deterministic": False,
        "modality": "text",
        "name": "two words",
        "root": "/data/mosi",
        "ids": [1, 2],
        "method.rho": 1.2,
    }
    for key, value in got.items():
        arg = format_set(key, value)
        unquoted = subprocess.run(["sh", "-c", f"printf %s {arg}"], capture_output=True, text=True).stdout
        assert parse_set([unquoted]) == {key: value}
    assert parse_set(["flag=true"]) == {"flag": True}
    assert parse_set(['s="true"']) == {"s": "true"}
    assert format_set("s", "true") == "'s=\"true\"'"  # a string that looks like a bool stays a string


@pytest.mark.parametrize(
    "item, message",
    [
        ("epochs", r"--set expects key=value \(e.g. --set epochs=3\); got 'epochs'"),
        ("=3", "--set expects key=value"),
        ("epochs=", "--set expects key=value"),
        ("1x=3", r"--set key must be a config field, optionally prefixed .*got '1x'"),
        ("a.b.c=3", "--set key must be a config field"),
        ("name=two words", r"--set value in 'name=two words' is not a TOML value"),
        ("t={a = 1}", "must be a scalar or an array, not a table"),
    ],
)
def test_parse_set_malformed(item, message):
    with pytest.raises(ConfigError, match=message):
        parse_set([item])


# -- planning --------------------------------------------------------------------------------------
def test_plan_expands_unimodal_per_modality_seed_major():
    runs = plan_matrix(_spec(), set_overrides=TINY)
    labels = [(r.seed, r.dataset, r.label) for r in runs]
    per_seed = [
        ("synthetic_cls2", "joint"),
        ("synthetic_cls2", "unimodal[strong]"),
        ("synthetic_cls2", "unimodal[weak]"),
        ("synthetic_reg3", "joint"),
        ("synthetic_reg3", "unimodal[text]"),
        ("synthetic_reg3", "unimodal[audio]"),
        ("synthetic_reg3", "unimodal[vision]"),
    ]
    assert labels == [(s, d, lb) for s in (0, 1) for d, lb in per_seed]
    assert len({r.run_id for r in runs}) == len(runs)
    assert all(r.resolved is not None and r.resolved.config["train"]["epochs"] == 1 for r in runs)
    cmd = runs[1].command()
    assert (
        cmd.startswith("mmbalance run unimodal synthetic_cls2 --seed 0 ") and "--set modality=strong" in cmd
    )


def test_plan_override_precedence_and_fixed_modality():
    spec = _spec(
        overrides={"epochs": 3},
        dataset_overrides={"synthetic_reg3": {"epochs": 4}},
        method_overrides={"unimodal": {"modality": "text"}},
        datasets=["synthetic_reg3"],
    )
    runs = plan_matrix(spec)
    assert [r.label for r in runs if r.seed == 0] == ["joint", "unimodal[text]"]
    assert {r.resolved.config["train"]["epochs"] for r in runs} == {4}  # dataset table beats [overrides]
    assert {r.resolved.config["train"]["epochs"] for r in plan_matrix(spec, set_overrides={"epochs": 5})} == {
        5
    }
    wrong = _spec(method_overrides={"unimodal": {"modality": "strong"}}, datasets=["synthetic_reg3"])
    with pytest.raises(
        ConfigError, match=r"override modality='strong' for method 'unimodal', but dataset 'synthetic_reg3'"
    ):
        plan_matrix(wrong)
    with pytest.raises(ConfigError, match=r"joint on synthetic_reg3, seed 0: unknown config key 'modality'"):
        plan_matrix(
            spec, set_overrides={"modality": "text"}
        )  # --set reaches every run, joint has no modality


def test_plan_unsupported_cells_are_planned_not_resolved(seg_only):
    runs = plan_matrix(_spec(methods=["joint", seg_only], seeds=[0]), set_overrides=TINY)
    unsupported = [r for r in runs if r.resolved is None]
    assert [(r.label, r.dataset, r.task) for r in unsupported] == [
        (seg_only, "synthetic_cls2", "cls"),
        (seg_only, "synthetic_reg3", "reg"),
    ]
    assert "supports tasks ['seg']" in unsupported[0].unsupported_reason


def test_plan_errors_name_the_run():
    with pytest.raises(RegistryError, match=r"unknown method 'jiont'.*Did you mean 'joint'"):
        plan_matrix(_spec(methods=["jiont"]))
    with pytest.raises(RegistryError, match="unknown dataset 'synthetic_cls9'"):
        plan_matrix(_spec(datasets=["synthetic_cls9"]))
    with pytest.raises(
        ConfigError,
        match=r"test.toml: joint on synthetic_cls2, seed 0: unknown config key 'epoch'.*"
        r"did you mean 'epochs'",
    ):
        plan_matrix(_spec(), set_overrides={"epoch": 1})
    with pytest.raises(
        ConfigError,
        match=r"joint on synthetic_cls2, seed 0: invalid config for training: "
        r"epochs must be an integer >= 1, got 0",
    ):
        plan_matrix(_spec(), set_overrides={"epochs": 0})
    with pytest.raises(ConfigError, match="device must be 'auto', 'cpu' or 'cuda"):
        run_matrix(_spec(), "unused", device="tpu", run_fn=FakeRun())


# -- running ---------------------------------------------------------------------------------------
def test_run_resume_failures_and_retries(tmp_path, seg_only):
    spec = _spec(methods=["joint", "unimodal", seg_only], datasets=["synthetic_cls2"], seeds=[0, 1])
    first = FakeRun(fail={"unimodal[weak]"})
    report = run_matrix(spec, tmp_path, set_overrides=TINY, device="cpu", quiet=True, run_fn=first)
    assert report.planned == report.selected == 8
    assert report.counts == {"ok": 4, "failed": 2, "unsupported": 2}
    assert len(first.calls) == 6  # unsupported cells never train
    loaded = load_rows(tmp_path)
    assert loaded.problems == () and len(loaded.rows) == 8
    failed = [r for r in loaded.rows if r.status == "failed"]
    assert {r.label for r in failed} == {"unimodal[weak]"}
    assert (
        failed[0].error["type"] == "RuntimeError" and "boom in unimodal[weak]" in failed[0].error["traceback"]
    )
    assert failed[0].command.startswith("mmbalance run unimodal synthetic_cls2 --seed")
    unsupported = [r for r in loaded.rows if r.status == "unsupported"]
    assert {r.label for r in unsupported} == {seg_only} and "supports tasks" in unsupported[0].data["reason"]
    plan, _ = load_plan(tmp_path)
    assert len(plan.cells) == 8 and len(list((tmp_path / PLAN_DIR).iterdir())) == 1

    mtimes = {p.name: p.stat().st_mtime_ns for p in tmp_path.glob("*.json")}
    corrupt = next(r for r in loaded.rows if r.status == "ok")
    (tmp_path / f"{corrupt.run_id}.json").write_text('{"run_id": "trunc')
    second = FakeRun()
    report = run_matrix(spec, tmp_path, set_overrides=TINY, device="cpu", quiet=True, run_fn=second)
    failed_ids = {r.run_id for r in failed}
    assert set(second.calls) == failed_ids | {corrupt.run_id}  # failed retried, corrupt re-run, rest skipped
    assert report.counts == {"ok": 6, "unsupported": 2} and report.skipped == 5
    for p in tmp_path.glob("*.json"):
        if p.stem not in failed_ids | {corrupt.run_id}:
            assert p.stat().st_mtime_ns == mtimes[p.name]
    assert all(r.status != "failed" for r in load_rows(tmp_path).rows)
    third = FakeRun()
    run_matrix(spec, tmp_path, set_overrides=TINY, device="cpu", quiet=True, run_fn=third)
    assert third.calls == []  # everything done


def test_shards_write_disjoint_runs_into_one_folder(tmp_path):
    spec = _spec(seeds=[0])
    calls = []
    for k in (1, 2, 3):
        fake = FakeRun()
        run_matrix(spec, tmp_path, shard=(k, 3), set_overrides=TINY, device="cpu", quiet=True, run_fn=fake)
        calls.append(fake.calls)
    flat = [i for c in calls for i in c]
    assert len(flat) == len(set(flat)) == 7 and len(load_rows(tmp_path).rows) == 7


def test_keyboard_interrupt_stops_without_recording(tmp_path):
    fake = FakeRun(interrupt={"unimodal[weak]"})
    with pytest.raises(KeyboardInterrupt):
        run_matrix(
            _spec(datasets=["synthetic_cls2"], seeds=[0]),
            tmp_path,
            set_overrides=TINY,
            device="cpu",
            quiet=True,
            run_fn=fake,
        )
    assert sorted(r.label for r in load_rows(tmp_path).rows) == ["joint", "unimodal[strong]"]


def test_progress_lines(tmp_path, capsys):
    spec = _spec(datasets=["synthetic_cls2"], seeds=[0])
    run_matrix(spec, tmp_path, set_overrides=TINY, device="cpu", run_fn=FakeRun(fail={"joint"}))
    err = capsys.readouterr().err.splitlines()
    assert (
        err[0].startswith("[1/3] joint on synthetic_cls2, seed 0 (")
        and "failed in" in err[0]
        and "RuntimeError: boom" in err[0]
    )
    assert "ok in" in err[1] and err[1].endswith("test acc 25.00%")
    run_matrix(spec, tmp_path, set_overrides=TINY, device="cpu", run_fn=FakeRun())
    err = capsys.readouterr().err.splitlines()
    # runs already done are reported first, then the runs that train, in plan order
    assert err[0].startswith("[2/3] unimodal[strong]") and err[0].endswith("ok, already done")
    assert err[2].startswith("[1/3] joint") and "retrying failed run, ok in" in err[2]
    run_matrix(spec, tmp_path, set_overrides=TINY, device="cpu", quiet=True, run_fn=FakeRun())
    assert capsys.readouterr().err == ""


def test_run_id_mismatch_is_a_bug(tmp_path):
    def wrong(spec, **kw):
        row = FakeRun()(spec, **kw)
        row["run_id"] = "0" * 12
        return row

    with pytest.raises(RuntimeError, match="run ids must not depend"):
        run_matrix(_spec(seeds=[0]), tmp_path, set_overrides=TINY, device="cpu", quiet=True, run_fn=wrong)


# -- acceptance: SIGKILL mid-run, resume, same table as an uninterrupted run -----------------------------
def _matrix_cmd(spec: Path, out: Path) -> list[str]:
    code = "import sys; from mmbalance.cli import main; sys.exit(main(sys.argv[1:]))"
    return [
        sys.executable,
        "-c",
        code,
        "matrix",
        str(spec),
        "--out",
        str(out),
        "--device",
        "cpu",
        "--no-tables",
    ]


def _env() -> dict[str, str]:
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    return env


def test_sigkill_then_resume_matches_uninterrupted(tmp_path):
    spec = tmp_path / "tiny.toml"
    spec.write_text(
        'methods = ["joint", "unimodal"]\ndatasets = ["synthetic_cls2"]\nseeds = [0, 1, 2]\n'
        "[overrides]\nepochs = 2\ncost_steps = 2\ncost_warmup = 1\n"
        "dataset.n_train = 256\ndataset.n_val = 64\ndataset.n_test = 64\n"
    )
    out, ref = tmp_path / "out", tmp_path / "ref"
    # The uninterrupted reference runs alongside (results do not depend on timing or load).
    reference = subprocess.Popen(
        _matrix_cmd(spec, ref), env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    proc = subprocess.Popen(
        _matrix_cmd(spec, out), env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    wait_for(lambda: list(out.glob("*.json")), proc, "a finished run", timeout=120, poll=0.005)
    sigkill(proc)
    done = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in out.glob("*.json")}
    assert 1 <= len(done) < 9, f"kill should land mid-matrix, {len(done)} of 9 runs were done"

    resumed = subprocess.run(_matrix_cmd(spec, out), env=_env(), capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert resumed.stderr.count("ok, already done") == len(done)
    for name, (mtime, content) in done.items():  # finished runs were not redone
        assert (out / name).stat().st_mtime_ns == mtime and (out / name).read_bytes() == content

    _, ref_err = reference.communicate(timeout=300)
    assert reference.returncode == 0, ref_err
    a, b = load_rows(out), load_rows(ref)
    assert a.problems == b.problems == () and len(a.rows) == len(b.rows) == 9
    assert {r.run_id: r.metrics["test"] for r in a.rows} == {r.run_id: r.metrics["test"] for r in b.rows}
    table_a = metric_table(a.rows, plan=load_plan(out)[0])
    assert table_a == metric_table(b.rows, plan=load_plan(ref)[0])
    cells = [c.strip() for line in table_a.splitlines() if line.startswith("| ") for c in line.split("|")]
    assert "..." not in cells and "x" not in cells and cells.count("joint") == 1
    assert all(r.command.startswith("mmbalance run ") for r in a.rows)  # each row says how to redo it alone
