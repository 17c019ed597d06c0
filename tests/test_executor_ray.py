"""The Ray executor on a local Ray cluster (2 CPUs) started once for this module: the same rows as the
local executor, a killed worker retried, a killed driver restarted, a raising run failed once, and
the bad-input errors (no GPU, too many CPUs, unreachable address, unreadable data root)."""

from __future__ import annotations

import io
import os
import platform
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from mmbalance.checkpoint import comparable_row
from mmbalance.cli import main
from mmbalance.executor import RunFailure
from mmbalance.matrix import parse_spec, plan_matrix
from mmbalance.matrix_run import run_matrix
from mmbalance.results import load_rows
from tests import executor_runs
from tests.processes import sigkill, wait_for

ray = pytest.importorskip("ray")
from mmbalance.executor_ray import RayExecutor, RayOptions  # noqa: E402 (needs ray)

ROOT = Path(__file__).resolve().parents[1]
SPEC = {  # joint, unimodal[strong], unimodal[weak] on synthetic_cls2, seeds 0 and 1: six tiny runs
    "methods": ["joint", "unimodal"],
    "datasets": ["synthetic_cls2"],
    "seeds": [0, 1],
    "device": "cpu",
    "overrides": {"epochs": 2, "max_train_batches": 4, "cost_steps": 0, "eval_modality_scores": False,
                  "dataset.n_train": 128, "dataset.n_val": 32, "dataset.n_test": 32},
}
SPEC_TOML = """\
methods = ["joint", "unimodal"]
datasets = ["synthetic_cls2"]
seeds = [0, 1]
device = "cpu"

[overrides]
epochs = 3
cost_steps = 0
eval_modality_scores = false
"dataset.n_train" = 1024
"dataset.n_val" = 32
"dataset.n_test" = 32
"""


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A local Ray cluster with 2 CPUs whose workers import this tree and the test run functions."""
    markers = tmp_path_factory.mktemp("markers")
    env = {"PYTHONPATH": str(ROOT), "MMBALANCE_TEST_MARKERS": str(markers), "OMP_NUM_THREADS": "1"}
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, runtime_env={"env_vars": env})
    yield SimpleNamespace(markers=markers, address=ray.get_runtime_context().gcs_address)
    ray.shutdown()


@pytest.fixture(scope="module")
def local_rows(tmp_path_factory):
    """The six runs through the local executor, one thread: {run_id: row}."""
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("local")
    report = run_matrix(parse_spec(SPEC), out, quiet=True)
    assert report.counts == {"ok": 6}
    return {r.run_id: r for r in load_rows(out).rows}


def _rows(folder):
    loaded = load_rows(folder)
    assert loaded.problems == ()
    return {r.run_id: r for r in loaded.rows}


def test_ray_rows_equal_local_rows(cluster, local_rows, tmp_path):
    """Two workers, one thread per run: every row equals the local executor's row, timing and the
    execution record (node, task id, attempts) excepted; the bar and the lines report every run."""
    stream = io.StringIO()
    executor = RayExecutor(RayOptions(cpus_per_run=1))
    report = run_matrix(parse_spec(SPEC), tmp_path, executor=executor, stream=stream)
    assert report.counts == {"ok": 6} and executor.max_in_flight == 4  # twice the 2 runs that fit
    rows = _rows(tmp_path)
    assert rows.keys() == local_rows.keys()
    for run_id, row in rows.items():
        assert row.metrics["test"] == local_rows[run_id].metrics["test"]
        assert comparable_row(row.data) == comparable_row(local_rows[run_id].data)
        assert row.data["attempts"] == 1 and row.env["node"] == platform.node() and row.env["threads"] == 1
        assert len(row.env["ray_task_id"]) > 8
    text = stream.getvalue()
    assert all(text.count(f"[{i}/6] ") == 1 for i in range(1, 7)), text
    assert "running" in text and "failed 0" in text and "6/6" in text
    assert not list((tmp_path / "_claims").iterdir()) and not (tmp_path / "_ckpt").exists()


def test_a_killed_worker_is_retried_and_only_its_row_says_so(cluster, local_rows, tmp_path):
    """SIGKILL the worker process training joint seed 0: Ray retries the task, the run completes with
    ``attempts: 2``, and no other row differs from the local executor's."""
    target = next(r for r in local_rows.values() if (r.label, r.seed) == (executor_runs.KILL_LABEL, 0))
    pid_file = cluster.markers / f"{target.run_id}.pid"
    killed = []

    def kill_when_waiting():
        deadline = time.monotonic() + 120
        while not pid_file.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        if pid_file.exists():
            time.sleep(0.2)
            pid = int(pid_file.read_text())
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)

    killer = threading.Thread(target=kill_when_waiting)
    killer.start()
    executor = RayExecutor(RayOptions(), run_fn=executor_runs.waits_to_be_killed)
    report = run_matrix(parse_spec(SPEC), tmp_path, executor=executor, quiet=True)
    killer.join()
    assert killed, "the target run never started"
    assert report.counts == {"ok": 6}
    rows = _rows(tmp_path)
    assert rows[target.run_id].data["attempts"] == 2
    for run_id, row in rows.items():
        assert row.metrics["test"] == local_rows[run_id].metrics["test"]
        if run_id != target.run_id:
            assert row.data["attempts"] == 1
            assert comparable_row(row.data) == comparable_row(local_rows[run_id].data)


