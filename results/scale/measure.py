"""Scale-out measurements: the local executor against the Ray executor, and the paper matrix's GPU-hours.

``local-vs-ray``: one synthetic matrix (24 runs: joint, cggm, ogm_ge, agm on synthetic_cls2 and
synthetic_reg3, seeds 0-2, the synthetic preset) trained twice, one thread per run: with the local
executor (one run after another in this process), then with the Ray executor on a local cluster of
``--workers`` CPUs (one CPU and one thread per run). Reports both wall times (Ray's with and without
starting the cluster), the speed-up, and Ray's per-run scheduling overhead: for every run, the
seconds between its submission by the driver and the start of its training in the worker (the Ray
executor keeps ``--max-in-flight`` = workers here, so a run is submitted when a worker is free and the
gap is scheduling, not queueing); median, IQR and maximum (the first runs also start the worker
processes). Checks that both executors give the same test metrics, run by run.

    python results/scale/measure.py local-vs-ray --out results/scale/local_vs_ray.json
    python results/scale/measure.py local-vs-ray --small --out /tmp/small.json     # 4 tiny runs

``plan``: what the paper matrix trains (runs, epochs, batch, steps per epoch and in all, per dataset)
and what each 100 ms of mean training-step time costs in GPU-hours (the arithmetic of the README).

    python results/scale/measure.py plan

``gpu-hours``: the paper matrix (``matrices/paper.toml``: every supported run) in GPU-hours and in
wall time on 8 and 32 GPUs, from the step times of a CUDA bench report
(``mmbalance bench --device cuda --paper-models --out BENCH.json``, the method's
``step_ms_median`` per paper shape). A run's GPU time = epochs x (training steps x its step time +
validation batches x joint's step time / 3, a forward-only pass being about a third of a training
step); steps per epoch = ceil(training samples / batch size) with the training split sizes of
``--data-root`` when given, else the documented ones in :data:`TRAIN_SAMPLES`. The wall time on G
GPUs is list scheduling in plan order, one run per GPU (what ``--executor ray --gpus-per-run 1``
does); the lower bound max(total / G, longest run) is printed beside it. Not counted: the one-time
Food-101 feature cache, multi-stage methods' extra steps, the cost measurement, data loading stalls.

    python results/scale/measure.py gpu-hours --bench BENCH.json --gpus 8 32
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from mmbalance.matrix import load_spec, parse_spec, plan_matrix  # noqa: E402
from mmbalance.matrix_run import run_matrix  # noqa: E402
from mmbalance.results import load_rows  # noqa: E402

MATRIX_24 = {
    "methods": ["joint", "cggm", "ogm_ge", "agm"],
    "datasets": ["synthetic_cls2", "synthetic_reg3"],
    "seeds": [0, 1, 2],
    "device": "cpu",
}
MATRIX_4 = {
    "methods": ["joint", "cggm"],
    "datasets": ["synthetic_cls2"],
    "seeds": [0, 1],
    "device": "cpu",
    "overrides": {"epochs": 1, "cost_steps": 0, "dataset.n_train": 256, "dataset.n_val": 64,
                  "dataset.n_test": 64},
}
# Training samples per epoch when --data-root is not given (check against your copy):
TRAIN_SAMPLES = {
    "mosi": 1284,  # CMU-MOSI train split (1284 / 229 / 686), datasets/mosi/README.md
    "iemocap": 4425,  # IEMOCAP 4-class, 5531 utterances; fold 1's trn is about 80 % (check trn_label.npy)
    "food101": 61189,  # UPMC Food-101 train 67988 minus the seeded 10 % validation (datasets/food101)
    "brats2021": 876,  # 1251 cases minus val 10 % and test 20 %; one random slice per case and epoch
}
VAL_SAMPLES = {"mosi": 229, "iemocap": 553, "food101": 6799, "brats2021": 125}
BENCH_TASK = {"mosi": "paper_mosi", "iemocap": "paper_iemocap", "food101": "paper_food101",
              "brats2021": "paper_brats"}
STARTS_ENV = "MMBALANCE_MEASURE_STARTS"


# -- local vs ray ------------------------------------------------------------------------------------
def timed_run_one(resolved: Any, **kwargs: Any) -> dict[str, Any]:
    """run_one, after writing the wall-clock start of training to ``$MMBALANCE_MEASURE_STARTS/<run_id>``."""
    from mmbalance.runner import run_one

    Path(os.environ[STARTS_ENV], resolved.run_id).write_text(repr(time.time()))
    return run_one(resolved, **kwargs)


def _iqr(values: list[float]) -> float:
    if len(values) < 2:
        return 0.0
    q = statistics.quantiles(values, n=4)
    return q[2] - q[0]


def local_vs_ray(args: argparse.Namespace) -> dict[str, Any]:
    import ray

    from mmbalance.executor_ray import RayExecutor, RayOptions

    class TimedRay(RayExecutor):
        """Records each run's submission time (wall clock, the driver's)."""

        def __init__(self, *a: Any, **kw: Any) -> None:
            super().__init__(*a, **kw)
            self.submitted: dict[str, float] = {}

        def submit(self, run: Any, on_start: Any = None, checkpoint: Any = None) -> Any:
            self.submitted[run.run_id] = time.time()
            return super().submit(run, on_start, checkpoint)

    spec = parse_spec(MATRIX_4 if args.small else MATRIX_24, "small" if args.small else "24 runs")
    torch.set_num_threads(1)
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        starts = Path(tmp, "starts")
        starts.mkdir()
        t0 = time.perf_counter()
        local = run_matrix(spec, Path(tmp, "local"), quiet=True)
        local_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        env = {"PYTHONPATH": str(ROOT), STARTS_ENV: str(starts), "OMP_NUM_THREADS": "1"}
        ray.init(num_cpus=args.workers, include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": env})
        ready_s = time.perf_counter() - t0
        executor = TimedRay(RayOptions(cpus_per_run=1, max_in_flight=args.workers), run_fn=timed_run_one)
        t1 = time.perf_counter()
        remote = run_matrix(spec, Path(tmp, "ray"), executor=executor, quiet=True)
        ray_s = time.perf_counter() - t1
        ray.shutdown()
        rows = {r.run_id: r for r in load_rows(Path(tmp, "local")).rows}
        ray_rows = {r.run_id: r for r in load_rows(Path(tmp, "ray")).rows}
        gaps = sorted(float(Path(starts, i).read_text()) - t for i, t in executor.submitted.items())
    same = rows.keys() == ray_rows.keys() and all(
        rows[i].metrics["test"] == ray_rows[i].metrics["test"] for i in rows)
    result = {
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "runs": len(rows),
        "local": {"counts": dict(local.counts), "wall_s": local_s},
        "ray": {"counts": dict(remote.counts), "workers": args.workers, "cluster_start_s": ready_s,
                "wall_s": ray_s, "wall_with_cluster_start_s": ready_s + ray_s},
        "speedup": local_s / ray_s,
        "speedup_with_cluster_start": local_s / (ready_s + ray_s),
        "scheduling_overhead_s": {"median": statistics.median(gaps), "iqr": _iqr(gaps), "max": gaps[-1],
                                  "all": gaps},
        "same_test_metrics": same,
        "machine": {"cpus": os.cpu_count(), "load_average_before": load_before,
                    "load_average_after": os.getloadavg(), "torch": torch.__version__,
                    "ray": ray.__version__},
    }
    print(f"{result['runs']} runs, one thread each; machine load average {load_before[0]:.1f} -> "
          f"{result['machine']['load_average_after'][0]:.1f} ({os.cpu_count()} CPUs)")
    print("| executor | wall time | speed-up |\n|---|---:|---:|")
    print(f"| local (one process) | {local_s:.1f} s | 1.00 |")
    print(f"| ray, {args.workers} workers | {ray_s:.1f} s | {result['speedup']:.2f} |")
    print(f"| ray, {args.workers} workers, with cluster start | {ready_s + ray_s:.1f} s | "
          f"{result['speedup_with_cluster_start']:.2f} |")
    o = result["scheduling_overhead_s"]
    print(f"Ray per-run scheduling overhead (submission -> training start): median {o['median']:.3f} s, "
          f"IQR {o['iqr']:.3f} s, max {o['max']:.2f} s; same test metrics: {same}")
    if not same or local.counts != remote.counts:
        raise SystemExit("local and ray rows differ: see the JSON report")
    return result


# -- the paper matrix in GPU-hours ----------------------------------------------------------------------
def _split_sizes(data_root: str | None) -> tuple[dict[str, int], dict[str, int], str]:
    if data_root is None:
        return dict(TRAIN_SAMPLES), dict(VAL_SAMPLES), "documented sizes (TRAIN_SAMPLES)"
    from mmbalance.datasets import DATASETS

    train, val = {}, {}
    for name in TRAIN_SAMPLES:
        ds = DATASETS.build(name, root=data_root)
        train[name], val[name] = len(ds.split("train")), len(ds.split("val"))
    return train, val, f"the splits under {data_root}"


def list_schedule(durations: list[float], gpus: int) -> float:
    """Makespan of running ``durations`` in order, each on the first free of ``gpus`` GPUs."""
    free = [0.0] * gpus
    for d in durations:
        i = min(range(gpus), key=free.__getitem__)
        free[i] += d
    return max(free)


def _paper_runs(data_root: str | None) -> tuple[list[tuple[Any, int, int]], str]:
    """(run, training steps per epoch, validation batches per epoch) of every run of the paper matrix
    that trains, and where the split sizes come from."""
    train, val, sizes_from = _split_sizes(data_root)
    paper = load_spec(ROOT / "matrices" / "paper.toml")
    out = []
    for run in plan_matrix(paper, data_root=data_root or "/data"):
        if run.resolved is not None:
            batch = run.resolved.train_config.batch_size
            out.append((run, math.ceil(train[run.dataset] / batch), math.ceil(val[run.dataset] / batch)))
    return out, sizes_from


def plan(args: argparse.Namespace) -> dict[str, Any]:
    """What the paper matrix trains, and its GPU-hours per 100 ms of mean training-step time."""
    runs, sizes_from = _paper_runs(args.data_root)
    per_dataset: dict[str, dict[str, Any]] = {}
    for run, steps, _ in runs:
        cfg = run.resolved.train_config
        d = per_dataset.setdefault(run.dataset, {"runs": 0, "epochs": cfg.epochs, "batch": cfg.batch_size,
                                                 "steps_per_epoch": steps, "training_steps": 0})
        d["runs"] += 1
        d["training_steps"] += cfg.epochs * steps
    total = sum(d["training_steps"] for d in per_dataset.values())
    print(f"matrices/paper.toml: {len(runs)} runs train; split sizes from {sizes_from}")
    print("| dataset | runs | epochs | batch | steps / epoch | training steps, all runs "
          "| GPU-hours per 100 ms | one run per 100 ms |\n|---|---:|---:|---:|---:|---:|---:|---:|")
    for name, d in per_dataset.items():
        print(f"| {name} | {d['runs']} | {d['epochs']} | {d['batch']} | {d['steps_per_epoch']} | "
              f"{d['training_steps']:,} | {d['training_steps'] * 0.1 / 3600:.2f} | "
              f"{d['epochs'] * d['steps_per_epoch'] * 0.1 / 3600:.3f} h |")
    print(f"| total | {len(runs)} | | | | {total:,} | {total * 0.1 / 3600:.2f} | |")
    return {"runs": len(runs), "training_steps": total, "per_dataset": per_dataset,
            "split_sizes_from": sizes_from}


def gpu_hours(args: argparse.Namespace) -> dict[str, Any]:
    rows = json.loads(Path(args.bench).read_text())["results"]
    step_ms = {(r["method"], r["task"]): float(r["step_ms_median"]) for r in rows}
    batches: dict[str, set[int]] = {}
    for r in rows:
        batches.setdefault(r["task"], set()).add(int(r["batch_size"]))
    for r in rows:  # joint is every pair's denominator
        step_ms[("joint", r["task"])] = float(r["joint_step_ms_median"])
    runs, sizes_from = _paper_runs(args.data_root)
    per_dataset: dict[str, dict[str, float]] = {}
    durations, missing = [], set()
    for run, steps, val_batches in runs:  # unimodal[m] runs: unimodal's step time (its first modality)
        cfg, task = run.resolved.train_config, BENCH_TASK[run.dataset]
        if (run.method, task) not in step_ms:
            missing.add((run.method, task))
            continue
        if batches[task] != {cfg.batch_size}:
            raise SystemExit(f"{args.bench}: {task} was timed at batch {sorted(batches[task])}, the paper "
                             f"matrix trains {run.dataset} at batch {cfg.batch_size}; bench on CUDA uses "
                             "the paper's sizes")
        joint = step_ms[("joint", task)]
        seconds = cfg.epochs * (steps * step_ms[(run.method, task)] + val_batches * joint / 3) / 1e3
        durations.append(seconds)
        d = per_dataset.setdefault(run.dataset, {"runs": 0, "epochs": cfg.epochs, "batch": cfg.batch_size,
                                                 "steps_per_epoch": steps, "gpu_hours": 0.0})
        d["runs"] += 1
        d["gpu_hours"] += seconds / 3600
    if missing:
        raise SystemExit(f"the bench report has no step time for {sorted(missing)}: run it with "
                         "--paper-models for every method")
    total = sum(durations) / 3600
    print(f"Paper matrix: {len(durations)} runs; split sizes from {sizes_from}; step times from {args.bench}")
    print("| dataset | runs | epochs | batch | steps / epoch | GPU-hours |\n|---|---:|---:|---:|---:|---:|")
    for name, d in per_dataset.items():
        print(f"| {name} | {d['runs']} | {d['epochs']} | {d['batch']} | {d['steps_per_epoch']} | "
              f"{d['gpu_hours']:.1f} |")
    print(f"| total | {len(durations)} | | | | {total:.1f} |")
    walls = {}
    print("| GPUs | wall time (plan order, one run per GPU) | lower bound |\n|---:|---:|---:|")
    for g in args.gpus:
        wall, bound = list_schedule(durations, g) / 3600, max(total / g, max(durations) / 3600)
        walls[g] = {"wall_hours": wall, "lower_bound_hours": bound}
        print(f"| {g} | {wall:.1f} h | {bound:.1f} h |")
    return {"runs": len(durations), "gpu_hours": total, "per_dataset": per_dataset, "wall": walls,
            "split_sizes_from": sizes_from, "bench": str(args.bench)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="what", required=True)
    p = sub.add_parser("local-vs-ray", help="a synthetic matrix's wall time, local vs Ray; Ray's overhead")
    p.add_argument("--small", action="store_true", help="4 tiny runs (a check that the script works)")
    p.add_argument("--workers", type=int, default=2, help="Ray workers (the local cluster's CPUs; default 2)")
    p.add_argument("--out", help="JSON report")
    q = sub.add_parser("plan", help="what the paper matrix trains; GPU-hours per 100 ms of step time")
    q.add_argument("--data-root", help="read the split sizes from the datasets here")
    q.add_argument("--out", help="JSON report")
    g = sub.add_parser("gpu-hours", help="the paper matrix's GPU-hours from a CUDA bench report")
    g.add_argument("--bench", required=True, help="mmbalance bench --device cuda --paper-models report")
    g.add_argument("--data-root", help="read the split sizes from the datasets here")
    g.add_argument("--gpus", type=int, nargs="+", default=[8, 32])
    g.add_argument("--out", help="JSON report")
    args = parser.parse_args(argv)
    result = {"local-vs-ray": local_vs_ray, "plan": plan, "gpu-hours": gpu_hours}[args.what](args)
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
