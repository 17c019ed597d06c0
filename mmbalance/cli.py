"""The ``mmbalance`` command: ``list``, ``run``, ``matrix``, ``table``, ``show``, ``plot``, ...

Each subcommand is one ``_add_<name>(subparsers)`` function that defines its options and sets
``func`` (``func(args) -> exit status``); adding a subcommand is one such function plus one entry
in :data:`COMMANDS`. User errors (:class:`~mmbalance.errors.MMBalanceError`) print one line,
``mmbalance: error: ...``, to stderr and exit with status 2, without a traceback; anything else is
a bug and keeps its traceback. ``matrix`` exits with 1 when a run of this invocation failed, ``run``
when its method called ``sys.exit``; a diverged run is a result (exit 0). Ctrl-C exits with 130.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from tabulate import tabulate

import mmbalance
from mmbalance.cli_execution import add_execution_arguments, execution_options, make_executor
from mmbalance.cli_rows import DEFAULT_OUT, add_plot, add_show, fmt_value
from mmbalance.cli_support import (
    BENCH_HELP,
    Deferred,
    SpecHelp,
    add_bench,
    add_fixtures,
    add_log,
    cause_text,
    check_matrix_data,
    command_of,
    tracking_of,
)
from mmbalance.config import parse_set
from mmbalance.errors import MMBalanceError, ResultError
from mmbalance.table_grid import DEFAULT_MAX_WIDTH, FORMATS, LAYOUTS, SPLITS
from mmbalance.threads import parse_threads

# Everything that imports torch (registries, training, the matrix) is imported inside the command
# that needs it, so that ``--version``, ``--help`` and ``list`` never import torch;
# ``bench`` and ``fixtures`` register their options only when they are the command (:class:`Deferred`).

__all__ = ["main", "build_parser", "COMMANDS", "DEFAULT_OUT", "Deferred"]

EXIT_USER_ERROR = 2


def _error_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def _command_line(argv: Sequence[str]) -> str:
    return shlex.join(["mmbalance", *argv])


def _int_at_least(option: str, minimum: int = 1) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            message = f"{option} must be an integer >= {minimum}, got {text!r}"
            raise argparse.ArgumentTypeError(message) from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{option} must be an integer >= {minimum}, got {value}")
        return value

    return parse


# -- list ------------------------------------------------------------------------------------------
def _cmd_list(args: argparse.Namespace) -> int:
    from mmbalance.catalog import KINDS, entries

    sections = []
    for kind in [args.kind] if args.kind else list(KINDS):
        modalities = args.modalities if kind != "models" else None
        lines = entries(kind, args.pattern, task=args.task, modalities=modalities)
        header = ["name", "tasks", "modalities", "paper"]
        body = tabulate(lines, headers=header, tablefmt="simple") if lines else "(none match)"
        sections.append(f"{kind}:\n{body}")
    print("\n\n".join(sections))
    return 0


def _add_list(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "list", help="list registered methods, datasets and models",
        description="List registered methods, datasets and models (broken plugins are listed as BROKEN).",
    )
    p.add_argument("pattern", nargs="?", default="*", help="fnmatch pattern on the name (default: *)")
    p.add_argument("--task", choices=("cls", "reg", "seg"), help="only entries supporting this task")
    p.add_argument("--modalities", type=_int_at_least("--modalities"), metavar="N",
                   help="only entries supporting N modalities")
    p.add_argument("--kind", choices=("methods", "datasets", "models"),
                   help="one registry only (default: all three)")
    p.set_defaults(func=_cmd_list)


# -- run -------------------------------------------------------------------------------------------


def _add_device(p: argparse.ArgumentParser, default: str | None) -> None:
    p.add_argument("--device", default=default, metavar="auto|cpu|cuda[:N]",
                   help="where to train (default: %(default)s)" if default
                   else "where to train (default: the spec's, else auto)")


def _add_set(p: argparse.ArgumentParser) -> None:
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                   help="config override, repeatable: epochs=3, method.rho=1.2, dataset.n_train=256 "
                   "(values are TOML; bare words are strings)")


def _print_metrics(row: dict[str, Any]) -> None:
    val = row["metrics"]["val"]
    test = row["metrics"]["test"]
    names = [k for k in test if not k.startswith("score/")] + [k for k in test if k.startswith("score/")]
    body = [[k, fmt_value(val.get(k)), fmt_value(test.get(k))] for k in names]
    print(f"{row['label']} on {row['dataset']}, seed {row['seed']} (run {row['run_id']}), "
          f"best epoch {row['metrics']['best_epoch']}")
    print(tabulate(body, headers=["metric", "val", "test"], tablefmt="simple", disable_numparse=True))


def _cmd_run(args: argparse.Namespace) -> int:

    from mmbalance.matrix_run import check_thread_count
    from mmbalance.output import prepare_output
    from mmbalance.resolve import RunSpec, resolve_run
    from mmbalance.results import load_rows, write_row
    from mmbalance.runner import run_one
    from mmbalance.train import resolve_device

    spec = RunSpec(
        method=args.method, dataset=args.dataset, model=args.model, preset=args.preset,
        seed=args.seed, overrides=parse_set(args.sets), data_root=args.data_root,
    )
    resolved = resolve_run(spec)
    device = resolve_device(args.device)
    out = prepare_output(args.out)  # before training: a result that cannot be written is not trained
    check_thread_count(load_rows(out).rows, device, args.threads, out)
    tracking = tracking_of(args, out, "mmbalance")
    try:
        row = run_one(
            resolved, device=device, quiet=args.quiet, command=args.command_line, threads=args.threads,
            tracking=tracking,
        )
    except SystemExit as exc:  # a method or plugin exiting is a failed run, not the end of this command
        print(f"mmbalance: error: run {resolved.run_id} failed: the run called sys.exit({exc.code!r}); "
              "nothing was written", file=sys.stderr)
        return 1
    path = write_row(out, row)
    if row["status"] == "diverged":
        print(f"{row['label']} on {row['dataset']}, seed {row['seed']} (run {row['run_id']}): DIVERGED: "
              f"{row['divergence']['reason']}")
    else:
        _print_metrics(row)
    print(f"row written to {path}")
    return 0


def _add_run(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "run", help="train and evaluate one method on one dataset",
        description="Train METHOD on DATASET, select on validation, test once, measure cost against joint; "
        "write the result row to OUT/<run_id>.json and print the metrics.",
    )
    p.add_argument("method", help="registered method name (see `mmbalance list --kind methods`)")
    p.add_argument("dataset", help="registered dataset name (see `mmbalance list --kind datasets`)")
    p.add_argument("--preset", help="training/method preset (default: the dataset's)")
    _add_set(p)
    _add_device(p, "auto")
    p.add_argument("--seed", type=_int_at_least("--seed", 0), help="random seed (default: the preset's)")
    p.add_argument("--out", default=DEFAULT_OUT, help="results folder (default: %(default)s)")
    p.add_argument("--model", help="registered model builder (default: the dataset's)")
    p.add_argument("--data-root", help="folder holding the dataset files (datasets that read files)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    add_log(p, "OUT")
    p.set_defaults(func=_cmd_run)


# -- matrix ----------------------------------------------------------------------------------------
def _print_tables(out: Path, **options: Any) -> None:
    """Print the tables of the rows in ``out`` (``options`` go to
    :func:`~mmbalance.tables.render_tables`); each unreadable file is a warning line naming it (one
    error line naming the first of them when nothing is left to show)."""
    from mmbalance.results import load_plan, load_rows
    from mmbalance.tables import render_tables

    loaded = load_rows(out)
    plan, plan_problems = load_plan(out)
    problems = (*loaded.problems, *plan_problems)
    if not loaded.rows and not plan:
        skipped = f" ({len(problems)} unreadable file(s) skipped, e.g. {problems[0]})" if problems else ""
        raise ResultError(f"no result rows in {str(out)!r}{skipped}")
    for problem in problems:
        print(f"mmbalance: warning: skipped {problem}", file=sys.stderr)
    sys.stdout.write(render_tables(loaded.rows, plan=plan, **options))
    sys.stdout.flush()


def _cmd_matrix(args: argparse.Namespace) -> int:
    from mmbalance.matrix import load_spec, parse_shard
    from mmbalance.matrix_jobs import run_with_jobs
    from mmbalance.matrix_run import run_matrix, runs_to_train

    shard = parse_shard(args.shard)
    sets = parse_set(args.sets)
    spec = load_spec(args.spec)
    out = Path(args.out) if args.out else Path(DEFAULT_OUT) / Path(args.spec).stem
    options = execution_options(args)
    check_matrix_data(spec, out, shard, sets, args.data_root)
    tracking = tracking_of(args, out, Path(args.spec).stem)

    def run(quiet: bool) -> Any:
        return run_matrix(spec, out, shard=shard, set_overrides=sets, data_root=args.data_root,
                          device=args.device, quiet=quiet, executor=make_executor(args, tracking), **options)

    def to_train() -> list[str]:
        return runs_to_train(spec, out, shard=shard, set_overrides=sets, data_root=args.data_root)

    report = run_with_jobs(args, run, to_train, device=args.device or spec.device)
    print(report.summary(), file=sys.stderr)
    if not args.no_tables:
        _print_tables(out)
    return 1 if report.failed else 0


def _add_matrix(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "matrix", help="run (or resume) a methods x datasets x seeds matrix",
        description="Run the matrix of a TOML spec (format: `mmbalance matrix --spec-help`, or "
        "matrices/README.md), one JSON row per run in OUT; re-running skips finished runs and retries "
        "failed ones. Checks that every dataset's files are there before the first run. Prints the "
        "metric and cost tables at the end.",
    )
    p.add_argument("spec", help="matrix spec (TOML), e.g. matrices/default.toml")
    p.add_argument("--out", help=f"results folder (default: {DEFAULT_OUT}/<spec name>)")
    p.add_argument("--shard", metavar="K/N",
                   help="run only shard K of N (1-based, every N-th run from the K-th)")
    _add_set(p)
    p.add_argument("--data-root", help="folder holding the dataset files (overrides the spec's data_root)")
    _add_device(p, None)
    p.add_argument("-q", "--quiet", action="store_true", help="no progress lines")
    p.add_argument("--no-tables", action="store_true", help="do not print the tables at the end")
    add_log(p, "OUT")
    p.add_argument("--spec-help", action=SpecHelp, help="print the spec format (TOML) and exit")
    add_execution_arguments(p)
    p.set_defaults(func=_cmd_matrix)


# -- table -----------------------------------------------------------------------------------------
def _cmd_table(args: argparse.Namespace) -> int:
    metrics = [m.strip() for m in args.metrics.split(",") if m.strip()] if args.metrics is not None else None
    _print_tables(
        Path(args.dir), fmt=args.format, split=args.split, layout=args.layout, metrics=metrics,
        delta=args.delta, marks=not args.no_marks, max_width=args.width, cost=not args.no_cost,
    )
    return 0


def _add_table(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "table", help="render the metric and cost tables of a results folder",
        description="Render the metric table (mean ± std (n) over seeds; - unsupported, x failed, "
        "div diverged, ... missing) "
        "and the cost table of the rows in DIR. Unreadable files are reported on stderr and skipped.",
    )
    p.add_argument("dir", help="results folder (as written by `mmbalance matrix` or `mmbalance run`)")
    p.add_argument("--format", choices=FORMATS, default="github", help="output format (default: %(default)s)")
    p.add_argument("--split", choices=SPLITS, default="test", help="which metrics (default: %(default)s)")
    p.add_argument("--layout", choices=LAYOUTS, default="default", help="default: one table, dataset x "
                   "metric columns; paper: one table per dataset with the paper's columns")
    p.add_argument("--metrics", metavar="M1,M2", help="metric columns instead of the per-task defaults "
                   "(e.g. acc,f1_macro,mae)")
    p.add_argument(
        "--delta", action="store_true",
        help="add a Δ-vs-joint column after every metric column; † marks a difference that a two-sided "
        "paired t-test across seeds does not find significant (p >= 0.05)",
    )
    p.add_argument(
        "--no-marks", action="store_true",
        help="no best (bold) / second-best marks, no ‡ (below the best single modality), no (≡ joint) flags",
    )
    p.add_argument(
        "--width", type=_int_at_least("--width", 0), default=DEFAULT_MAX_WIDTH, metavar="N",
        help="github: one table per dataset when a line would be longer than N characters; 0 never "
        "splits (default: %(default)s)",
    )
    p.add_argument("--no-cost", action="store_true", help="the metric tables only, without the cost table")
    p.set_defaults(func=_cmd_table)


# -- entry point -----------------------------------------------------------------------------------
# One line per subcommand: the function adding its parser.
COMMANDS: list[Callable[[argparse._SubParsersAction], None] | Deferred] = [
    _add_list,
    _add_run,
    _add_matrix,
    _add_table,
    add_show,
    add_plot,
    Deferred("fixtures", "write tiny copies of the paper datasets in their on-disk formats", add_fixtures),
    Deferred("bench", BENCH_HELP, add_bench),
]


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The ``mmbalance`` argument parser with every subcommand of :data:`COMMANDS`; with
    ``command``, the :class:`Deferred` subcommands other than it get a placeholder parser."""
    parser = argparse.ArgumentParser(
        prog="mmbalance",
        description="Multimodal imbalance: balancing methods behind one interface, and a resumable "
        "benchmark.",
    )
    parser.add_argument("--version", action="version", version=f"mmbalance {mmbalance.__version__}")
    parser.add_argument(
        "--threads", type=parse_threads, default="auto",
        help="intra-op CPU threads per run: 'auto' (default: one thread when a forward pass of the model "
        "on one batch is under 1e9 FLOPs, torch's default count otherwise; see mmbalance.threads) or a "
        "count. Two processes whose threads each want every core slow each other down by orders of magnitude",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for entry in COMMANDS:
        if not isinstance(entry, Deferred):
            entry(sub)
        elif command is None or command == entry.name:
            entry.add(sub)
        else:
            sub.add_parser(entry.name, help=entry.help, add_help=False)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit status (0 ok, 1 failed runs, 2 user error)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser(command_of(argv)).parse_args(argv)
    args.command_line, args.argv = _command_line(argv), argv
    if isinstance(args.threads, int):
        import torch

        torch.set_num_threads(args.threads)
    try:
        return int(args.func(args))
    except MMBalanceError as exc:
        print(f"mmbalance: error: {_error_line(exc)}{cause_text(exc)}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("mmbalance: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # output piped into `head` and closed early: not an error
        sys.stderr.close()
        return 0


if __name__ == "__main__":
    sys.exit(main())
