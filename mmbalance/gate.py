"""The regression gate of ``mmbalance bench --compare``: two bench reports in, regressions out.

Two kinds of checks per (method, task) pair present in both reports:

* **exact**, no threshold: the deterministic signals (:mod:`mmbalance.signals`: FLOPs, ATen
  operator calls, persistent state bytes; on CUDA peak-allocated bytes and host-device syncs) of
  the method's and of joint's steps, and the memory overhead. Any growth fails, naming the signal,
  the trainer and the growth (for operator calls, the operators whose count grew). Counts are
  only comparable when both reports counted the same steps at the same epoch, batch size and
  precision; otherwise the pair fails as not comparable.
* **wall clock, with a noise model**: the step-time ratio's blocks of both reports are bootstrapped
  (:func:`mmbalance.bootstrap.change_interval`); the pair fails only when the lower bound of the
  95 % interval of ``ratio(head) / ratio(base)`` is above ``1 + threshold``. A base report without
  blocks (written before blocks existed) is taken at its point ratio, which the notes say; a report
  with fewer than ``MIN_BLOCKS`` blocks fails the pair as not comparable.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from mmbalance.bootstrap import Interval, change_interval
from mmbalance.signals import CUDA_SIGNAL_KEYS, SIGNAL_KEYS

__all__ = ["compare", "compare_notes", "ratio_text", "COMPARABLE_FIELDS", "MIN_BLOCKS"]

COMPARABLE_FIELDS = ("epoch", "batch_size", "amp")  # besides the counted steps
MIN_BLOCKS = 5  # fewer blocks leave the bootstrap without a spread to speak of


def ratio_text(result: Mapping[str, Any], digits: int = 2) -> str:
    """``2.41 [2.35, 2.49]`` (point and 95 % interval), or the bare ratio for an older report."""
    interval = result.get("ratio_interval")
    if interval is None:
        return f"{result['ratio_vs_joint']:.{digits}f}"
    return Interval(result["ratio_vs_joint"], interval[0], interval[1]).format(digits)


def _pairs(base: Mapping[str, Any], head: Mapping[str, Any]) -> list[tuple[str, Mapping, Mapping]]:
    index = {(r["method"], r["task"]): r for r in base["results"]}
    out = []
    for r in head["results"]:
        b = index.get((r["method"], r["task"]))
        if b is not None:
            out.append((f"{r['method']} on {r['task']}", b, r))
    return out


def _setting(result: Mapping[str, Any]) -> dict[str, Any]:
    return {"steps": result["signals"]["steps"], **{k: result.get(k) for k in COMPARABLE_FIELDS}}


def _grown_ops(base: Mapping[str, int], head: Mapping[str, int], limit: int = 5) -> str:
    grown = sorted(
        ((head.get(name, 0) - base.get(name, 0), name) for name in set(head) | set(base)),
        key=lambda item: (-item[0], item[1]),
    )
    parts = [f"{name} +{delta:,}" for delta, name in grown[:limit] if delta > 0]
    return f" ({', '.join(parts)})" if parts else ""


def _growth(base: Mapping[str, Any], head: Mapping[str, Any], key: str) -> str:
    b, h = base[key], head[key]
    text = f"{b:,} -> {h:,} (+{h - b:,}" + (f", +{(h / b - 1) * 100:.1f}%)" if b else ")")
    if key == "aten_ops":
        text += _grown_ops(base["aten_ops_by_name"], head["aten_ops_by_name"])
    return text


def _signal_problems(pair: str, base: Mapping[str, Any], head: Mapping[str, Any]) -> list[str]:
    if "signals" not in base or "signals" not in head:
        return []
    if _setting(base) != _setting(head):
        return [f"{pair}: signals not comparable: base {_setting(base)}, head {_setting(head)}"]
    problems = []
    for trainer in ("method", "joint"):
        b, h = base["signals"][trainer], head["signals"][trainer]
        for key in (*SIGNAL_KEYS, *CUDA_SIGNAL_KEYS):
            if key not in b and key not in h:
                continue
            if key not in b or key not in h:
                where = "base" if key not in b else "head"
                problems.append(f"{pair}: {trainer} {key} missing from the {where} report (another device?)")
                continue
            if h[key] > b[key]:
                problems.append(f"{pair}: {trainer} {key} over {base['signals']['steps']} step(s) "
                                + _growth(b, h, key))
    return problems


def _time_problem(pair: str, base: Mapping[str, Any], head: Mapping[str, Any], threshold: float) -> list[str]:
    head_blocks = head.get("block_ratios")
    if not head_blocks:
        raise ValueError(f"{pair}: the head report has no block_ratios; write it with this mmbalance bench")
    few = [(name, len(r["block_ratios"])) for name, r in (("base", base), ("head", head))
           if r.get("block_ratios") and len(r["block_ratios"]) < MIN_BLOCKS]
    if few:
        counts = ", ".join(f"the {name} report has {n}" for name, n in few)
        return [f"{pair}: ratio_vs_joint not compared: {counts} timing block(s), the noise model needs "
                f">= {MIN_BLOCKS} (--blocks)"]
    change = change_interval(head_blocks, base.get("block_ratios") or [base["ratio_vs_joint"]])
    if change.low <= 1 + threshold:
        return []
    pct = [(v - 1) * 100 for v in (change.point, change.low, change.high)]
    return [
        f"{pair}: ratio_vs_joint {ratio_text(base)} -> {ratio_text(head)}: change {pct[0]:+.1f}% "
        f"[{pct[1]:+.1f}%, {pct[2]:+.1f}%], its lower 95% bound is above +{threshold * 100:.0f}%"
    ]


def compare(base: Mapping[str, Any], head: Mapping[str, Any], threshold: float = 0.10) -> list[str]:
    """Regressions of ``head`` against ``base`` (see the module docstring); pairs present in only
    one report are not compared (:func:`compare_notes` lists them)."""
    if threshold < 0:
        raise ValueError(f"threshold must be >= 0, got {threshold!r}")
    problems = []
    for pair, b, h in _pairs(base, head):
        problems += _signal_problems(pair, b, h)
        if h["mem_overhead_bytes"] > b["mem_overhead_bytes"]:
            grown = f"{b['mem_overhead_bytes']:,} -> {h['mem_overhead_bytes']:,}"
            problems.append(f"{pair}: mem_overhead_bytes {grown}")
        problems += _time_problem(pair, b, h, threshold)
    return problems


def compare_notes(base: Mapping[str, Any], head: Mapping[str, Any]) -> list[str]:
    """What :func:`compare` could not check: pairs in one report only, and base pairs that predate
    the signals or the blocks."""
    pairs = _pairs(base, head)
    compared = {p for p, _, _ in pairs}
    notes = [f"{r['method']} on {r['task']}: only in the head report" for r in head["results"]
             if f"{r['method']} on {r['task']}" not in compared]
    for pair, b, _ in pairs:
        if "signals" not in b:
            notes.append(f"{pair}: the base report has no deterministic signals; not compared")
        if not b.get("block_ratios"):
            notes.append(f"{pair}: the base report has no timing blocks; compared with its point ratio")
    return notes
