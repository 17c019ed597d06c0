"""The error rates of ``mmbalance bench --compare`` on a loaded machine.

    python results/gate/error_rates.py                      # the full measurement (see README.md)
    python results/gate/error_rates.py --comparisons 2 ...  # a quicker look

Each round benchmarks the same tree three times, each time in a fresh process as CI does
(``mmbalance --threads auto bench --methods <methods>,gate_probe --tasks <tasks> ...``):

* ``base`` and ``head``: unchanged code. ``compare(base, head)`` reporting anything is a **false
  alarm** (counted for the whole gate, and separately for its wall-clock and its exact parts);
* ``slowed``: ``gate_probe``, a test-only plugin method registered by this script (never by the
  library), is ``--probe-base`` (in ``base`` and ``head`` too), here followed after each step by
  busy work for ``--slowdown`` (25 %) of the step's own wall time (:func:`register_probe`). A
  **detection** is ``compare(base, slowed)`` flagging ``gate_probe``'s ``ratio_vs_joint`` (the
  wall-clock gate); the exact gate catches the extra operators on its own, reported apart.

While the rounds run, ``--load-procs`` processes (default 2: both cores of a 2-core machine) spin
in pure Python; this script starts them, and stops them when it ends, fails or is interrupted;
each also stops itself after ``--max-minutes``. The summary and every comparison's problems go to
``--out`` (JSON) and the summary to stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))  # this tree's mmbalance, here and in the workers (PYTHONPATH below)
PROBE = "gate_probe"
# One spinning process: pure Python, so it keeps one core busy whatever torch does; it stops itself.
SPIN = "import sys, time\nend = time.time() + float(sys.argv[1])\nwhile time.time() < end: sum(range(999))"


# -- the test-only plugin method --------------------------------------------------------------------
def register_probe(base: str, slowdown: float) -> None:
    """Register ``gate_probe``: method ``base`` whose every step then takes ``1 + slowdown`` times as long.

    The step's own wall time (from ``forward_step`` to the end of ``on_after_optimizer_step``) is
    measured and followed by busy work (64x64 matrix products) until ``slowdown`` times that time
    has passed: the slowdown is a fraction of the step in whatever conditions it runs, so a loaded
    machine stretches it exactly as much as the step itself.
    """
    import torch

    from mmbalance.methods import METHODS

    base_cls = METHODS.get(base)
    a, b = torch.randn(64, 64), torch.randn(64, 64)

    @METHODS.register(PROBE)
    class GateProbe(base_cls):  # type: ignore[misc, valid-type]
        paper = f"test-only probe of results/gate/error_rates.py: {base}, {slowdown:.0%} slower"
        _started = 0.0

        def forward_step(self, model: Any, batch: Any) -> Any:
            self._started = time.perf_counter()
            return super().forward_step(model, batch)

        def on_after_optimizer_step(self, ctx: Any) -> None:
            super().on_after_optimizer_step(ctx)
            if slowdown:
                now = time.perf_counter()
                until = now + slowdown * (now - self._started)
                while time.perf_counter() < until:
                    torch.mm(a, b)


def worker(argv: list[str]) -> int:
    """``--worker --probe-base M --probe-slowdown S -- <mmbalance arguments>``: register, then run the CLI."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--probe-base", required=True)
    parser.add_argument("--probe-slowdown", type=float, required=True)
    parser.add_argument("rest", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    register_probe(args.probe_base, args.probe_slowdown)
    from mmbalance.cli import main as cli_main

    rest = args.rest[1:] if args.rest[:1] == ["--"] else args.rest
    return cli_main(rest)


# -- the measurement --------------------------------------------------------------------------------
def start_load(procs: int, seconds: float) -> list[subprocess.Popen]:
    return [subprocess.Popen([sys.executable, "-c", SPIN, str(seconds)]) for _ in range(procs)]


def stop_load(load: list[subprocess.Popen]) -> None:
    for p in load:
        p.terminate()
    for p in load:
        try:
            p.wait(timeout=10)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def bench_once(args: argparse.Namespace, slowdown: float, out: Path) -> dict[str, Any]:
    """One ``mmbalance bench`` in a fresh process (the probe registered with ``slowdown``)."""
    methods = ",".join([m for m in args.methods.split(",") if m] + [PROBE])
    cmd = [
        sys.executable, str(Path(__file__).resolve()), "--worker", "--probe-base", args.probe_base,
        "--probe-slowdown", str(slowdown), "--", "--threads", "auto", "bench", "--device", "cpu",
        "--methods", methods, "--tasks", args.tasks, "--blocks", str(args.blocks), "--steps", str(args.steps),
        "--out", str(out), "--quiet",
    ]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"bench failed ({done.returncode}): {' '.join(cmd)}\n{done.stderr[-3000:]}")
    return json.loads(out.read_text())


def classify(problems: list[str]) -> dict[str, list[str]]:
    wall = [p for p in problems if "ratio_vs_joint" in p]
    return {"wall_clock": wall, "exact": [p for p in problems if p not in wall]}


