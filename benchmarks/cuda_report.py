"""What ``cuda_check.py`` reads back and writes: the environment, test results, cost tables, the
CUDA-vs-CPU metric comparison, the determinism check and the README of ``results/gpu/<device>/``.

Pure functions of files and dicts (no training), so the report can be rebuilt from a results folder:
``python benchmarks/cuda_check.py --stages report --out results/gpu``.
"""

from __future__ import annotations

import json
import math
import platform
import re
import shutil
import subprocess
import xml.etree.ElementTree as ET
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = [
    "environment",
    "slug",
    "junit_summary",
    "bench_table",
    "memory_note",
    "cggm_memory",
    "streams_table",
    "load_rows",
    "compare_rows",
    "compare_table",
    "determinism",
    "render_readme",
]

MIB = 2**20
TIMING_KEYS = frozenset({"epoch_time_s", "loader_wait_s"})  # wall-clock fields of a row's history
AMP_LABELS = ("fp32", "bf16")  # the folders of bench/
PAPER_CGGM_MB = (8, 24)  # the CGGM paper's extra GPU memory of its classifiers (App. C, "8MB to 24MB")


# -- environment ------------------------------------------------------------------------------------
def environment(device: str) -> dict[str, Any]:
    """Device name, driver, CUDA runtime, cuDNN, torch, memory, git commit (CUDA parts when present)."""
    import torch

    from mmbalance.runner import environment as row_environment

    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(
            "no CUDA device (torch.cuda.is_available() is False): `benchmarks/cuda_check.sh --dry-run` "
            "runs the same stages on the CPU"
        )
    env = row_environment(torch.device(device))
    env.update(python=platform.python_version(), cuda_runtime=torch.version.cuda, cudnn=None, driver=None)
    if device.startswith("cuda"):
        props = torch.cuda.get_device_properties(torch.device(device))
        env.update(
            cudnn=torch.backends.cudnn.version(),
            capability=f"{props.major}.{props.minor}",
            memory_gib=round(props.total_memory / 2**30, 1),
            device_count=torch.cuda.device_count(),
        )
        smi = shutil.which("nvidia-smi")
        if smi:
            out = subprocess.run(
                [smi, "--query-gpu=driver_version", "--format=csv,noheader"],
                capture_output=True,
                text=True,
                timeout=30,
                check=False,
            )
            env["driver"] = (
                out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None
            )
    return env


def slug(name: str) -> str:
    """A folder name for a device: ``NVIDIA H200`` -> ``nvidia-h200``."""
    text = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    return text or "device"


# -- tests ------------------------------------------------------------------------------------------
def junit_summary(paths: Iterable[Path]) -> dict[str, Any]:
    """Counts (passed, failed, errors, skipped, xfailed, xpassed) and failures over JUnit XML files."""
    counts = dict.fromkeys(("passed", "failed", "errors", "skipped", "xfailed"), 0)
    failures: list[str] = []
    for path in paths:
        for case in ET.parse(path).getroot().iter("testcase"):
            name = f"{case.get('classname', '')}::{case.get('name', '')}"
            kinds = {child.tag: child for child in case}
            if "failure" in kinds or "error" in kinds:
                key = "failed" if "failure" in kinds else "errors"
                counts[key] += 1
                node = kinds["failure"] if "failure" in kinds else kinds["error"]
                message = node.get("message", "")
                failures.append(f"{name}: {' '.join(message.split())[:300]}")
            elif "skipped" in kinds:
                xfail = kinds["skipped"].get("type") == "pytest.xfail"
                counts["xfailed" if xfail else "skipped"] += 1
            else:
                counts["passed"] += 1
    return {**counts, "failures": failures}


# -- cost tables ------------------------------------------------------------------------------------
def bench_table(reports: Sequence[Mapping[str, Any]]) -> str:
    """The README's cost table (results/cost format) over bench reports, memory in MiB."""
    lines = [
        "| method | task | floor (FLOP ratio) | measured ratio (median ± IQR of steps vs joint) "
        f"| above floor | {_memory_label(reports)} |",
        "|---|---|---:|---:|---:|---:|",
    ]
    rows = sorted(
        (r for report in reports for r in report["results"]), key=lambda r: (r["task"], r["method"])
    )
    for r in rows:
        excess = r["ratio_vs_joint"] / r["floor"] - 1 if r["floor"] else math.nan
        lines.append(
            f"| `{r['method']}` | {r['task']} | {r['floor']:.3f} | {r['ratio_vs_joint']:.3f} "
            f"({r['step_ms_median']:.2f} ± {r['step_ms_iqr']:.2f} ms vs {r['joint_step_ms_median']:.2f} ms) "
            f"| {excess * 100:+.0f}% | {r['mem_overhead_bytes'] / MIB:,.1f} |"
        )
    failed = [f for report in reports for f in report.get("failed", [])]
    if failed:
        lines.append("")
        lines += [
            f"- failed: `{f['method']}` on {f['task']}: {f['error'].splitlines()[0][:200]}" for f in failed
        ]
    return "\n".join(lines)


