"""Render a `mmbalance bench` JSON report as the cost-vs-floor markdown table.

    python results/cost/floor_table.py results/cost/bench_synthetic_cpu.json
"""

from __future__ import annotations

import json
import sys


def main(path: str) -> None:
    report = json.load(open(path))
    env = report["env"]
    print(f"Device: {env['device']}; torch {env['torch']}; command: `{report.get('command', '')}`\n")
    print(
        "| method | task | floor (FLOP ratio) | measured ratio (median, IQR of steps) | above floor "
        "| memory overhead (bytes) |"
    )
    print("|---|---|---:|---:|---:|---:|")
    for r in sorted(report["results"], key=lambda r: (r["method"], r["task"])):
        excess = r["ratio_vs_joint"] / r["floor"] - 1
        print(
            f"| `{r['method']}` | {r['task']} | {r['floor']:.3f} | {r['ratio_vs_joint']:.3f} "
            f"({r['step_ms_median']:.2f} ± {r['step_ms_iqr']:.2f} ms vs {r['joint_step_ms_median']:.2f} ms) "
            f"| {excess * 100:+.0f}% | {r['mem_overhead_bytes']:,} |"
        )


if __name__ == "__main__":
    main(sys.argv[1])
