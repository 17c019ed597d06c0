"""``mmbalance show`` and ``mmbalance plot``: the commands that read result rows.

Both find a row by file path or by run id (a unique prefix) under ``--dir`` (default ``runs``);
user errors are :class:`~mmbalance.errors.MMBalanceError`, printed as one line by the CLI.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Any

from tabulate import tabulate

from mmbalance.errors import ConfigError, ResultError

__all__ = ["add_show", "add_plot", "fmt_value", "DEFAULT_OUT"]

DEFAULT_OUT = "runs"  # where `run` writes rows and `show` / `plot` look for them


# -- show ------------------------------------------------------------------------------------------
def fmt_value(value: Any) -> str:
    """A metric value for the terminal: ``-`` for None, 4 significant digits."""
    if value is None:
        return "-"
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.4g}"
    return str(value)


def _find_row_file(target: str, folder: Path) -> Path:
    """A row file: ``target`` itself, or the one file under ``folder`` whose run id starts with it."""
    path = Path(target)
    if path.is_file():
        return path
    if not folder.is_dir():
        where = f"the results folder {str(folder)!r} (--dir)"
        raise ResultError(f"{target!r} is not a file, and {where} does not exist")
    candidates = folder.rglob(f"{target}*.json")
    matches = sorted(p for p in candidates if not p.name.startswith(".") and p.parent.name != "_matrix")
    if not matches:
        raise ResultError(
            f"no result file or run id {target!r} under {str(folder)!r} (--dir); expected a path or a run id "
            "(prefix)"
        )
    distinct = {p.stem for p in matches}
    if len(distinct) > 1:
        shown = ", ".join(sorted(distinct)[:8])
        raise ResultError(f"run id prefix {target!r} is ambiguous under {str(folder)!r}: {shown}")
    return matches[0]


def _add_dir(p: argparse.ArgumentParser, *aliases: str) -> None:
    p.add_argument("--dir", *aliases, dest="dir", default=DEFAULT_OUT,
                   help="results folder searched (recursively) for run ids (default: %(default)s)"
                   + (f"; {', '.join(aliases)} is an older spelling" if aliases else ""))


def _flat(prefix: str, value: Any) -> list[tuple[str, Any]]:
    if isinstance(value, dict):
        out: list[tuple[str, Any]] = []
        for k, v in value.items():
            out += _flat(f"{prefix}.{k}" if prefix else str(k), v)
        return out
    return [(prefix, value)]


def _cmd_show(args: argparse.Namespace) -> int:
    from mmbalance.results import read_row

    row = read_row(_find_row_file(args.target, Path(args.dir)))
    d = row.data
    lines = [
        f"run {row.run_id}: {row.label} on {row.dataset} ({row.task}), seed {row.seed}: {row.status.upper()}",
        f"command: {row.command}",
        "env: " + ", ".join(f"{k}={fmt_value(v)}" for k, v in row.env.items()),
    ]
    if row.status == "unsupported":
        lines.append(f"reason: {d.get('reason', '')}")
    if row.status == "diverged":
        div = d["divergence"]
        lines.append(f"diverged at step {div.get('step')} (epoch {div.get('epoch')}): {div['reason']}")
    if row.status == "failed" and row.error:
        lines += [f"error: {row.error.get('type')}: {row.error.get('message')}",
                  str(row.error.get("traceback", "")).rstrip()]
    if row.config:
        config = [(k, repr(v) if v is None or isinstance(v, str) else v) for k, v in _flat("", row.config)]
        lines += ["", "config:", tabulate(config, tablefmt="plain", disable_numparse=True)]
    if row.status == "ok":
        val, test = row.metrics["val"], row.metrics["test"]
        names = list(dict.fromkeys([*test, *val]))
        lines += ["", f"metrics (best epoch {row.metrics['best_epoch']}):",
                  tabulate([[k, fmt_value(val.get(k)), fmt_value(test.get(k))] for k in names],
                           headers=["metric", "val", "test"], tablefmt="simple", disable_numparse=True)]
        if row.cost:
            cost = [[k, fmt_value(v)] for k, v in row.cost.items()]
            lines += ["", "cost:", tabulate(cost, tablefmt="plain", disable_numparse=True)]
    if row.history:
        hist = []
        keys: list[str] = []
        for record in row.history:
            flat = dict(_flat("", {k: v for k, v in record.items() if k not in ("epoch",)}))
            hist.append((record.get("epoch"), flat))
            keys += [k for k in flat if k not in keys]
        body = [[epoch, *(fmt_value(flat.get(k)) for k in keys)] for epoch, flat in hist]
        lines += ["", "history:",
                  tabulate(body, headers=["epoch", *keys], tablefmt="simple", disable_numparse=True)]
    print("\n".join(lines))
    return 0


def add_show(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "show", help="summarise one result row",
        description="Print one result row: status, command, environment, config, metrics, cost and per-epoch "
        "history.",
    )
    p.add_argument("target", metavar="RUN_ID_OR_FILE", help="a row file, or a run id (prefix) under --dir")
    _add_dir(p, "--out")
    p.set_defaults(func=_cmd_show)


# -- plot ------------------------------------------------------------------------------------------
def _cmd_plot(args: argparse.Namespace) -> int:
    from mmbalance import plotting  # matplotlib only when plotting

    if bool(args.targets) == bool(args.label):
        raise ConfigError("plot needs RUN (row files or run ids) or --label with --dataset, one of the two")
    if args.label:
        from mmbalance.results import load_rows

        if not args.dataset:
            raise ConfigError(f"--label {args.label!r} needs --dataset: the seed mean is over one dataset")
        loaded = load_rows(args.dir)
        rows = [r.data for r in loaded.rows if r.status == "ok" and r.dataset == args.dataset]
        against = None if args.against.lower() == "none" else args.against
        out = args.out or f"{args.label}_{args.dataset}.png"
        path = plotting.plot_seed_mean(rows, args.label, out, against=against)
    elif len(args.targets) == 1:
        path = plotting.plot_run(_find_row_file(args.targets[0], Path(args.dir)), args.out)
    else:
        files = [_find_row_file(t, Path(args.dir)) for t in args.targets]
        path = plotting.plot_runs(files, args.out or f"{'_'.join(f.stem[:6] for f in files)}.png")
    print(f"plot written to {path}")
    return 0


def add_plot(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "plot", help="draw per-epoch curves of runs (PNG): validation scores per modality, diagnostics",
        description="Draw the per-epoch history of result rows: the per-modality validation scores, the "
        "validation metric and training loss of any run, and the method's diagnostics where it logs them "
        "(CGGM: ε_i, B_i, cos_i, gradient norms and cosines, L_gm), one panel each. Several RUNs are "
        "overlaid; --label draws the mean ± std over seeds of a method's runs on --dataset beside joint's.",
    )
    p.add_argument("targets", metavar="RUN", nargs="*",
                   help="row files, or run ids (unique prefixes) under --dir; several are overlaid")
    p.add_argument("--label", help="instead of RUNs: the seed mean ± std of this method label (e.g. cggm)")
    p.add_argument("--dataset", help="with --label: the dataset whose runs are averaged")
    p.add_argument("--against", default="joint",
                   help="with --label: the label drawn beside it (default: joint; none: alone)")
    p.add_argument("--out",
                   help="PNG path (default: one RUN: its row file with .png; else a name in this folder)")
    _add_dir(p)
    p.set_defaults(func=_cmd_plot)
