"""Pieces of the ``mmbalance`` command line (:mod:`mmbalance.cli`) that are not one subcommand:
tracking options, the matrix's data check, ``matrix --spec-help``, subcommands whose options are
built only when they run, and the cause shown in a user error's line. Nothing here imports torch at
import time."""

from __future__ import annotations

import argparse
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mmbalance.errors import ConfigError, MMBalanceError, ResultError
from mmbalance.tracking import TRACKERS, Tracking, parse_log

if TYPE_CHECKING:
    from mmbalance.matrix import MatrixSpec

__all__ = [
    "BENCH_HELP",
    "Deferred",
    "SpecHelp",
    "add_bench",
    "add_fixtures",
    "add_log",
    "cause_text",
    "check_matrix_data",
    "command_of",
    "tracking_of",
]


def _error_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def cause_text(exc: BaseException) -> str:
    """The first chained cause that is not a user error (a plugin's ImportError, ...), with where it
    was raised: `` [cause: ModuleNotFoundError: No module named 'x', at plugin.py:3]``; "" if none."""
    cause = exc.__cause__
    while isinstance(cause, MMBalanceError):
        cause = cause.__cause__
    if cause is None:
        return ""
    frames = traceback.extract_tb(cause.__traceback__)
    where = f", at {frames[-1].filename}:{frames[-1].lineno}" if frames else ""
    return f" [cause: {type(cause).__name__}: {_error_line(cause)}{where}]"


def add_log(p: argparse.ArgumentParser, where: str) -> None:
    p.add_argument("--log", action="append", default=[], metavar="|".join(TRACKERS),
                   help="also mirror each run (config, per-epoch history, metrics, cost; named by its run "
                   "id) to TensorBoard and / or MLflow; repeatable or comma-separated (extras: "
                   "pip install 'mmbalance[tensorboard]' / 'mmbalance[mlflow]')")
    p.add_argument("--log-dir", metavar="DIR",
                   help=f"TensorBoard's folder and the MLflow SQLite store's (default: {where}/tracking)")
    p.add_argument("--mlflow-uri", metavar="URI",
                   help="MLflow tracking URI (default: sqlite:///<log dir>/mlflow.db; file:PATH is MLflow's "
                   "file store, which MLflow 3 opens only with MLFLOW_ALLOW_FILE_STORE=true)")


def tracking_of(args: argparse.Namespace, out: Path, experiment: str) -> Tracking | None:
    trackers = parse_log(args.log)
    if not trackers:
        if args.log_dir or args.mlflow_uri:
            raise ConfigError("--log-dir / --mlflow-uri need --log tensorboard|mlflow")
        return None
    tracking = Tracking(trackers, args.log_dir or str(out / "tracking"), args.mlflow_uri, experiment)
    tracking.check_installed()  # before anything trains
    return tracking


def check_matrix_data(spec: MatrixSpec, out: Path, shard: Any, sets: Any, data_root: str | None) -> None:
    """Stop before the first run when the runs still to do would miss data (one error for all)."""
    from mmbalance.matrix import check_data, plan_matrix, select_shard
    from mmbalance.matrix_run import DONE_STATUSES
    from mmbalance.results import read_row

    def done(run: Any) -> bool:
        try:
            return read_row(out / f"{run.run_id}.json").status in DONE_STATUSES
        except ResultError:
            return False

    runs = select_shard(plan_matrix(spec, set_overrides=sets, data_root=data_root), shard)
    check_data([r for r in runs if not done(r)], spec.source)


class SpecHelp(argparse.Action):
    """``matrix --spec-help``: print the spec format and exit (before the SPEC argument is needed)."""

    def __init__(self, option_strings: Sequence[str], dest: str, **kwargs: Any) -> None:
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, **kwargs)

    def __call__(self, parser: argparse.ArgumentParser, *_: Any) -> None:
        import mmbalance.matrix
        import mmbalance.variants

        doc = (mmbalance.matrix.__doc__ or "").split("\nThis module plans")[0].rstrip()
        grids = (mmbalance.variants.__doc__ or "").split("\n", 1)[1].rstrip()
        print(f"{doc}\n\nVariants and grids:\n{grids}\n\nMore: matrices/README.md in the repository.")
        parser.exit()


@dataclass(frozen=True)
class Deferred:
    """A subcommand whose options come from a module that imports torch: ``add`` runs only when it
    is the command given; otherwise the parser lists it with its ``help`` line alone."""

    name: str
    help: str
    add: Callable[[argparse._SubParsersAction], None]


def command_of(argv: Sequence[str]) -> str:
    """The subcommand named in ``argv`` ("" when none), skipping the global options."""
    skip = False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--threads":
            skip = True
        elif not arg.startswith("-"):
            return arg
    return ""


def add_bench(sub: argparse._SubParsersAction) -> None:
    from mmbalance import bench

    p = sub.add_parser(
        "bench", help=BENCH_HELP,
        description=(bench.__doc__ or "").split("\n\n")[0].replace("``", ""),
    )
    bench.add_arguments(p)
    p.set_defaults(func=bench.main)


def add_fixtures(sub: argparse._SubParsersAction) -> None:
    from mmbalance.datasets.fixtures import add_fixtures_command

    add_fixtures_command(sub)


BENCH_HELP = "step-time ratio and memory overhead of every method vs joint; regression gate"
