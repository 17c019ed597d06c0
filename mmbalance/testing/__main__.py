"""``python -m mmbalance.testing NAME [NAME ...]``: the contract suite on registered methods.

Prints one line per check (``ok`` or ``FAIL`` with what differed) and a summary line per method.
Exit status: 0 when every check passes, 1 when one fails (or a plugin fails to import), 2 for a
bad argument (an unknown method name, with the close match; a task or device that cannot be used).
"""

from __future__ import annotations

import argparse
import difflib
import sys
from collections.abc import Sequence

import torch

from mmbalance.errors import ConfigError, RegistryError
from mmbalance.methods import METHODS
from mmbalance.testing._setup import SYNTHETIC_TASKS, Subject, as_device, subject
from mmbalance.testing.suite import CheckResult, plan_checks, run_checks

__all__ = ["main"]

PROG = "python -m mmbalance.testing"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG,
        description="Run the mmbalance contract suite (finite steps, determinism, gradient scope, state "
        "round trip, weights-only state, stop-resume-finish) on registered methods, built-in or plugin.",
    )
    p.add_argument("names", nargs="+", metavar="NAME", help="registered method names")
    p.add_argument("--tasks", nargs="+", metavar="TASK", help="synthetic tasks to check (default: every "
                   f"one the method declares, of {', '.join(SYNTHETIC_TASKS)})")
    p.add_argument("--device", default="cpu", help="cpu (default) or a CUDA device such as cuda or cuda:1")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    return p


def _unknown(name: str) -> str:
    close = difflib.get_close_matches(name, METHODS.names(), n=1)
    hint = f"did you mean {close[0]!r}?" if close else "`mmbalance list` shows the registered methods"
    return f"unknown method {name!r}; {hint}"


def _subjects(names: Sequence[str]) -> tuple[list[Subject], list[str]]:
    """The methods to check, and a failure line for each plugin that failed to import.

    Raises:
        ConfigError: an unknown name (naming it and the close match).
    """
    broken = METHODS.broken()
    found, failures = [], []
    for name in dict.fromkeys(names):
        if name in broken:
            failures.append(f"FAIL {name}: the plugin failed to import: {broken[name]!r}")
        elif name not in METHODS:
            raise ConfigError(_unknown(name))
        else:
            found.append(subject(name))
    return found, failures


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit status."""
    args = _parser().parse_args(argv)
    if args.threads < 1:
        print(f"{PROG}: error: --threads must be an integer >= 1, got {args.threads}", file=sys.stderr)
        return 2
    try:
        methods, failures = _subjects(args.names)
        device = as_device(args.device)
        for method in methods:
            plan_checks(method, args.tasks, device)
    except (ConfigError, RegistryError) as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    for line in failures:
        print(line, flush=True)

    def show(result: CheckResult) -> None:
        print(result.line(), flush=True)

    failed = len(failures)
    for method in methods:
        report = run_checks(method, tasks=args.tasks, device=device, on_result=show)
        bad = sum(not r.passed for r in report.results)
        failed += bad
        print(f"{method.name}: {len(report.results) - bad} of {len(report.results)} checks passed "
              f"on {', '.join(report.tasks)} ({report.device})", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