def test_a_raising_run_is_failed_once_and_the_matrix_goes_on(cluster, local_rows, tmp_path):
    executor = RayExecutor(RayOptions(), run_fn=executor_runs.raises_for_weak)
    report = run_matrix(parse_spec(SPEC), tmp_path, executor=executor, quiet=True)
    assert report.counts == {"ok": 4, "failed": 2}
    rows = _rows(tmp_path)
    for row in rows.values():
        if row.label != "unimodal[weak]":
            assert row.status == "ok" and row.metrics["test"] == local_rows[row.run_id].metrics["test"]
            continue
        assert row.status == "failed" and row.data["attempts"] == 1
        assert row.error["type"] == "RuntimeError"
        assert row.error["message"] == f"boom in unimodal[weak] seed {row.seed}"
        assert "raises_for_weak" in row.error["traceback"] and row.env["node"] == platform.node()
        assert (cluster.markers / f"{row.run_id}.calls").read_text() == "call\n"  # not retried


def test_ctrl_c_cancels_the_runs_in_flight_and_keeps_the_folder_clean(cluster, tmp_path):
    """Ctrl-C while two runs train: KeyboardInterrupt reaches the caller, the tasks in flight are
    cancelled (the CPUs are free again long before a run could have ended), no row and no claim is
    left."""
    executor = RayExecutor(RayOptions(), run_fn=executor_runs.sleeps)

    def interrupt_when_two_started():
        deadline = time.monotonic() + 120
        while len(list(cluster.markers.glob("*.started"))) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGINT)

    threading.Thread(target=interrupt_when_two_started, daemon=True).start()
    with pytest.raises(KeyboardInterrupt):
        run_matrix(parse_spec(SPEC), tmp_path, executor=executor, quiet=True)
    assert len(list(cluster.markers.glob("*.started"))) >= 2  # a queued one may start as they are cancelled
    deadline = time.monotonic() + 60
    while ray.available_resources().get("CPU", 0) < 2:
        assert time.monotonic() < deadline, f"tasks still hold CPUs: {ray.available_resources()}"
        time.sleep(0.2)
    assert not list(tmp_path.glob("*.json")) and not list((tmp_path / "_claims").iterdir())


def _driver(spec, out, *extra):
    code = "import sys; from mmbalance.cli import main; sys.exit(main(sys.argv[1:]))"
    return [sys.executable, "-c", code, "--threads", "1", "matrix", str(spec), "--out", str(out), "-q",
            "--no-tables", "--executor", "ray", *extra]


def _env():
    return dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")


def test_a_killed_driver_restarted_redoes_nothing_finished(cluster, tmp_path):
    spec, out = tmp_path / "m.toml", tmp_path / "out"
    spec.write_text(SPEC_TOML)
    cmd = _driver(spec, out, "--address", cluster.address)
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    wait_for(lambda: list(out.glob("*.json")), proc, "a finished run")
    sigkill(proc)
    done = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in out.glob("*.json")}
    assert 1 <= len(done) < 6, f"the kill should land mid-matrix, {len(done)} of 6 runs were done"
    again = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    rows = _rows(out)
    assert len(rows) == 6 and all(r.status == "ok" for r in rows.values())
    for name, (mtime, content) in done.items():
        assert (out / name).stat().st_mtime_ns == mtime and (out / name).read_bytes() == content
    assert not list((out / "_claims").iterdir())