def measure(args: argparse.Namespace) -> dict[str, Any]:
    from mmbalance.gate import compare

    started = time.perf_counter()
    deadline = args.max_minutes * 60
    load = start_load(args.load_procs, deadline)
    pids = [p.pid for p in load]
    rounds: list[dict[str, Any]] = []
    try:
        with tempfile.TemporaryDirectory() as scratch:
            tmp = args.keep or scratch
            for i in range(args.comparisons):
                if time.perf_counter() - started > deadline:
                    raise RuntimeError(f"--max-minutes {args.max_minutes} reached after {i} rounds")
                Path(tmp).mkdir(parents=True, exist_ok=True)
                base = bench_once(args, 0, Path(tmp) / f"base{i}.json")
                head = bench_once(args, 0, Path(tmp) / f"head{i}.json")
                slowed = bench_once(args, args.slowdown, Path(tmp) / f"slowed{i}.json")
                unchanged = classify(compare(base, head, args.threshold))
                injected = classify(compare(base, slowed, args.threshold))
                probe = {r["task"]: r["ratio_vs_joint"] for r in slowed["results"] if r["method"] == PROBE}
                probe_base = {r["task"]: r["ratio_vs_joint"] for r in base["results"] if r["method"] == PROBE}
                rounds.append({
                    "unchanged": unchanged,
                    "slowed": injected,
                    "probe_change": {t: probe[t] / probe_base[t] - 1 for t in probe},
                })
                found = f"{len(injected['wall_clock'])} wall-clock, {len(injected['exact'])} exact"
                print(f"round {i + 1}/{args.comparisons}: unchanged {sum(map(len, unchanged.values()))} "
                      f"problem(s); slowed {found}", file=sys.stderr, flush=True)
    finally:
        stop_load(load)
    summary = summarize(args, rounds, time.perf_counter() - started)
    summary["load_pids"] = pids  # stopped and reaped by now
    return summary


def summarize(args: argparse.Namespace, rounds: list[dict[str, Any]], seconds: float) -> dict[str, Any]:
    def flagged(kind: str, part: str) -> int:
        return sum(bool(r[kind][part]) for r in rounds)

    probe_lines = [p for r in rounds for p in r["slowed"]["wall_clock"] if p.startswith(f"{PROBE} on ")]
    detected = sum(any(p.startswith(f"{PROBE} on ") for p in r["slowed"]["wall_clock"]) for r in rounds)
    changes = [c for r in rounds for c in r["probe_change"].values()]
    return {
        "comparisons": len(rounds),
        "false_alarms": sum(bool(r["unchanged"]["wall_clock"] or r["unchanged"]["exact"]) for r in rounds),
        "false_alarms_wall_clock": flagged("unchanged", "wall_clock"),
        "false_alarms_exact": flagged("unchanged", "exact"),
        "detections": detected,
        "detections_exact": sum(
            any(p.startswith(f"{PROBE} on ") for p in r["slowed"]["exact"]) for r in rounds
        ),
        "other_pairs_flagged_in_slowed_runs": sum(
            any(not p.startswith(f"{PROBE} on ") for p in r["slowed"]["wall_clock"]) for r in rounds
        ),
        "probe_change_median": statistics.median(changes) if changes else None,
        "probe_lines": probe_lines[:3],
        "settings": vars(args),
        "machine": {
            "platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version()
        },
        "wall_time_s": seconds,
        "rounds": rounds,
    }


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--worker"]:
        return worker(argv[1:])
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--comparisons", type=int, default=20, help="rounds (base, head, slowed); default 20")
    p.add_argument("--methods", default="cggm,ogm_ge,agm", help="methods besides the probe ('' for none)")
    p.add_argument("--tasks", default="synthetic_cls2", help="bench tasks (comma-separated)")
    p.add_argument("--probe-base", default="ogm_ge", help="the method the probe slows down")
    p.add_argument("--slowdown", type=float, default=0.25, help="injected slowdown of the probe's step")
    p.add_argument("--blocks", type=int, default=20, help="bench --blocks (default: bench's)")
    p.add_argument("--steps", type=int, default=8, help="bench --steps (default: bench's)")
    p.add_argument("--threshold", type=float, default=0.10, help="bench --threshold")
    p.add_argument("--load-procs", type=int, default=2, help="spinning processes while measuring (default 2)")
    p.add_argument("--max-minutes", type=float, default=60.0, help="bound on the measurement and the load")
    p.add_argument("--keep", metavar="DIR", help="keep every bench report in DIR (default: discarded)")
    p.add_argument("--out", default=str(ROOT / "results/gate/error_rates.json"), help="JSON summary")
    args = p.parse_args(argv)
    if args.comparisons < 1 or args.load_procs < 0 or not 0 < args.slowdown < 10:
        p.error("--comparisons >= 1, --load-procs >= 0 and 0 < --slowdown < 10 are required")
    summary = measure(args)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(summary, indent=1) + "\n")
    n = summary["comparisons"]
    print(f"false alarms: {summary['false_alarms']}/{n} (wall clock {summary['false_alarms_wall_clock']}, "
          f"exact {summary['false_alarms_exact']})")
    print(f"detections of a {args.slowdown:.0%} slowdown of {PROBE} ({args.probe_base}): wall clock "
          f"{summary['detections']}/{n}, exact {summary['detections_exact']}/{n}; measured change "
          f"{summary['probe_change_median']:+.1%} (median)")
    print(f"wall time: {summary['wall_time_s'] / 60:.1f} min; written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
