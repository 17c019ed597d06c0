"""``mmbalance matrix`` options that say where and how runs execute: the executor, its resources,
claims and checkpoints (:mod:`mmbalance.executor`, :mod:`mmbalance.claims`, :mod:`mmbalance.checkpoint`).

Values are parsed here, not by argparse types, so that a bad one is the CLI's usual single error line
naming the option, the value and what is expected. Defining the options imports nothing that imports
torch (the CLI answers ``--help`` without it); making the executor does.
"""

from __future__ import annotations

import argparse
import functools
import math
from typing import TYPE_CHECKING, Any

from mmbalance.claims import DEFAULT_CLAIM_TIMEOUT_S
from mmbalance.errors import ConfigError

if TYPE_CHECKING:
    from mmbalance.executor import Executor

__all__ = ["add_execution_arguments", "make_executor", "execution_options", "EXECUTORS"]

EXECUTORS = ("local", "ray")  # --executor choices
RAY_ONLY = ("address", "gpus_per_run", "cpus_per_run", "max_in_flight")


def add_execution_arguments(p: argparse.ArgumentParser) -> None:
    """Add ``--executor``, the Ray resources, ``--claim-timeout`` and the checkpoint options to ``p``."""
    g = p.add_argument_group("execution", "where runs train (see README, 'Run the matrix on a cluster')")
    g.add_argument("--executor", default="local", metavar="local|ray",
                   help="local: runs train in this process, and in --jobs - 1 more (default); ray: a Ray "
                   "task per run")
    g.add_argument("--jobs", default="auto", metavar="auto|N",
                   help="local: worker processes sharing the matrix through its claims (default auto: one "
                   "per usable core on the CPU, 1 on CUDA); each caps torch at cores // N threads")
    g.add_argument("--address", metavar="auto|HOST:PORT|ray://HOST:PORT",
                   help="ray: the cluster to join (default: start a local one sized to this machine)")
    g.add_argument("--gpus-per-run", metavar="F",
                   help="ray: GPUs per run; a fraction below 1 shares a GPU (default: 1 on CUDA, 0 on CPU)")
    g.add_argument("--cpus-per-run", metavar="N",
                   help="ray: CPUs per run, also its torch threads (default: 1)")
    g.add_argument("--max-in-flight", metavar="N",
                   help="ray: runs submitted at once (default: twice what the cluster runs at a time)")
    g.add_argument("--claim-timeout", metavar="SECONDS", default=str(int(DEFAULT_CLAIM_TIMEOUT_S)),
                   help="a run claimed by a process whose heartbeat is older than this is taken over "
                   "(default: %(default)s)")
    g.add_argument("--checkpoint-every", metavar="auto|N", default="auto",
                   help="epoch checkpoints every N epochs (0: never; auto: every epoch for runs expected to "
                   "train at least a minute; default: %(default)s); a killed run resumes from its last one")
    g.add_argument("--keep-checkpoints", action="store_true",
                   help="keep <out>/_ckpt/<run_id>/ after the run's row is written")


def _integer(option: str, text: str | None, least: int) -> int | None:
    if text is None:
        return None
    try:
        value = int(text)
    except ValueError:
        value = None
    if value is None or value < least:
        raise ConfigError(f"{option} must be an integer >= {least}, got {text!r}")
    return value


def _seconds(option: str, text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise ConfigError(f"{option} must be a number of seconds > 0, got {text!r}")
    return value


def _gpus(text: str | None) -> float | None:
    if text is None:
        return None
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value >= 0):
        raise ConfigError(
            f"--gpus-per-run must be a number >= 0 (a fraction below 1 shares a GPU), got {text!r}"
        )
    return value


def execution_options(args: argparse.Namespace) -> dict[str, Any]:
    """``run_matrix`` keywords from the parsed options: ``claim_timeout``, ``checkpoint_every``,
    ``keep_checkpoints``."""
    from mmbalance.checkpoint import parse_checkpoint_every

    return {
        "claim_timeout": _seconds("--claim-timeout", args.claim_timeout),
        "checkpoint_every": parse_checkpoint_every(args.checkpoint_every),
        "keep_checkpoints": args.keep_checkpoints,
    }


def make_executor(args: argparse.Namespace, tracking: Any = None) -> Executor:
    """The executor the options ask for, training each run with :func:`mmbalance.runner.run_one`
    (mirrored to ``tracking`` when given) at the thread setting of ``--threads`` (local) or
    ``--cpus-per-run`` (Ray); not started: the matrix starts it when a run is to train.

    Raises:
        ConfigError: an unknown executor, a malformed or out-of-range value, a Ray option without
            ``--executor ray``, or ``--executor ray`` without Ray installed (naming the extra).
    """
    if args.executor not in EXECUTORS:
        raise ConfigError(f"--executor must be one of {', '.join(EXECUTORS)}, got {args.executor!r}")
    if args.executor == "local":
        given = [f"--{name.replace('_', '-')}" for name in RAY_ONLY if getattr(args, name) is not None]
        if given:
            verb = "applies" if len(given) == 1 else "apply"
            raise ConfigError(f"{', '.join(given)} only {verb} to --executor ray, not --executor local")
        from mmbalance.executor import LocalExecutor
        from mmbalance.runner import run_one

        run_fn = functools.partial(run_one, threads=args.threads, tracking=tracking) if tracking else None
        return LocalExecutor(run_fn, threads=args.threads)
    from mmbalance.executor_ray import RayExecutor, RayOptions, import_ray

    options = RayOptions(
        address=args.address,
        gpus_per_run=_gpus(args.gpus_per_run),
        cpus_per_run=_integer("--cpus-per-run", args.cpus_per_run, 1) or 1,
        max_in_flight=_integer("--max-in-flight", args.max_in_flight, 1),
    )
    import_ray()  # a missing ray is an error now, before anything is planned or written
    run_fn = None
    if tracking:
        from mmbalance.runner import run_one

        run_fn = functools.partial(run_one, threads=options.cpus_per_run, tracking=tracking)
    return RayExecutor(options, run_fn)