def _memory_label(reports: Sequence[Mapping[str, Any]]) -> str:
    kinds = {r.get("memory_kind") for report in reports for r in report["results"]}
    if kinds == {"cuda_peak_allocated"}:
        return "GPU memory overhead (MiB)"
    return "memory overhead (MiB, CPU: persistent state)"


def memory_note(reports: Sequence[Mapping[str, Any]]) -> str:
    """How the reports' memory overhead was measured."""
    kinds = {r.get("memory_kind") for report in reports for r in report["results"]}
    if kinds == {"cuda_peak_allocated"}:
        return (
            "CUDA peak-allocated bytes of the method's steps minus joint's, plus the state it keeps resident"
        )
    return "the bytes of the method's own parameters, gradients, buffers and optimizer state (CPU)"


def cggm_memory(reports: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """CGGM's measured overhead per task and AMP mode, beside the paper's 8-24 MB."""
    out = []
    for report in reports:
        for r in report["results"]:
            if r["method"] == "cggm":
                mib = r["mem_overhead_bytes"] / MIB
                low, high = PAPER_CGGM_MB
                where = "within" if low <= mib <= high else ("below" if mib < low else "above")
                out.append({"task": r["task"], "amp": r.get("amp", "none"), "mib": mib, "vs_paper": where})
    return out


def streams_table(off: Mapping[str, Any], on: Mapping[str, Any]) -> tuple[str, list[dict[str, Any]]]:
    """CGGM's ratio to joint with ``side_stream`` off and on, per task; the rows for the summary."""
    lines = [
        "| task | ratio, one stream | ratio, two streams | CGGM step ms, one / two | change of the ratio |",
        "|---|---:|---:|---:|---:|",
    ]
    index = {r["task"]: r for r in on["results"]}
    rows = []
    for r in off["results"]:
        two = index.get(r["task"])
        if two is None:
            continue
        change = two["ratio_vs_joint"] / r["ratio_vs_joint"] - 1
        rows.append(
            {"task": r["task"], "off": r["ratio_vs_joint"], "on": two["ratio_vs_joint"], "change": change}
        )
        lines.append(
            f"| {r['task']} | {r['ratio_vs_joint']:.3f} | {two['ratio_vs_joint']:.3f} | "
            f"{r['step_ms_median']:.2f} / {two['step_ms_median']:.2f} | {change * 100:+.1f}% |"
        )
    return "\n".join(lines), rows


def matrix_toml(spec: dict[str, Any]) -> str:
    """A matrix spec as TOML: top-level names and lists, ``[overrides]`` (keys flattened to dotted
    strings), and ``[dataset_overrides."<name>"]`` / ``[method_overrides."<name>"]`` tables."""

    def value(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, list | tuple):
            return "[" + ", ".join(value(x) for x in v) + "]"
        return json.dumps(v)

    def flat(table: dict[str, Any], prefix: str = "") -> dict[str, Any]:
        out: dict[str, Any] = {}
        for k, v in table.items():
            out.update(flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
        return out

    def keys(table: dict[str, Any]) -> list[str]:
        return [f"{json.dumps(k)} = {value(v)}" for k, v in flat(table).items()]

    lines = [f"{k} = {value(v)}" for k, v in spec.items() if not isinstance(v, dict)]
    if spec.get("overrides"):
        lines += ["", "[overrides]", *keys(spec["overrides"])]
    for section in ("dataset_overrides", "method_overrides"):
        for name, table in spec.get(section, {}).items():
            lines += ["", f"[{section}.{json.dumps(name)}]", *keys(table)]
    return "\n".join(lines) + "\n"


# -- result rows ------------------------------------------------------------------------------------
def load_rows(folder: Path) -> dict[str, dict[str, Any]]:
    """``{run_id: row}`` of the row files directly in ``folder`` (the plan in ``_matrix/`` excluded)."""
    rows = {}
    for path in sorted(folder.glob("*.json")):
        if not path.name.startswith("."):
            row = json.loads(path.read_text())
            rows[row["run_id"]] = row
    return rows


def _metric_items(row: Mapping[str, Any]) -> Iterable[tuple[str, float]]:
    for split in ("val", "test"):
        for name, value in (row.get("metrics") or {}).get(split, {}).items():
            if isinstance(value, int | float):
                yield f"{split}.{name}", float(value)


def compare_rows(device_rows: Mapping[str, Any], cpu_rows: Mapping[str, Any]) -> dict[str, Any]:
    """Per (dataset, metric): the largest and mean absolute difference between the device's rows and
    the CPU rows of the same runs (same run id), and the run of the largest; runs in one folder only
    and status mismatches are listed."""
    cells: dict[tuple[str, str], list[tuple[float, str]]] = {}
    best_epoch_same = status_mismatch = 0
    mismatches = []
    for run_id in sorted(set(device_rows) & set(cpu_rows)):
        a, b = device_rows[run_id], cpu_rows[run_id]
        if a["status"] != b["status"]:
            status_mismatch += 1
            mismatches.append(f"{run_id} ({a['label']} on {a['dataset']}): {a['status']} vs {b['status']}")
            continue
        if a["status"] != "ok":
            continue
        best_epoch_same += a["metrics"].get("best_epoch") == b["metrics"].get("best_epoch")
        other = dict(_metric_items(b))
        for name, value in _metric_items(a):
            if name in other and not (math.isnan(value) and math.isnan(other[name])):
                cells.setdefault((a["dataset"], name), []).append((abs(value - other[name]), run_id))
    table = []
    for (dataset, metric), diffs in sorted(cells.items()):
        worst, run_id = max(diffs)
        table.append(
            {
                "dataset": dataset,
                "metric": metric,
                "runs": len(diffs),
                "max_abs_diff": worst,
                "mean_abs_diff": sum(d for d, _ in diffs) / len(diffs),
                "worst_run": run_id,
            }
        )
    ok_pairs = sum(1 for r in set(device_rows) & set(cpu_rows) if device_rows[r]["status"] == "ok")
    return {
        "runs_compared": len(set(device_rows) & set(cpu_rows)),
        "ok_runs": ok_pairs,
        "only_device": sorted(set(device_rows) - set(cpu_rows)),
        "only_cpu": sorted(set(cpu_rows) - set(device_rows)),
        "best_epoch_same": best_epoch_same,
        "status_mismatches": mismatches,
        "cells": table,
        "max_abs_diff": max((c["max_abs_diff"] for c in table), default=math.nan),
    }


def compare_table(cmp: Mapping[str, Any]) -> str:
    lines = [
        "| dataset | metric | runs | max abs diff | mean abs diff | run of the max |",
        "|---|---|---:|---:|---:|---|",
    ]
    for c in cmp["cells"]:
        if c["metric"].startswith("test."):
            lines.append(
                f"| {c['dataset']} | {c['metric']} | {c['runs']} | {c['max_abs_diff']:.3g} | "
                f"{c['mean_abs_diff']:.3g} | {c['worst_run']} |"
            )
    return "\n".join(lines)


def _strip_timing(history: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    return [{k: v for k, v in epoch.items() if k not in TIMING_KEYS} for epoch in history]


def determinism(rerun_rows: Mapping[str, Any], reference_rows: Mapping[str, Any]) -> dict[str, Any]:
    """Runs repeated with ``deterministic=True``: identical when their metrics and their per-epoch
    history (loss terms, validation metrics, diagnostics; wall times left out) are equal, bit for bit."""
    same, different = [], []
    for run_id in sorted(set(rerun_rows) & set(reference_rows)):
        a, b = rerun_rows[run_id], reference_rows[run_id]
        equal = (
            a["status"] == b["status"]
            and json.dumps(a.get("metrics"), sort_keys=True) == json.dumps(b.get("metrics"), sort_keys=True)
            and json.dumps(_strip_timing(a.get("history", [])), sort_keys=True)
            == json.dumps(_strip_timing(b.get("history", [])), sort_keys=True)
        )
        name = f"{a['label']} on {a['dataset']} ({run_id})"
        if equal:
            same.append(name)
        else:
            diffs = [abs(x - dict(_metric_items(b)).get(k, math.nan)) for k, x in _metric_items(a)]
            worst = max((d for d in diffs if not math.isnan(d)), default=math.nan)
            different.append(f"{name}: largest metric difference {worst:.3g}")
    return {"identical": same, "different": different, "compared": len(same) + len(different)}


# -- the README -------------------------------------------------------------------------------------
def _env_lines(env: Mapping[str, Any]) -> list[str]:
    keys = (
        "device",
        "driver",
        "cuda_runtime",
        "cudnn",
        "torch",
        "capability",
        "memory_gib",
        "python",
        "git_commit",
        "dirty",
    )
    return [f"- {k}: `{env.get(k)}`" for k in keys if k in env]


def render_readme(summary: Mapping[str, Any], sections: Mapping[str, str]) -> str:
    """The folder's README: how it was made, then each stage's section (``sections[stage]``)."""
    env = summary.get("env", {})
    stages = summary.get("stages", {})
    head = [
        f"# CUDA check: {env.get('device', '?')}",
        "",
        f"Made by `{summary.get('command', 'benchmarks/cuda_check.sh')}` "
        f"({'dry run on the CPU, reduced sizes' if summary.get('dry_run') else 'full run'}).",
        "",
        *_env_lines(env),
        "",
        "| stage | status | wall time (s) | note |",
        "|---|---|---:|---|",
    ]
    for name, info in stages.items():
        head.append(
            f"| {name} | {info.get('status')} | {info.get('wall_s', 0):.0f} | {info.get('note', '')} |"
        )
    body = [f"\n## {title}\n\n{text}" for title, text in sections.items() if text]
    return "\n".join(head) + "\n" + "\n".join(body) + "\n"


def build_sections(out: Path, summary: dict[str, Any]) -> dict[str, str]:
    """The README sections from the files present in ``out``."""
    sections: dict[str, str] = {}
    tests = summary.get("tests")
    if tests:
        fails = "\n".join(f"- {f}" for f in tests["failures"][:50]) or "none"
        sections["gpu tests"] = (
            f"`pytest -m gpu` (the CUDA contract pass over every method in "
            f"`tests/methods/test_contract_cuda.py`, and every other `gpu` test): "
            f"{tests['passed']} passed, {tests['failed']} failed, {tests['errors']} errors, "
            f"{tests['skipped']} skipped, {tests['xfailed']} xfailed. Failures:\n\n{fails}"
        )
    for label in AMP_LABELS:
        reports = [json.loads(p.read_text()) for p in sorted((out / "bench" / label).glob("*.json"))]
        if reports:
            cmd = reports[0].get("command", "")
            mem = "; ".join(
                f"{c['task']} {c['mib']:.1f} MiB ({c['vs_paper']} 8-24 MB)" for c in cggm_memory(reports)
            )
            sections[f"cost, {label}"] = (
                f"`{cmd}` (one command per paper case). Memory overhead: "
                f"{memory_note(reports)}.\n\n{bench_table(reports)}\n\n"
                f"CGGM's {_memory_label(reports).split(' (')[0]} against the paper's 8-24 MB: "
                f"{mem or 'not measured'}."
            )
    off, on = out / "streams" / "off.json", out / "streams" / "on.json"
    if off.is_file() and on.is_file():
        table, rows = streams_table(json.loads(off.read_text()), json.loads(on.read_text()))
        faster = [r["task"] for r in rows if r["change"] < -0.02]
        verdict = (
            f"two streams lower CGGM's ratio by more than 2 % on {', '.join(faster)}"
            if faster
            else "two streams do not lower CGGM's ratio by more than 2 % anywhere: `side_stream` stays off"
        )
        sections["CGGM on two CUDA streams"] = f"{table}\n\nVerdict: {verdict}."
    cmp_path = out / "matrix" / "compare.json"
    if cmp_path.is_file():
        cmp = json.loads(cmp_path.read_text())
        sections["synthetic matrix, device vs CPU"] = (
            f"Seed 0 of `matrices/default.toml` on the device and on the CPU, the same runs (same run ids): "
            f"{cmp['runs_compared']} runs, best epoch equal in {cmp['best_epoch_same']} of {cmp['ok_runs']}; "
            f"largest absolute metric difference {cmp['max_abs_diff']:.3g} (test metrics below; all in "
            f"`matrix/compare.json`). Status mismatches: {cmp['status_mismatches'] or 'none'}.\n\n"
            f"{compare_table(cmp)}"
        )
    det_path = out / "determinism" / "result.json"
    if det_path.is_file():
        det = json.loads(det_path.read_text())
        lines = "\n".join(f"- different: {d}" for d in det["different"]) or "- every run identical"
        sections["determinism"] = (
            f"The same runs twice on the device with `deterministic=True`: "
            f"{len(det['identical'])} of {det['compared']} identical (metrics and per-epoch "
            f"history, wall times left out).\n\n{lines}"
        )
    return sections
