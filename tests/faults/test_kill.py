"""SIGKILL inside the atomic write of a row: the stray temporary file is gone after the next run."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from mmbalance.cli import main
from mmbalance.results import load_rows
from tests.faults.conftest import TINY_SPEC
from tests.processes import sigkill, wait_for

ROOT = Path(__file__).resolve().parents[2]

# Runs the matrix with the row writer slowed down: after half of the first row's bytes it signals
# (a marker file) and sleeps, so the test can kill it inside write_json_atomic.
KILLED_WRITER = """
import sys, time
from pathlib import Path
import mmbalance.output as output

marker = Path(sys.argv[1])
real = output._write_all

def slow(fd, payload):
    if b'"run_id"' in payload[:40]:  # a row, not the plan or the probe
        real(fd, payload[: len(payload) // 2])
        marker.write_text("inside the atomic write")
        time.sleep(120)
    real(fd, payload)

output._write_all = slow
from mmbalance.cli import main
sys.exit(main(["--threads", "1", "matrix", sys.argv[2], "--out", sys.argv[3], "-q", "--no-tables"]))
"""


def test_sigkill_inside_the_atomic_write_leaves_no_stray_file_after_the_next_run(tmp_path, capsys):
    spec = tmp_path / "m.toml"
    spec.write_text(TINY_SPEC)
    out, marker = tmp_path / "out", tmp_path / "marker"
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    proc = subprocess.Popen(
        [sys.executable, "-c", KILLED_WRITER, str(marker), str(spec), str(out)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    wait_for(marker.exists, proc, "the writer reaching its first row", timeout=120)
    sigkill(proc)
    strays = [p.name for p in out.iterdir() if p.name.endswith(".tmp")]
    assert len(strays) == 1 and strays[0].startswith(".") and f".{proc.pid}@" in strays[0]  # the killed write
    assert not list(out.glob("*.json"))  # no row: the kill came before os.replace

    assert main(["--threads", "1", "matrix", str(spec), "--out", str(out), "-q", "--no-tables"]) == 0
    assert capsys.readouterr().err.count("\n") == 1  # only the summary line
    assert not [p for p in out.rglob("*") if p.name.endswith(".tmp")]  # the stray is gone
    loaded = load_rows(out)
    assert loaded.problems == () and sorted(r.label for r in loaded.rows) == [
        "joint",
        "unimodal[strong]",
        "unimodal[weak]",
    ]
