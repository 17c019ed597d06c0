"""CGGM's stability diagnostics per row label of a results folder (results/cggm/README.md).

Usage: ``python results/cggm/stability.py RUNS_DIR``. The metric and cost tables of the same rows
are ``mmbalance table RUNS_DIR``; this script adds what they do not show: from each CGGM row's
per-epoch diagnostics, the fraction of steps with ``|Σ Δε| < 1/batch``, the fraction with a negative
raw coefficient, the largest ``|B|`` applied, and each seed's final-epoch head metrics ε. Rows are
grouped by their label (a variant's name and its grid values, as the matrix wrote them).
"""

from __future__ import annotations

import statistics
import sys
from collections import defaultdict
from pathlib import Path

from mmbalance.results import load_plan, load_rows


def cell(values: list[float], scale: float = 1.0, digits: int = 1) -> str:
    values = [v * scale for v in values]
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.{digits}f} ± {sd:.{digits}f} ({len(values)})"


def main(folder: str) -> None:
    plan, _ = load_plan(folder)
    rows = [r for r in plan.relabel(load_rows(folder).rows) if r.status == "ok" and r.method == "cggm"]
    groups: dict[tuple[str, str], list] = defaultdict(list)
    for r in rows:
        groups[(r.dataset, r.label)].append(r)
    head = ["dataset", "variant", "steps with |ΣΔε| < 1/batch", "steps with a negative raw B",
            "max |B| seen", "final-epoch ε (heads, train)"]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for (dataset, label), rs in sorted(groups.items()):
        small, neg, bmax, eps = [], [], [], []
        for r in sorted(rs, key=lambda r: r.seed):
            diags = [h["diagnostics"] for h in r.history if h.get("diagnostics")]
            small.append(statistics.mean(d["frac_small_sum"] for d in diags))
            neg.append(statistics.mean(d["frac_negative_B"] for d in diags))
            bounds = ("B_min/", "B_max/")
            bmax.append(max(abs(v) for d in diags for k, v in d.items() if k.startswith(bounds)))
            mods = r.data.get("modalities") or []
            eps.append(" / ".join(f"{diags[-1][f'eps/{m}'] * 100:.0f}" for m in mods))
        print(f"| {dataset} | {label} | {cell(small, 100.0)} % | {cell(neg, 100.0)} % | {max(bmax):.3g} | "
              f"{'; '.join(eps)} |")


if __name__ == "__main__":
    if len(sys.argv) != 2 or not Path(sys.argv[1]).is_dir():
        sys.exit("usage: python results/cggm/stability.py RUNS_DIR")
    main(sys.argv[1])
