"""``mmbalance bench``: report fields, the epoch the steps run at, and the gate on deliberately changed
test-only plugin methods (extra operator, clone, Python loop over parameters: exact; a sleep: wall clock)."""

from __future__ import annotations

import argparse
import json
import time

import pytest
import torch

from mmbalance.bench import BenchSettings, add_arguments, default_epoch, main, run_bench
from mmbalance.errors import ConfigError
from mmbalance.gate import compare
from mmbalance.methods import METHODS
from mmbalance.methods.joint import Joint

QUICK = BenchSettings(blocks=5, steps=2, warmup=1, signal_steps=2, passes=1)


def _args(*extra):
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    quick = ["--blocks", "5", "--steps", "3", "--warmup", "2", "--passes", "2"]
    return parser.parse_args(["--tasks", "synthetic_cls2", *quick, "--quiet", *extra])


@pytest.fixture
def probe_method():
    """A joint-equivalent method registered for the test, then given extra work on purpose."""

    @METHODS.register("probe_joint")
    class ProbeJoint(Joint):
        paper = "test probe"
        delay_s = 0.0
        extra = ""  # "", "op", "clone", "param_loop"

        def on_after_backward(self, ctx):
            if self.delay_s:
                time.sleep(self.delay_s)
            if self.extra == "op":
                torch.mul(ctx.terms["task"], 1.0)
            elif self.extra == "clone":
                ctx.terms["task"].clone()
            elif self.extra == "param_loop":
                for p in ctx.model.parameters():
                    p.grad.mul_(1.0)

    yield ProbeJoint
    METHODS.unregister("probe_joint")


def test_report_fields_and_table(tmp_path, capsys, probe_method):
    out = tmp_path / "bench.json"
    assert main(_args("--methods", "probe_joint", "--out", str(out))) == 0
    report = json.loads(out.read_text())
    (row,) = report["results"]
    assert row["method"] == "probe_joint" and row["task"] == "synthetic_cls2"
    assert row["mem_overhead_bytes"] == 0 and row["floor"] == pytest.approx(1.0)
    lo, hi = row["ratio_interval"]
    assert len(row["block_ratios"]) == 5 and lo <= row["ratio_vs_joint"] <= hi
    # a joint-equivalent method executes exactly joint's work
    assert row["signals"]["method"] == row["signals"]["joint"] and row["signals"]["steps"] == 2
    assert row["epoch"] == 7  # the synthetic preset's 8 epochs: its last
    assert row["threads"] == 1 and row["threads_rule"]["setting"] == "auto"  # a tiny model: one thread
    assert report["config"] == {
        "blocks": 5, "steps": 3, "warmup": 2, "signal_steps": 2, "passes": 2, "epoch": "default",
        "threads": "auto", "amp": "none", "seed": 0, "method_overrides": {},
    }
    assert row["timed_steps"] == 15  # 5 blocks (3 in the first pass, 2 in the second) of 3 steps
    assert "block_ms" not in row  # raw step times are merged, not reported
    assert {"device", "torch", "threads", "git_commit"} <= set(report["env"])
    text = capsys.readouterr().out
    assert "probe_joint" in text and "ratio vs joint [95% CI]" in text
    assert f"{row['ratio_vs_joint']:.2f} [{lo:.2f}, {hi:.2f}]" in text


@pytest.mark.parametrize(
    "extra, grown",
    [("op", "aten.mul +2"), ("clone", "aten.clone +2"), ("param_loop", "aten.mul_ +")],
)
def test_gate_catches_extra_work_exactly_and_passes_unchanged_code(probe_method, extra, grown):
    base = run_bench(["probe_joint"], ["synthetic_cls2"], settings=QUICK, progress=False)
    same = run_bench(["probe_joint"], ["synthetic_cls2"], settings=QUICK, progress=False)
    assert same["results"][0]["signals"] == base["results"][0]["signals"]  # deterministic
    assert [p for p in compare(base, same) if "ratio_vs_joint" not in p] == []
    probe_method.extra = extra
    changed = run_bench(["probe_joint"], ["synthetic_cls2"], settings=QUICK, progress=False)
    exact = [p for p in compare(base, changed) if "ratio_vs_joint" not in p]
    (problem,) = exact  # operator calls of the method grew; FLOPs and state did not
    assert problem.startswith("probe_joint on synthetic_cls2: method aten_ops over 2 step(s) ")
    assert grown in problem


def test_wall_clock_gate_fails_on_slowed_method(tmp_path, capsys, probe_method):
    base = tmp_path / "base.json"
    assert main(_args("--methods", "probe_joint", "--out", str(base))) == 0
    # Unchanged code passes (a generous threshold: this test runs on loaded shared machines).
    same = tmp_path / "same.json"
    gate = ["--compare", str(base), "--threshold", "1"]
    assert main(_args("--methods", "probe_joint", "--out", str(same), *gate)) == 0
    # A 20 ms sleep per step on a ~1 ms step (x ~20): the lower bound is far above even +100 %.
    probe_method.delay_s = 0.02
    slow = tmp_path / "slow.json"
    rc = main(_args("--methods", "probe_joint", "--out", str(slow), *gate))
    assert rc == 1
    err = capsys.readouterr().err
    assert "probe_joint on synthetic_cls2: ratio_vs_joint" in err and "lower 95% bound is above +100%" in err
    assert "aten_ops" not in err  # sleeping dispatches no operator


