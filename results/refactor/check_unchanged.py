"""Check that a code change leaves every method's synthetic results unchanged.

Re-runs the runs of a matrix spec (default: ``results/synthetic/matrix.toml``) with one thread and
compares each run's id and test metrics, bit for bit, with the rows of a reference folder (default:
``results/synthetic/rows``). A refactor must report ``0 differ``; a change that alters results on
purpose must say so in its commit.

    python results/refactor/check_unchanged.py                          # every run (about 5 min, 1 core)
    python results/refactor/check_unchanged.py --methods ogm_ge,mmpareto --seeds 0
    python results/refactor/check_unchanged.py --reference /tmp/rows_before
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))  # check the checkout this script is in, whatever is installed

import torch  # noqa: E402

from mmbalance.matrix import load_spec, plan_matrix  # noqa: E402
from mmbalance.runner import run_one  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spec", default=str(ROOT / "results/synthetic/matrix.toml"))
    parser.add_argument("--reference", default=str(ROOT / "results/synthetic/rows"))
    parser.add_argument("--methods", default=None, help="comma-separated method names (default: all)")
    parser.add_argument("--datasets", default=None, help="comma-separated dataset names (default: all)")
    parser.add_argument("--seeds", type=int, nargs="*", default=None, help="seeds to check (default: all)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    reference = {}
    for path in Path(args.reference).glob("*.json"):
        row = json.loads(path.read_text())
        reference[(row["label"], row["dataset"], row["seed"])] = row
    methods = set(args.methods.split(",")) if args.methods else None
    datasets = set(args.datasets.split(",")) if args.datasets else None
    runs = [
        r
        for r in plan_matrix(load_spec(args.spec))
        if r.resolved is not None
        and (methods is None or r.method in methods)
        and (datasets is None or r.dataset in datasets)
        and (args.seeds is None or r.seed in args.seeds)
    ]
    if not runs:
        print("no run of the spec matches the filters", file=sys.stderr)
        return 2
    differ = missing = 0
    t0 = time.perf_counter()
    for run in runs:
        key = (run.label, run.dataset, run.seed)
        ref = reference.get(key)
        if ref is None:
            missing += 1
            print(f"MISSING  {run.label} on {run.dataset} seed {run.seed}: no reference row")
            continue
        row = run_one(run.resolved, device="cpu", quiet=True, command="check_unchanged")
        problems = []
        if row["run_id"] != ref["run_id"]:
            problems.append(f"run id {ref['run_id']} -> {row['run_id']}")
        for name, old in ref["metrics"]["test"].items():
            new = row["metrics"]["test"].get(name)
            if new != old:
                problems.append(f"test {name} {old!r} -> {new!r}")
        if row["metrics"]["best_epoch"] != ref["metrics"]["best_epoch"]:
            problems.append(f"best epoch {ref['metrics']['best_epoch']} -> {row['metrics']['best_epoch']}")
        differ += bool(problems)
        print(f"{'DIFFERS' if problems else 'same   '}  {run.label} on {run.dataset} seed {run.seed}"
              + (": " + "; ".join(problems) if problems else ""), flush=True)
    took = time.perf_counter() - t0
    print(f"{len(runs)} runs checked in {took:.0f} s: {differ} differ, {missing} without reference")
    return 1 if differ or missing else 0


if __name__ == "__main__":
    sys.exit(main())
