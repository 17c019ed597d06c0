"""results/scale/measure.py works: its local-vs-ray measurement on 4 tiny runs (counts and identity, not
times), and its GPU-hours arithmetic on a hand-made bench report."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mmbalance.matrix import load_spec, plan_matrix

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "results" / "scale" / "measure.py"


@pytest.fixture(scope="module")
def measure():
    spec = importlib.util.spec_from_file_location("scale_measure", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_list_schedule_by_hand(measure):
    # plan order on 2 GPUs: 3 -> g0 (3), 3 -> g1 (3), 2 -> g0 (5), 2 -> g1 (5), 2 -> g0 (7)
    assert measure.list_schedule([3, 3, 2, 2, 2], 2) == 7
    assert measure.list_schedule([5, 1, 1, 1], 2) == 5  # the longest run bounds it
    assert measure.list_schedule([1.0] * 8, 32) == 1


def _mosi_runs():
    """CMU-MOSI runs of the paper matrix that train (those its methods support)."""
    runs = plan_matrix(load_spec(ROOT / "matrices" / "paper.toml"), data_root="/data")
    return sum(1 for r in runs if r.dataset == "mosi" and r.resolved is not None)


def test_plan_of_the_paper_matrix_by_hand(measure, tmp_path):
    """CMU-MOSI: 1284 training samples at batch 64 -> 21 steps per epoch, 30 epochs -> 630 steps per
    run, 63 s per run per 100 ms of step time; n runs -> 630 n steps, 63 n / 3600 GPU-hours."""
    out = tmp_path / "plan.json"
    assert measure.main(["plan", "--out", str(out)]) == 0
    mosi = json.loads(out.read_text())["per_dataset"]["mosi"]
    n = _mosi_runs()
    assert (mosi["runs"], mosi["epochs"], mosi["batch"], mosi["steps_per_epoch"]) == (n, 30, 64, 21)
    assert mosi["training_steps"] == 630 * n


def test_gpu_hours_of_the_paper_matrix_by_hand(measure, tmp_path, capsys):
    """Every step 3000 ms (a validation batch is a third: 1 s). CMU-MOSI: 1284 training samples at
    batch 64 -> 21 steps, 229 validation samples -> 4 batches; 30 epochs -> 30 * (21 * 3 + 4 * 1) =
    2010 s per run; n runs -> 2010 n / 3600 GPU-hours (45 runs: 25.125)."""
    tasks = {"paper_mosi": 64, "paper_iemocap": 64, "paper_food101": 128, "paper_brats": 64}
    methods = load_spec(ROOT / "matrices" / "paper.toml").methods
    rows = [{"method": m, "task": t, "batch_size": b, "step_ms_median": 3000.0,
             "joint_step_ms_median": 3000.0} for m in methods for t, b in tasks.items() if m != "joint"]
    bench = tmp_path / "bench.json"
    bench.write_text(json.dumps({"results": rows}))
    out = tmp_path / "hours.json"
    assert measure.main(["gpu-hours", "--bench", str(bench), "--gpus", "8", "32", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    mosi, n = result["per_dataset"]["mosi"], _mosi_runs()
    assert (mosi["runs"], mosi["epochs"], mosi["batch"], mosi["steps_per_epoch"]) == (n, 30, 64, 21)
    assert mosi["gpu_hours"] == pytest.approx(2010 * n / 3600)
    assert set(result["wall"]) == {"8", "32"}
    assert result["wall"]["8"]["wall_hours"] >= result["wall"]["8"]["lower_bound_hours"]
    assert f"| mosi | {n} | 30 | 64 | 21 | " in capsys.readouterr().out
    rows[0]["batch_size"] = 16  # timed at another batch size than the paper's: refused
    bench.write_text(json.dumps({"results": rows}))
    with pytest.raises(SystemExit, match=r"was timed at batch \[16, 64\]"):
        measure.main(["gpu-hours", "--bench", str(bench)])


def test_local_vs_ray_on_four_tiny_runs(tmp_path):
    pytest.importorskip("ray")
    out = tmp_path / "small.json"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, str(SCRIPT), "local-vs-ray", "--small", "--out", str(out)],
                          env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    result = json.loads(out.read_text())
    assert result["runs"] == 4 and result["same_test_metrics"] is True
    assert result["local"]["counts"] == result["ray"]["counts"] == {"ok": 4}
    overhead = result["scheduling_overhead_s"]
    assert len(overhead["all"]) == 4 and all(gap > 0 for gap in overhead["all"])
    assert "| local (one process) |" in done.stdout and "scheduling overhead" in done.stdout
