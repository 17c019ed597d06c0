"""Hand-written result rows for the results, tables and CLI tests (no training involved)."""

from __future__ import annotations

import hashlib
from typing import Any

ENV = {
    "device": "cpu (x86_64, 1 threads)", "torch": "2.x", "mmbalance": "0.1.0",
    "git_commit": "abc", "dirty": False,
}


def run_id_for(*parts: Any) -> str:
    return hashlib.sha256(repr(parts).encode()).hexdigest()[:12]


def make_row(
    label: str,
    dataset: str,
    seed: int,
    test: dict[str, float | None] | None = None,
    *,
    task: str = "cls",
    status: str = "ok",
    val: dict[str, float | None] | None = None,
    ratio: float = 1.0,
    mem: int = 0,
    config: dict[str, Any] | None = None,
    env: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """A schema-valid row; ``label`` like ``unimodal[text]`` sets ``method`` to ``unimodal``."""
    method = label.split("[", 1)[0]
    row: dict[str, Any] = {
        "run_id": run_id_for(label, dataset, seed, status, repr(config)),
        "status": status,
        "method": method,
        "label": label,
        "dataset": dataset,
        "task": task,
        "seed": seed,
        "config": config if config is not None else {
            "method": {}, "train": {"epochs": 1, "seed": seed}, "dataset": {}, "model": {}
        },
        "metrics": {},
        "history": [],
        "cost": {},
        "env": dict(env or ENV),
        "command": f"mmbalance run {method} {dataset} --seed {seed}",
    }
    if status == "ok":
        test = test or {}
        row["metrics"] = {"val": dict(val or test), "test": dict(test), "best_epoch": 0}
        row["history"] = [{"epoch": 0, "train_loss": 1.0, "val": dict(val or test), "diagnostics": {}}]
        row["cost"] = {
            "step_ms_median": 2.0 * ratio,
            "step_ms_iqr": 0.1,
            "step_time_ratio": ratio,
            "peak_mem_bytes": 1000 + mem,
            "mem_overhead_bytes": mem,
        }
    elif status == "failed":
        row["error"] = {
            "type": "NonFiniteLossError",
            "message": "loss term 'task' is nan at step 3 (epoch 0)",
            "traceback": "Traceback ...",
        }
    else:
        row["reason"] = f"method {method!r} does not support task {task!r}"
    return row
