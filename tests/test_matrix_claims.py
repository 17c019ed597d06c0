"""Several local ``mmbalance matrix`` processes on one results folder: claims split the work with no run
trained twice and none lost, a stale claim is taken over, and a run killed inside an epoch resumes
from its epoch checkpoint and ends with the row of an uninterrupted run."""

from __future__ import annotations

import os
import platform
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from mmbalance.checkpoint import CHECKPOINT_DIR, CHECKPOINT_FILE, comparable_row
from mmbalance.claims import CLAIMS_DIR
from mmbalance.cli import main
from mmbalance.results import load_rows
from tests.processes import sigkill, wait_for

ROOT = Path(__file__).resolve().parents[1]
# joint, unimodal[strong], unimodal[weak] on synthetic_cls2 (x seeds): runs of about a second each
SPEC = """\
methods = ["joint", "unimodal"]
datasets = ["synthetic_cls2"]
seeds = {seeds}
device = "cpu"

[overrides]
epochs = {epochs}
cost_steps = 0
eval_modality_scores = false
"dataset.n_train" = {n_train}
"dataset.n_val" = 64
"dataset.n_test" = 64
"""
# Waits for a go file (written once every process is ready), then runs the CLI: both processes start
# their matrix at the same moment, after their imports.
STARTER = """
import sys, time
from pathlib import Path
from mmbalance.cli import main
ready, go = Path(sys.argv[1]), Path(sys.argv[2])
ready.write_text("ready")
while not go.exists():
    time.sleep(0.005)
sys.exit(main(sys.argv[3:]))
"""
TRAINED = re.compile(r"\(([0-9a-f]{12})\): (?:[^:]*, )?(ok|failed|diverged) in ")


@pytest.fixture(autouse=True)
def one_thread():
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(1)


def _env():
    return dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")


def _spec(tmp_path, seeds="[0]", epochs=2, n_train=1024):
    path = tmp_path / "m.toml"
    path.write_text(SPEC.format(seeds=seeds, epochs=epochs, n_train=n_train))
    return path


def _matrix(spec, out, *options):
    return ["--threads", "1", "matrix", str(spec), "--out", str(out), "--no-tables", *options]


def test_two_processes_on_one_folder_train_every_run_exactly_once(tmp_path):
    spec, out = _spec(tmp_path, seeds="[0, 1]"), tmp_path / "out"
    procs, ready = [], []
    for i in range(2):
        ready.append(tmp_path / f"ready{i}")
        argv = [sys.executable, "-c", STARTER, str(ready[i]), str(tmp_path / "go"), *_matrix(spec, out)]
        procs.append(subprocess.Popen(argv, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                      text=True))
    deadline = time.monotonic() + 120
    while not all(r.exists() for r in ready):
        assert all(p.poll() is None for p in procs), [p.stderr.read() for p in procs]
        assert time.monotonic() < deadline, "the processes never got ready"
        time.sleep(0.01)
    (tmp_path / "go").write_text("go")
    errs = [p.communicate(timeout=300)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], errs
    trained = [{m.group(1) for m in TRAINED.finditer(err)} for err in errs]
    rows = load_rows(out)
    assert rows.problems == () and len(rows.rows) == 6 and all(r.status == "ok" for r in rows.rows)
    assert trained[0] | trained[1] == {r.run_id for r in rows.rows}, errs  # none lost
    assert not trained[0] & trained[1], errs  # none trained twice
    assert trained[0] and trained[1], errs  # the work was split
    for err, own in zip(errs, trained, strict=True):  # each says which runs the other one had
        assert err.count("): claimed by ") + err.count("done meanwhile by another process") == 6 - len(own)
    assert not list((out / CLAIMS_DIR).iterdir())


def _checkpoint_epoch(path):
    try:
        return torch.load(path, weights_only=True)["epoch"]
    except (OSError, RuntimeError, EOFError):
        return None


