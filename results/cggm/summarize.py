"""Markdown tables of the CGGM synthetic matrix (results/cggm/README.md).

Usage: ``python results/cggm/summarize.py RUNS_DIR [RUNS_DIR ...] > tables.md``: every ``*.json``
row under the folders (as written by ``mmbalance matrix``) is read and grouped by variant:
``joint``, ``unimodal[m]``, and ``cggm-<direction>[+stabilize]``. Cells are ``mean ± std (n)``
over seeds. Score columns ``score/<m>`` are the fused model's test score with every other
modality's features zeroed (the runner's per-modality score).
"""

from __future__ import annotations

import statistics
import sys
from collections import defaultdict
from pathlib import Path

from mmbalance.results import load_rows

HIGHER = {"acc": True, "mae": False, "dice_mean": True}
PRIMARY = {"cls": "acc", "reg": "mae", "seg": "dice_mean"}


def variant(row) -> str:
    if row.method == "cggm":
        m = row.config["method"]
        name = f"cggm-{m['direction'] or 'none'}"
        return name + ("+stabilize" if m["stabilize"] else "")
    return row.label


def cell(values: list[float], scale: float = 1.0, digits: int = 1) -> str:
    values = [v * scale for v in values if v is not None]
    if not values:
        return "..."
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.{digits}f} ± {sd:.{digits}f} ({len(values)})"


def order(name: str) -> tuple[int, str]:
    rank = 0 if name == "joint" else 1 if name.startswith("unimodal") else 2
    return rank, name


def main(folders: list[str]) -> None:
    rows = [r for f in folders for r in load_rows(f).rows if r.status == "ok"]
    by_ds: dict[str, dict[str, list]] = defaultdict(lambda: defaultdict(list))
    for r in rows:
        by_ds[r.dataset][variant(r)].append(r)
    for ds in sorted(by_ds):
        groups = by_ds[ds]
        any_row = next(iter(groups.values()))[0]
        primary = PRIMARY[any_row.task]
        scale, digits = (1.0, 3) if primary == "mae" else (100.0, 1)
        mods = any_row.data.get("modalities") or []
        arrow = "↑" if HIGHER[primary] else "↓"
        print(f"\n### {ds} (test {primary} {arrow}; score/<m> {'↓' if primary == 'mae' else '↑'})\n")
        score_name = "score" if primary != "mae" else "score (sign acc)"
        head = ["variant", f"{primary}", *[f"{score_name}/{m}" for m in mods], "best epoch", "step-time ratio"]
        print("| " + " | ".join(head) + " |")
        print("|" + "---|" * len(head))
        for name in sorted(groups, key=order):
            rs = groups[name]
            fused = cell([r.metric("test", primary) for r in rs], scale, digits)
            scores = [
                cell([r.metric("test", f"score/{m}") for r in rs], 100.0, 1) if not name.startswith("unimodal") else "-"
                for m in mods
            ]
            best = cell([float(r.metrics["best_epoch"]) for r in rs], 1.0, 1)
            ratio = cell([r.cost.get("step_time_ratio") for r in rs], 1.0, 2)
            print(f"| {name} | {fused} | " + " | ".join(scores) + f" | {best} | {ratio} |")
    print("\n### CGGM stability diagnostics (means over epochs, then over seeds)\n")
    head = ["dataset", "variant", "steps with |ΣΔε| < 1/batch", "steps with a negative raw B", "max |B| seen", "final-epoch ε (heads, train)"]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for ds in sorted(by_ds):
        for name in sorted(n for n in by_ds[ds] if n.startswith("cggm")):
            rs = by_ds[ds][name]
            small, neg, bmax, eps = [], [], [], []
            for r in rs:
                diags = [h["diagnostics"] for h in r.history if h.get("diagnostics")]
                small.append(statistics.mean(d["frac_small_sum"] for d in diags))
                neg.append(statistics.mean(d["frac_negative_B"] for d in diags))
                bmax.append(max(max(abs(v) for k, v in d.items() if k.startswith(("B_min/", "B_max/"))) for d in diags))
                mods = r.data.get("modalities") or []
                eps.append(" / ".join(f"{diags[-1][f'eps/{m}'] * 100:.0f}" for m in mods))
            eps_text = "; ".join(eps)
            print(
                f"| {ds} | {name} | {cell(small, 100.0, 1)} % | {cell(neg, 100.0, 1)} % | "
                f"{max(bmax):.3g} | {eps_text} |"
            )


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit("usage: python results/cggm/summarize.py RUNS_DIR [RUNS_DIR ...]")
    missing = [f for f in sys.argv[1:] if not Path(f).is_dir()]
    if missing:
        sys.exit(f"not a folder: {', '.join(missing)}")
    main(sys.argv[1:])