def _one_line_error(capsys, argv):
    code = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("mmbalance: error: "), (code, err)
    return err[0]


@pytest.mark.parametrize("options, fragments", [
    (["--device", "auto", "--gpus-per-run", "1"],
     ["--gpus-per-run 1: no node of the Ray cluster (1 node(s), 0 GPU(s)", "the runs would wait forever"]),
    (["--cpus-per-run", "3"], ["--cpus-per-run 3: no node of the Ray cluster", "has 3 CPUs"]),
    (["--device", "cuda:1"],
     ["device 'cuda:1' with --executor ray: Ray chooses each run's GPU", "(--device)"]),
    (["--device", "cuda", "--gpus-per-run", "0"], ["device 'cuda' with --gpus-per-run 0"]),
    (["--device", "cpu", "--gpus-per-run", "0.5"], ["--gpus-per-run 0.5 with device 'cpu'"]),
    (["--gpus-per-run", "1.5"], ["--gpus-per-run must be a number >= 0, a fraction below 1 or a whole"]),
])
def test_options_the_cluster_cannot_honour_fail_before_anything_runs(cluster, tmp_path, capsys, options,
                                                                     fragments):
    spec, out = tmp_path / "m.toml", tmp_path / "out"
    spec.write_text(SPEC_TOML)
    argv = ["matrix", str(spec), "--out", str(out), "-q", "--executor", "ray", *options]
    line = _one_line_error(capsys, argv)
    for fragment in fragments:
        assert fragment in line, line
    assert not out.exists()  # nothing planned was written, nothing trained


def test_a_node_that_cannot_read_the_data_root_names_itself_and_the_path(cluster, tmp_path):
    missing = tmp_path / "no_data"
    run = plan_matrix(parse_spec({"methods": ["joint"], "datasets": ["mosi"], "seeds": [0]}),
                      data_root=str(missing))[0]
    executor = RayExecutor(RayOptions())
    executor.start("cpu")
    try:
        future = executor.submit(run)
        assert next(executor.as_completed([future])) is future
    finally:
        executor.close()
    failure = future.exception()
    assert isinstance(failure, RunFailure) and failure.type_name == "DataError"
    expected = f"node {platform.node()!r} cannot read --data-root {str(missing)!r} (no such folder)"
    assert expected in failure.message
    assert failure.record["attempts"] == 1 and failure.record["env"]["node"] == platform.node()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_an_unreachable_address_is_an_error_naming_it(tmp_path):
    """In a fresh process (no Ray connection yet): a refused port fails at once; a port that accepts
    but is no Ray cluster fails after the (shortened) connection timeout."""
    spec = tmp_path / "m.toml"
    spec.write_text(SPEC_TOML)
    address = f"127.0.0.1:{_free_port()}"
    start = time.monotonic()
    refused = subprocess.run(_driver(spec, tmp_path / "o1", "--address", address), env=_env(),
                             capture_output=True, text=True, timeout=120)
    assert refused.returncode == 2
    assert f"mmbalance: error: cannot reach the Ray cluster at --address '{address}': " in refused.stderr
    assert time.monotonic() - start < 60
    with socket.socket() as listener:  # accepts connections, never answers
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        address = f"127.0.0.1:{listener.getsockname()[1]}"
        code = ("import sys, mmbalance.executor_ray as e; e.CONNECT_TIMEOUT_S = 3; "
                "from mmbalance.cli import main; sys.exit(main(sys.argv[1:]))")
        argv = _driver(spec, tmp_path / "o2", "--address", address)
        argv[2] = code
        silent = subprocess.run(argv, env=_env(), capture_output=True, text=True, timeout=120)
    assert silent.returncode == 2, silent.stderr
    assert f"mmbalance: error: no Ray cluster answered at --address '{address}' within 3 s" in silent.stderr
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o2").exists()