def test_a_run_killed_in_its_third_epoch_resumes_from_its_checkpoint_with_the_same_row(tmp_path, capsys):
    spec = tmp_path / "one.toml"
    spec.write_text(SPEC.format(seeds="[0]", epochs=5, n_train=8192).replace(
        'methods = ["joint", "unimodal"]', 'methods = ["joint"]'))
    out, ref = tmp_path / "out", tmp_path / "ref"
    argv = [sys.executable, "-c", "import sys; from mmbalance.cli import main; sys.exit(main(sys.argv[1:]))",
            *_matrix(spec, out, "--checkpoint-every", "1")]
    proc = subprocess.Popen(argv, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wait_for(lambda: list((out / CHECKPOINT_DIR).glob(f"*/{CHECKPOINT_FILE}")) if out.exists() else [],
             proc, "the first checkpoint")
    path = next((out / CHECKPOINT_DIR).glob(f"*/{CHECKPOINT_FILE}"))
    wait_for(lambda: _checkpoint_epoch(path) == 1, proc, "the checkpoint of epoch 1")
    sigkill(proc)  # inside epoch 2, the third
    assert _checkpoint_epoch(path) == 1 and not list(out.glob("*.json"))
    assert (out / CLAIMS_DIR / path.parent.name).exists()  # the killed process's claim is left behind

    assert main(_matrix(spec, out, "--checkpoint-every", "1")) == 0
    err = capsys.readouterr().err
    assert f"took over the claim of {platform.node()}:{proc.pid}" in err and "is gone" in err
    assert "resumed from epoch 2" in err
    assert main(_matrix(spec, ref, "--checkpoint-every", "1", "-q")) == 0
    [resumed], [straight] = load_rows(out).rows, load_rows(ref).rows
    assert resumed.data["resumed_from_epoch"] == 2 and "resumed_from_epoch" not in straight.data
    takeover = resumed.data["takeover"]
    assert takeover["pid"] == proc.pid and takeover["reason"].endswith("is gone")
    assert resumed.metrics["test"] == straight.metrics["test"]
    assert comparable_row(resumed.data) == comparable_row(straight.data)
    assert resumed.cost["train_steps"] == straight.cost["train_steps"] == 5 * 128
    assert not (out / CHECKPOINT_DIR / path.parent.name).exists()  # removed once the row is written
    assert not list((out / CLAIMS_DIR).iterdir())


def test_a_claim_without_heartbeat_is_skipped_then_taken_over_after_the_timeout(tmp_path, capsys):
    """A worker stopped (SIGSTOP: alive, no heartbeat; as a hung process or a lost node looks) holds its
    run until its heartbeat is older than --claim-timeout; then the next process takes it over."""
    spec, out = _spec(tmp_path, n_train=2048), tmp_path / "out"
    argv = [sys.executable, "-c", "import sys; from mmbalance.cli import main; sys.exit(main(sys.argv[1:]))",
            *_matrix(spec, out, "--claim-timeout", "4")]
    proc = subprocess.Popen(argv, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: (out / CLAIMS_DIR).is_dir() and any((out / CLAIMS_DIR).iterdir()), proc, "a claim")
        proc.send_signal(signal.SIGSTOP)
        [claim] = list((out / CLAIMS_DIR).iterdir())
        assert main(_matrix(spec, out, "--claim-timeout", "4")) == 0  # its heartbeat is fresh: skipped
        err = capsys.readouterr().err
        assert f"({claim.name}): claimed by {platform.node()}:{proc.pid} (since " in err
        assert "2 ok, 0 unsupported, 0 failed; 0 already done; 1 claimed by other processes" in err
        assert not (out / f"{claim.name}.json").exists()
        time.sleep(max(0.0, 4.5 - (time.time() - claim.stat().st_mtime)))
        assert main(_matrix(spec, out, "--claim-timeout", "4")) == 0
        err = capsys.readouterr().err
        assert f"({claim.name}): took over the claim of {platform.node()}:{proc.pid}" in err
        row = next(r for r in load_rows(out).rows if r.run_id == claim.name)
        assert row.status == "ok" and row.data["takeover"]["pid"] == proc.pid
        reason = row.data["takeover"]["reason"]
        assert re.match(r"heartbeat \d+ s ago, more than the claim timeout of 4 s", reason), reason
    finally:
        proc.kill()
        proc.wait()
        proc.stderr.close()
    assert len(load_rows(out).rows) == 3


def test_checkpoints_are_removed_after_the_row_unless_kept(tmp_path):
    spec = _spec(tmp_path, n_train=128)
    assert main(_matrix(spec, tmp_path / "a", "--checkpoint-every", "1", "-q")) == 0
    assert not list((tmp_path / "a" / CHECKPOINT_DIR).iterdir())
    assert main(_matrix(spec, tmp_path / "b", "--checkpoint-every", "1", "--keep-checkpoints", "-q")) == 0
    kept = sorted(p.parent.name for p in (tmp_path / "b" / CHECKPOINT_DIR).glob(f"*/{CHECKPOINT_FILE}"))
    assert kept == sorted(r.run_id for r in load_rows(tmp_path / "b").rows) and len(kept) == 3
    last = torch.load(tmp_path / "b" / CHECKPOINT_DIR / kept[0] / CHECKPOINT_FILE, weights_only=True)
    assert last["epoch"] == 1
    assert main(_matrix(spec, tmp_path / "c", "--checkpoint-every", "0", "-q")) == 0
    assert not (tmp_path / "c" / CHECKPOINT_DIR).exists()
