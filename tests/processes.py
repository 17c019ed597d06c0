"""Subprocess helpers for the kill tests: wait for a condition while the process is alive, then SIGKILL."""

from __future__ import annotations

import signal
import subprocess
import time
from collections.abc import Callable
from typing import Any


def wait_for(predicate: Callable[[], Any], proc: subprocess.Popen, what: str, timeout: float = 180,
             poll: float = 0.01) -> None:
    """Poll ``predicate`` until it is truthy; fail with the process's stderr if it exits first, and with
    ``what`` if ``timeout`` seconds pass."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else f"exited {proc.returncode}"
        assert time.monotonic() < deadline, f"{what} did not happen within {timeout} s"
        time.sleep(poll)


def sigkill(proc: subprocess.Popen) -> None:
    """SIGKILL ``proc``, reap it and close its stderr pipe."""
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    if proc.stderr:
        proc.stderr.close()
