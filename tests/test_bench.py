"""``mmbalance bench``: report fields, and the regression gate failing on a slowed method."""

from __future__ import annotations

import argparse
import json
import time

import pytest
import torch

from mmbalance.bench import add_arguments, compare, main, run_bench
from mmbalance.errors import ConfigError
from mmbalance.methods import METHODS
from mmbalance.methods.joint import Joint


def _args(tmp_path, *extra):
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(["--tasks", "synthetic_cls2", "--steps", "12", "--warmup", "2", "--quiet", *extra])


@pytest.fixture
def probe_method():
    """A joint-equivalent method registered for the test, then made slower and heavier."""

    @METHODS.register("probe_joint")
    class ProbeJoint(Joint):
        paper = "test probe"
        delay_s = 0.0

        def on_after_backward(self, ctx):
            if self.delay_s:
                time.sleep(self.delay_s)

    yield ProbeJoint
    METHODS.unregister("probe_joint")


def test_report_fields_and_table(tmp_path, capsys, probe_method):
    out = tmp_path / "bench.json"
    assert main(_args(tmp_path, "--methods", "probe_joint", "--out", str(out))) == 0
    report = json.loads(out.read_text())
    (row,) = report["results"]
    assert row["method"] == "probe_joint" and row["task"] == "synthetic_cls2"
    assert row["mem_overhead_bytes"] == 0 and row["floor"] == pytest.approx(1.0)
    assert 0.5 < row["ratio_vs_joint"] < 2.0
    assert {"device", "torch", "threads", "git_commit"} <= set(report["env"])
    assert "probe_joint" in capsys.readouterr().out


def test_compare_fails_on_slowed_method_and_passes_unchanged(tmp_path, capsys, probe_method):
    base = tmp_path / "base.json"
    assert main(_args(tmp_path, "--methods", "probe_joint", "--out", str(base))) == 0
    # Unchanged code: passes (a generous threshold absorbs the noise of a loaded 2-core machine).
    same = tmp_path / "same.json"
    assert main(_args(tmp_path, "--methods", "probe_joint", "--out", str(same), "--compare", str(base), "--threshold", "0.5")) == 0
    # Slowed copy: a 20 ms sleep per step on a ~1 ms step fails even that threshold.
    probe_method.delay_s = 0.02
    slow = tmp_path / "slow.json"
    rc = main(_args(tmp_path, "--methods", "probe_joint", "--out", str(slow), "--compare", str(base), "--threshold", "0.5"))
    assert rc == 1
    assert "probe_joint on synthetic_cls2: ratio_vs_joint" in capsys.readouterr().err


def test_compare_flags_any_memory_growth():
    base = {"results": [{"method": "m", "task": "t", "ratio_vs_joint": 1.0, "mem_overhead_bytes": 100}]}
    head = {"results": [{"method": "m", "task": "t", "ratio_vs_joint": 1.0, "mem_overhead_bytes": 104}]}
    assert compare(base, head) == ["m on t: mem_overhead_bytes 100 -> 104"]
    assert compare(base, base) == []


def test_compare_threshold_is_relative():
    base = {"results": [{"method": "m", "task": "t", "ratio_vs_joint": 1.2, "mem_overhead_bytes": 0}]}
    ok = {"results": [{"method": "m", "task": "t", "ratio_vs_joint": 1.31, "mem_overhead_bytes": 0}]}
    bad = {"results": [{"method": "m", "task": "t", "ratio_vs_joint": 1.33, "mem_overhead_bytes": 0}]}
    assert compare(base, ok, 0.10) == []
    assert len(compare(base, bad, 0.10)) == 1


def test_bad_compare_file(tmp_path):
    with pytest.raises(ConfigError, match="--compare: no such file"):
        main(_args(tmp_path, "--compare", str(tmp_path / "missing.json")))
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ConfigError, match="is not a mmbalance bench report"):
        main(_args(tmp_path, "--compare", str(bad)))


def test_unknown_method_in_bench():
    from mmbalance.errors import RegistryError

    with pytest.raises(RegistryError, match="unknown method"):
        run_bench(["no_such_method"], ["synthetic_cls2"], steps=1, warmup=0, progress=False)


def test_method_overrides_reach_the_method_and_the_report(tmp_path):
    out = tmp_path / "bench.json"
    with pytest.warns(UserWarning, match="side_stream=True has no effect"):  # CPU: nothing to overlap
        sets = ["--set", "side_stream=true", "--set", "method.rho=1.1"]
        assert main(_args(tmp_path, "--methods", "cggm", *sets, "--out", str(out))) == 0
    report = json.loads(out.read_text())
    assert report["config"]["method_overrides"] == {"side_stream": True, "rho": 1.1}
    with pytest.raises(ConfigError, match="no_such_field"):
        main(_args(tmp_path, "--methods", "cggm", "--set", "no_such_field=1", "--out", str(out)))


def test_initial_models_are_built_once_and_leave_the_rng_as_a_fresh_build(monkeypatch):
    """Every pair of a case starts from the weights and the RNG state that building the model anew
    gives: the cache changes what is drawn afterwards in no way."""
    from mmbalance.bench import InitialModels
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
    assert main(_args(tmp_path, "--methods", "probe_joint,mrd", "--out", str(out))) == 1
    report = json.loads(out.read_text())
    assert [r["method"] for r in report["results"]] == ["mrd"]
    (failure,) = report["failed"]
    assert failure["method"] == "probe_joint"
    assert "OutOfMemoryError: CUDA out of memory (probe)" in failure["error"]
    assert "FAILED: probe_joint on synthetic_cls2" in capsys.readouterr().err
