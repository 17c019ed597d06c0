"""``benchmarks/cuda_check.py``: its report arithmetic by hand, and its CPU dry run end to end in a
reduced form, so that the one-shot GPU check cannot rot between GPU runs."""

from __future__ import annotations

import dataclasses
import importlib
import json
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


sys.path.insert(0, str(ROOT / "benchmarks"))  # not a package: the scripts import each other by name
cuda_check = importlib.import_module("cuda_check")
report = importlib.import_module("cuda_report")


def _row(run_id, acc, status="ok", best_epoch=1, loss=0.5):
    return {
        "run_id": run_id, "status": status, "label": "joint", "dataset": "synthetic_cls2",
        "metrics": {"val": {"acc": acc}, "test": {"acc": acc, "loss": loss}, "best_epoch": best_epoch},
        "history": [{"train_loss": loss, "epoch_time_s": 1.0 + acc, "val": {"acc": acc}}],
    }


def test_compare_rows_by_hand():
    device = {"a": _row("a", 0.80), "b": _row("b", 0.70, best_epoch=2), "c": _row("c", 0.5)}
    cpu = {"a": _row("a", 0.75), "b": _row("b", 0.71), "d": _row("d", 0.1)}
    cmp = report.compare_rows(device, cpu)
    acc = {c["metric"]: c for c in cmp["cells"]}["test.acc"]
    # |0.80 - 0.75| = 0.05 (run a), |0.70 - 0.71| = 0.01 (run b): max 0.05, mean 0.03
    assert acc["max_abs_diff"] == pytest.approx(0.05) and acc["mean_abs_diff"] == pytest.approx(0.03)
    assert acc["worst_run"] == "a" and acc["runs"] == 2
    assert cmp["best_epoch_same"] == 1 and cmp["only_device"] == ["c"] and cmp["only_cpu"] == ["d"]
    cpu["b"]["status"] = "diverged"
    assert len(report.compare_rows(device, cpu)["status_mismatches"]) == 1


def test_determinism_ignores_wall_times_only():
    reference = {"a": _row("a", 0.8), "b": _row("b", 0.7)}
    rerun = {"a": _row("a", 0.8), "b": _row("b", 0.7, loss=0.5000001)}
    rerun["a"]["history"][0]["epoch_time_s"] = 99.0  # a wall time: not part of the comparison
    result = report.determinism(rerun, reference)
    assert result["compared"] == 2 and len(result["identical"]) == 1
    assert result["different"][0].startswith("joint on synthetic_cls2 (b)")


def test_junit_summary_counts_every_outcome(tmp_path):
    xml = tmp_path / "junit.xml"
    xml.write_text(
        '<testsuites><testsuite name="pytest">'
        '<testcase classname="t" name="ok"/>'
        '<testcase classname="t" name="bad"><failure message="assert 1 == 2">trace</failure></testcase>'
        '<testcase classname="t" name="broken"><error message="fixture failed"/></testcase>'
        '<testcase classname="t" name="skip"><skipped type="pytest.skip" message="no GPU"/></testcase>'
        '<testcase classname="t" name="gap"><skipped type="pytest.xfail" message="known"/></testcase>'
        "</testsuite></testsuites>"
    )
    summary = report.junit_summary([xml])
    assert {k: summary[k] for k in ("passed", "failed", "errors", "skipped", "xfailed")} == {
        "passed": 1, "failed": 1, "errors": 1, "skipped": 1, "xfailed": 1,
    }
    assert summary["failures"] == ["t::bad: assert 1 == 2", "t::broken: fixture failed"]


def test_matrix_spec_round_trips_through_toml():
    spec = {"methods": ["joint", "cggm"], "datasets": ["synthetic_seg4"], "seeds": [0],
            "overrides": {"cost_steps": 10, "model": {"hidden": 32}},
            "dataset_overrides": {"synthetic_seg4": {"epochs": 6, "dataset.n_train": 512}}}
    back = tomllib.loads(report.matrix_toml(spec))
    assert back["overrides"] == {"cost_steps": 10, "model.hidden": 32}
    assert back["dataset_overrides"] == spec["dataset_overrides"] and back["methods"] == spec["methods"]
    assert report.slug("NVIDIA H200 NVL") == "nvidia-h200-nvl"


def test_dry_run_end_to_end_then_a_rerun_keeps_what_is_done(tmp_path, monkeypatch):
    """Every stage on the CPU with the smallest sizes (the benches on synthetic_cls2 instead of the
    paper cases, the contract tests of joint only): the folder holds the README with every section,
    bench and stream reports, JUnit results, the matrix comparison (CPU against CPU: no difference)
    and the determinism check; a second run skips the finished benches."""
    tiny = ("--methods", "cggm", "--batch-size", "8", "--steps", "1", "--warmup", "0")
    sizes = dataclasses.replace(
        cuda_check.dry_sizes(),
        early_jobs=tuple((kind, "synthetic_cls2", tiny) for kind in ("none", "streams:off")),
        late_jobs=(("streams:on", "synthetic_cls2", tiny),),
        test_env={"MMB_TEST_DEVICE": "cpu", "MMB_TEST_METHODS": "joint"},
        other_tests=(("other", ("tests/methods/test_streams.py",)),),
    )
    monkeypatch.setattr(cuda_check, "dry_sizes", lambda: sizes)
    assert cuda_check.Check(cuda_check.parse_args(["--dry-run", "--out", str(tmp_path)])).main() == 0
    out = tmp_path / "cpu"
    summary = json.loads((out / "summary.json").read_text())
    assert {k: v["status"] for k, v in summary["stages"].items()} == dict.fromkeys(cuda_check.STAGES, "ok")
    assert summary["tests"]["passed"] > 0 and summary["tests"]["failed"] == 0
    bench = json.loads((out / "bench" / "fp32" / "synthetic_cls2.json").read_text())
    assert [r["method"] for r in bench["results"]] == ["cggm"]
    assert json.loads((out / "streams" / "on.json").read_text())["config"]["method_overrides"] == {
        "side_stream": True
    }
    assert json.loads((out / "matrix" / "compare.json").read_text())["max_abs_diff"] == 0
    determinism = json.loads((out / "determinism" / "result.json").read_text())
    assert determinism["compared"] == 2 and not determinism["different"]
    readme = (out / "README.md").read_text()
    for section in ("## gpu tests", "## cost, fp32", "## CGGM on two CUDA streams",
                    "## synthetic matrix, device vs CPU", "## determinism"):
        assert section in readme
    log = out / "bench" / "fp32" / "synthetic_cls2.log"
    log.unlink()
    args = cuda_check.parse_args(["--dry-run", "--out", str(tmp_path), "--stages", "bench,report"])
    assert cuda_check.Check(args).main() == 0
    assert not log.exists()  # done before: not run again
    assert "## cost, fp32" in (out / "README.md").read_text()
