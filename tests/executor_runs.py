"""Run functions for executor tests: module-level (so Ray workers import them by name), each wrapping
:func:`mmbalance.runner.run_one`. Markers go to the folder named by ``MMBALANCE_TEST_MARKERS``."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from mmbalance.runner import run_one

KILL_LABEL, KILL_SEED = "joint", 0  # the run whose first attempt waits to be killed


def _markers() -> Path:
    return Path(os.environ["MMBALANCE_TEST_MARKERS"])


def waits_to_be_killed(resolved: Any, **kwargs: Any) -> dict[str, Any]:
    """The first attempt of ``joint`` seed 0 writes its pid to ``<markers>/<run_id>.pid`` and waits (the
    test SIGKILLs its worker); every other attempt and run trains normally."""
    pid_file = _markers() / f"{resolved.run_id}.pid"
    if (resolved.label, resolved.seed) == (KILL_LABEL, KILL_SEED) and not pid_file.exists():
        pid_file.write_text(str(os.getpid()))
        time.sleep(300)
    return run_one(resolved, **kwargs)


def raises_for_weak(resolved: Any, **kwargs: Any) -> dict[str, Any]:
    """``unimodal[weak]`` raises (each attempt is counted in ``<markers>/<run_id>.calls``); the rest train."""
    if resolved.label == "unimodal[weak]":
        with open(_markers() / f"{resolved.run_id}.calls", "a") as f:
            f.write("call\n")
        raise RuntimeError(f"boom in {resolved.label} seed {resolved.seed}")
    return run_one(resolved, **kwargs)


def sleeps(resolved: Any, **kwargs: Any) -> dict[str, Any]:
    """Writes ``<markers>/<run_id>.started``, then sleeps for five minutes (a run to cancel)."""
    (_markers() / f"{resolved.run_id}.started").write_text("started")
    time.sleep(300)
    return run_one(resolved, **kwargs)
