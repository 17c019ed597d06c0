"""Render a `mmbalance bench` JSON report as the cost-vs-floor markdown tables.

    python results/cost/floor_table.py results/cost/bench_synthetic_cpu.json

The first table: every pair's FLOP floor, measured ratio, ATen operator calls per step (method /
joint, from the report's deterministic signals), memory overhead. Then, per task, how well the
measured ratios follow the FLOP floors and the call ratios; last, for each pair more than 10 %
above its floor, the operators whose calls per step the method adds most.
"""

from __future__ import annotations

import json
import statistics
import sys


def _calls(r: dict, side: str) -> float:
    s = r["signals"]
    return s[side]["aten_ops"] / s["steps"]


def main(path: str) -> None:
    report = json.load(open(path))
    env, results = report["env"], sorted(report["results"], key=lambda r: (r["method"], r["task"]))
    threads = sorted({r.get("threads") for r in results}, key=str)
    commit = str(env.get("git_commit"))[:7]
    print(f"Device: {env['device']}; intra-op threads per pair: {', '.join(map(str, threads))}; "
          f"torch {env['torch']}; commit {commit}; command: `{report.get('command', '')}`\n")
    print(
        "| method | task | floor (FLOP ratio) | measured ratio [95% CI] | step ms, method vs joint (median) "
        "| above floor | ATen calls / step, method / joint | memory overhead (bytes) |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    above = []
    for r in results:
        excess = r["ratio_vs_joint"] / r["floor"] - 1
        lo, hi = r.get("ratio_interval") or (float("nan"), float("nan"))
        m, j = _calls(r, "method"), _calls(r, "joint")
        print(
            f"| `{r['method']}` | {r['task']} | {r['floor']:.3f} "
            f"| {r['ratio_vs_joint']:.3f} [{lo:.3f}, {hi:.3f}] "
            f"| {r['step_ms_median']:.2f} vs {r['joint_step_ms_median']:.2f} "
            f"| {excess * 100:+.0f}% | {m:,.0f} / {j:,.0f} = {m / j:.2f} | {r['mem_overhead_bytes']:,} |"
        )
        if excess > 0.10:
            above.append(r)
    print("\nPearson correlation, over the methods of each task, of the measured ratio with the FLOP floor "
          "and with the ratio of ATen calls per step:\n")
    print("| task | pairs | with the FLOP floor | with the ATen-call ratio |")
    print("|---|---:|---:|---:|")
    for task in sorted({r["task"] for r in results}):
        rs = [r for r in results if r["task"] == task]
        if len(rs) < 3:
            continue
        time = [r["ratio_vs_joint"] for r in rs]
        flops = statistics.correlation(time, [r["floor"] for r in rs])
        calls = statistics.correlation(time, [_calls(r, "method") / _calls(r, "joint") for r in rs])
        print(f"| {task} | {len(rs)} | {flops:.2f} | {calls:.2f} |")
    if not above:
        return
    print("\nPairs more than 10 % above their floor: the operators the method adds most "
          "(extra calls per step)\n")
    print("| method | task | above floor | extra ATen calls / step | largest additions |")
    print("|---|---|---:|---:|---|")
    for r in above:
        s = r["signals"]
        mine, base = s["method"]["aten_ops_by_name"], s["joint"]["aten_ops_by_name"]
        extra = {k: (mine.get(k, 0) - base.get(k, 0)) / s["steps"] for k in set(mine) | set(base)}
        top = sorted((k for k in extra if extra[k] > 0), key=lambda k: (-extra[k], k))[:4]
        names = ", ".join(f"`{k.removeprefix('aten.')}` +{extra[k]:.0f}" for k in top)
        print(f"| `{r['method']}` | {r['task']} | {(r['ratio_vs_joint'] / r['floor'] - 1) * 100:+.0f}% "
              f"| {_calls(r, 'method') - _calls(r, 'joint'):+,.0f} | {names} |")


if __name__ == "__main__":
    main(sys.argv[1])