def test_methods_are_costed_inside_their_window():
    """ogm (synthetic preset) modulates from epoch 1: at epoch 0 it does less per step than at the
    default epoch (the preset's last), which the operator count shows exactly."""
    inside = run_bench(["ogm"], ["synthetic_cls2"], settings=QUICK, progress=False)["results"][0]
    outside = run_bench(["ogm"], ["synthetic_cls2"], settings=QUICK, epoch=0, progress=False)["results"][0]
    assert inside["epoch"] == 7 and outside["epoch"] == 0
    assert inside["signals"]["method"]["aten_ops"] > outside["signals"]["method"]["aten_ops"]
    assert inside["signals"]["joint"] == outside["signals"]["joint"]  # joint has no window
    with pytest.raises(ConfigError, match="--epoch 8 is past the last epoch \\(7\\) of synthetic_cls2"):
        run_bench(["ogm"], ["synthetic_cls2"], settings=QUICK, epoch=8, progress=False)


def test_blocks_are_split_over_the_passes():
    settings = BenchSettings(blocks=7, passes=3)
    assert [settings.blocks_in_pass(i) for i in range(3)] == [3, 2, 2]


def test_default_epoch():
    class Window:
        modulation_ends = 3

    assert default_epoch(object(), 8) == 7  # no window: the last epoch
    assert default_epoch(Window(), 8) == 3  # the window closes earlier
    assert default_epoch(Window(), 2) == 1


def test_bad_settings_and_compare_file(tmp_path):
    with pytest.raises(ConfigError, match="--blocks must be an integer >= 1, got 0"):
        run_bench(["joint"], ["synthetic_cls2"], settings=BenchSettings(blocks=0), progress=False)
    with pytest.raises(ConfigError, match="--passes must be an integer in \\[1, --blocks\\], got 6"):
        run_bench(["joint"], ["synthetic_cls2"], settings=BenchSettings(blocks=5, passes=6), progress=False)
    with pytest.raises(ConfigError, match="--warmup must be an integer >= 0, got -1"):
        run_bench(["joint"], ["synthetic_cls2"], settings=BenchSettings(warmup=-1), progress=False)
    with pytest.raises(ConfigError, match="--compare: no such file"):
        main(_args("--compare", str(tmp_path / "missing.json")))
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ConfigError, match="is not a mmbalance bench report"):
        main(_args("--compare", str(bad)))


def test_unknown_method_in_bench():
    from mmbalance.errors import RegistryError

    with pytest.raises(RegistryError, match="unknown method"):
        run_bench(["no_such_method"], ["synthetic_cls2"], settings=QUICK, progress=False)


def test_method_overrides_reach_the_method_and_the_report(tmp_path):
    out = tmp_path / "bench.json"
    with pytest.warns(UserWarning, match="side_stream=True has no effect"):  # CPU: nothing to overlap
        sets = ["--set", "side_stream=true", "--set", "method.rho=1.1"]
        assert main(_args("--methods", "cggm", *sets, "--out", str(out))) == 0
    report = json.loads(out.read_text())
    assert report["config"]["method_overrides"] == {"side_stream": True, "rho": 1.1}
    with pytest.raises(ConfigError, match="no_such_field"):
        main(_args("--methods", "cggm", "--set", "no_such_field=1", "--out", str(out)))


def test_initial_models_are_built_once_and_leave_the_rng_as_a_fresh_build(monkeypatch):
    """Every pair of a case starts from the weights and the RNG state that building the model anew
    gives: the cache changes what is drawn afterwards in no way."""
    from mmbalance.bench_cases import InitialModels
    from mmbalance.datasets import DATASETS
    from mmbalance.models import MODELS
    from mmbalance.train import seed_everything

    spec = DATASETS.build("synthetic_cls2").spec
    seed_everything(3)
    fresh = MODELS.build(spec.default_model)(spec)
    after_fresh = torch.rand(4)
    cache = InitialModels()
    built = []
    original_build = MODELS.build

    def counting_build(*args, **kwargs):
        built.append(args)
        return original_build(*args, **kwargs)

    monkeypatch.setattr(MODELS, "build", counting_build)
    copies = []
    for _ in range(2):
        copies.append(cache.get(spec.default_model, None, spec, 3, True, torch.device("cpu")))
        assert torch.equal(torch.rand(4), after_fresh)
    assert len(built) == 1
    for model in copies:
        for (name, a), b in zip(fresh.state_dict().items(), model.state_dict().values(), strict=True):
            assert torch.equal(a, b), name
    assert copies[0] is not copies[1] and copies[0].head is not copies[1].head


def test_a_pair_failing_at_run_time_is_recorded_and_the_others_go_on(tmp_path, capsys, probe_method):
    """A RuntimeError in one pair (CUDA out of memory at paper sizes, say) is recorded under
    ``failed`` and the command exits with 1 after benchmarking the other pairs."""

    def out_of_memory(self, ctx):
        raise torch.OutOfMemoryError("CUDA out of memory (probe)")

    probe_method.on_after_backward = out_of_memory
    out = tmp_path / "bench.json"
    assert main(_args("--methods", "probe_joint,mrd", "--out", str(out))) == 1
    report = json.loads(out.read_text())
    assert [r["method"] for r in report["results"]] == ["mrd"]
    (failure,) = report["failed"]
    assert failure["method"] == "probe_joint"
    assert "OutOfMemoryError: CUDA out of memory (probe)" in failure["error"]
    assert "FAILED: probe_joint on synthetic_cls2" in capsys.readouterr().err
