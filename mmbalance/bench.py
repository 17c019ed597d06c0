"""``mmbalance bench``: step-time ratio, deterministic cost signals and memory of every method vs ``joint``.

For each (method, task) pair the method and ``joint`` are built on the same initial weights, given
the same batches, set to the same epoch (``--epoch``: by default the last epoch of the case's
training preset, moved into the method's modulation window when that ends earlier, so warm-ups and
windows are active), warmed up, then measured in one process:

* deterministic signals (:mod:`mmbalance.signals`), counted over ``--signal-steps`` steps of each
  trainer: FLOPs, ATen operator calls, persistent state bytes; on CUDA also peak-allocated bytes
  and host-device synchronisations;
* wall clock: ``--blocks`` blocks of ``--steps`` interleaved steps per trainer
  (:func:`mmbalance.measure.time_blocks`), spread over ``--passes`` passes over all pairs (each
  pair is built again for each pass), so that a load lasting a while hits a share of a pair's
  blocks rather than all of them; ``ratio_vs_joint`` is the median of the per-block paired ratios,
  ``ratio_interval`` its 95 % bootstrap interval over blocks (:mod:`mmbalance.bootstrap`), shown as
  ``2.41 [2.35, 2.49]``;
* ``floor``: the FLOPs of a method step over a joint step, the ratio the algorithm's own extra work
  explains; a measured ratio far above it is overhead worth investigating;
* memory overhead (CUDA: peak-allocated delta; CPU: exact persistent bytes of the method's state).

Each case runs with the thread rule of :mod:`mmbalance.threads` (``--threads``, recorded per pair).

``--compare BASE.json`` is the regression gate (:mod:`mmbalance.gate`): it exits non-zero when a
deterministic signal or the memory overhead grew at all, or when the lower 95 % bound of the
step-time ratio's change is above ``--threshold`` (relative, default 10 %).

Paper-sized models (``--paper-models``) run on random inputs of the paper datasets' shapes (no data
needed): MOSI/IEMOCAP MulT-style, Food-101 ViT-B/16 + BERT-base, BraTS DeepLabv3+ ResNet-101. Each
case's initial model is built once per process and copied for every pair
(:class:`~mmbalance.bench_cases.InitialModels`): a paper-sized model takes seconds to initialise, its
copy on the device milliseconds.

``--set KEY=VALUE`` overrides method config fields for every benchmarked method (e.g.
``--methods cggm --set side_stream=true``); a method without that field is an error.

A pair that fails at run time (a ``RuntimeError`` such as CUDA running out of memory at paper sizes)
is recorded under ``failed`` with its error and the others go on; the command then exits with 1.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tabulate import tabulate

from mmbalance.bench_cases import (
    PAPER_CASES,
    SYNTHETIC_TASKS,
    BenchCase,
    build_pair,
    default_epoch,
    method_epoch,
    random_batches,
)
from mmbalance.bootstrap import median_interval
from mmbalance.config import parse_set
from mmbalance.datasets import DATASETS
from mmbalance.datasets.base import DatasetSpec, TensorDictDataset
from mmbalance.errors import ConfigError, MMBalanceError
from mmbalance.gate import compare, compare_notes, ratio_text
from mmbalance.measure import StepTimes, block_ratios, memory_cost, time_blocks
from mmbalance.methods import METHODS
from mmbalance.presets import TRAIN_PRESETS
from mmbalance.signals import count_signals
from mmbalance.threads import ThreadSetting, decide_threads, intra_op_threads
from mmbalance.train import (
    TrainConfig,
    Trainer,
    resolve_device,
)

__all__ = [
    "SYNTHETIC_TASKS",
    "BenchCase",
    "random_batches",
    "BenchSettings",
    "PAPER_CASES",
    "default_epoch",
    "method_epoch",
    "build_pair",
    "bench_pair",
    "finish_pair",
    "run_bench",
    "compare",
    "format_table",
    "main",
    "add_arguments",
]

@dataclass(frozen=True)
class BenchSettings:
    """How much to measure per pair (the ``config`` of a report)."""

    blocks: int = 20  # timing blocks (the bootstrap's unit)
    steps: int = 8  # timed steps per trainer per block
    warmup: int = 5  # interleaved steps before anything is counted or timed
    signal_steps: int = 2  # steps per trainer counted for the deterministic signals
    passes: int = 2  # passes over all pairs, each timing a share of every pair's blocks

    def blocks_in_pass(self, index: int) -> int:
        """Blocks timed in pass ``index``: the blocks split as evenly as they go."""
        return self.blocks // self.passes + (1 if index < self.blocks % self.passes else 0)

    def check(self) -> None:
        for name in ("blocks", "steps", "signal_steps"):
            value = getattr(self, name)
            if value < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be an integer >= 1, got {value}")
        if self.warmup < 0:
            raise ConfigError(f"--warmup must be an integer >= 0, got {self.warmup}")
        if not 1 <= self.passes <= self.blocks:
            raise ConfigError(f"--passes must be an integer in [1, --blocks], got {self.passes}")


def bench_pair(
    method: str,
    spec: DatasetSpec,
    model_name: str,
    *,
    model_preset: str | None,
    train_set: TensorDictDataset,
    val_set: TensorDictDataset,
    cfg: TrainConfig,
    device: torch.device,
    settings: BenchSettings,
    epoch: int | None = None,
    threads: ThreadSetting | None = "auto",
    method_preset: str | None = None,
    pass_index: int = 0,
    overrides: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Measure one method against joint on the same weights and batches (see the module docstring).
    ``epoch`` None: :func:`default_epoch` of the method's config and ``cfg.epochs``.

    Pass 0 counts the signals, times its share of the blocks and measures memory; a later pass
    (``pass_index`` >= 1) only times its share, in ``block_ms``; :func:`finish_pair` merges them.
    """
    if epoch is None:
        epoch = method_epoch(method, spec, cfg.epochs, method_preset)
    trainers, batches = build_pair(
        method, spec, model_name, model_preset=model_preset, train_set=train_set, val_set=val_set,
        cfg=cfg, device=device, epoch=epoch, method_preset=method_preset, overrides=overrides,
    )
    count, rule = decide_threads(threads, trainers["joint"].model, batches[0], device)
    with intra_op_threads(count):
        return {
            "method": method,
            "task": spec.default_preset if spec.default_preset else spec.task,
            "epoch": epoch,
            "threads": count,
            "threads_rule": rule,
            **_measure_pair(trainers, batches, device, settings, epoch, pass_index),
            "batch_size": cfg.batch_size,
            "amp": cfg.amp,
            "extra_steps": trainers["method"].balancer.extra_steps(),
        }


def _measure_pair(
    trainers: Mapping[str, Trainer],
    batches: Sequence[Mapping[str, torch.Tensor]],
    device: torch.device,
    settings: BenchSettings,
    epoch: int,
    pass_index: int,
) -> dict[str, Any]:
    order = {"joint": trainers["joint"], "method": trainers["method"]}
    for i in range(settings.warmup):
        for t in order.values():
            t.train_step(batches[i % len(batches)], epoch, i % len(batches))
    out: dict[str, Any] = {}
    if pass_index == 0:
        signals = {
            name: count_signals(t, batches, steps=settings.signal_steps, epoch=epoch, device=device,
                                first_step=settings.warmup)
            for name, t in order.items()
        }
        flops_m, flops_j = signals["method"]["flops"], signals["joint"]["flops"]
        out.update(
            floor=flops_m / flops_j if flops_j else float("nan"),
            flops_method=flops_m // settings.signal_steps,
            flops_joint=flops_j // settings.signal_steps,
            signals={"steps": settings.signal_steps, **signals},
        )
    blocks = settings.blocks_in_pass(pass_index)
    out["block_ms"] = time_blocks(
        order, batches, blocks=blocks, steps=settings.steps, device=device, epoch=epoch
    )
    if pass_index == 0:
        out.update(memory_cost(trainers["method"], trainers["joint"], batches, device=device, epoch=epoch))
    return out


def finish_pair(record: dict[str, Any], later: Sequence[Mapping[str, Any]] = ()) -> dict[str, Any]:
    """A pair's report entry: the blocks of pass 0 (``record``) and of the ``later`` passes merged
    into ``block_ratios``, ``ratio_vs_joint`` (their median), ``ratio_interval`` (95 %) and the
    step-time medians and IQRs; the raw step times are dropped."""
    times = {name: list(record["block_ms"][name]) for name in ("method", "joint")}
    for part in later:
        for name in times:
            times[name] += part["block_ms"][name]
    ratios = block_ratios(times["method"], times["joint"])
    interval = median_interval(ratios)
    method_ms = StepTimes(tuple(ms for block in times["method"] for ms in block))
    joint_ms = StepTimes(tuple(ms for block in times["joint"] for ms in block))
    out = {k: v for k, v in record.items() if k != "block_ms"}
    out.update(
        ratio_vs_joint=interval.point,
        ratio_interval=[interval.low, interval.high],
        block_ratios=ratios,
        step_ms_median=method_ms.median,
        step_ms_iqr=method_ms.iqr,
        joint_step_ms_median=joint_ms.median,
        joint_step_ms_iqr=joint_ms.iqr,
        timed_steps=len(method_ms.ms),
    )
    return out


def _cases(tasks: Sequence[str], paper_models: bool) -> list[tuple[str, DatasetSpec, str, str | None, Any]]:
    out = []
    for name in tasks:
        if name in PAPER_CASES:
            c = PAPER_CASES[name]
            out.append((name, c.spec, c.model, c.model_preset, c))
            continue
        ds = DATASETS.build(name)
        out.append((name, ds.spec, ds.spec.default_model, None, ds))
    if paper_models:
        for name, c in PAPER_CASES.items():
            if name not in tasks:
                out.append((name, c.spec, c.model, c.model_preset, c))
    return out


def _case_epochs(spec: DatasetSpec, source: Any) -> int:
    """Epochs of the case's training preset (the paper case's, else the dataset's default preset)."""
    preset = source.train_preset if isinstance(source, BenchCase) else spec.default_preset
    return int(TRAIN_PRESETS.get(preset or "", {}).get("epochs", TrainConfig.epochs))


def run_bench(
    methods: Sequence[str] | None = None,
    tasks: Sequence[str] | None = None,
    *,
    paper_models: bool = False,
    device: str = "auto",
    batch_size: int | None = None,
    settings: BenchSettings | None = None,
    epoch: int | None = None,
    threads: ThreadSetting | None = "auto",
    amp: str = "none",
    seed: int = 0,
    progress: bool = True,
    overrides: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Benchmark every (method, task) pair; returns ``{"env", "config", "results", "skipped",
    "failed"}``.

    ``epoch``: the epoch index every pair runs at; None: each pair's :func:`default_epoch`.
    ``threads``: see :mod:`mmbalance.threads` (decided per case, recorded per pair).
    ``overrides``: method config fields set for every method.
    """
    from mmbalance.runner import environment

    settings = settings or BenchSettings()
    settings.check()
    if epoch is not None and epoch < 0:
        raise ConfigError(f"--epoch must be an integer >= 0, got {epoch}")
    dev = resolve_device(device)
    methods = list(methods) if methods else [m for m in METHODS.names() if m != "joint"]
    tasks = list(tasks) if tasks is not None else (list(SYNTHETIC_TASKS) if not paper_models else [])
    skipped: list[dict[str, str]] = []
    pairs: list[tuple[str, str, dict[str, Any]]] = []  # (case name, method, bench_pair's arguments)
    for name, spec, model_name, model_preset, source in _cases(tasks, paper_models):
        paper = isinstance(source, BenchCase)
        bs = batch_size or (source.batch_size if paper and dev.type == "cuda" else (8 if paper else 64))
        epochs = _case_epochs(spec, source)
        if epoch is not None and epoch >= epochs:
            raise ConfigError(
                f"--epoch {epoch} is past the last epoch ({epochs - 1}) of {name}'s training preset"
            )
        cfg = TrainConfig(epochs=epochs, batch_size=bs, seed=seed, amp=amp, eval_modality_scores=False)
        if paper:
            train_set = random_batches(spec, bs, min(settings.warmup + settings.steps, 8), seed)
            val_set = random_batches(spec, bs, 1, seed + 1)
        else:
            train_set, val_set = source.split("train"), source.split("val")
        for method in methods:
            cls = METHODS.get(method)
            if not cls.supports(task=spec.task, modalities=len(spec.modalities)):
                skipped.append({"method": method, "task": name, "reason": "unsupported"})
                continue
            pairs.append((name, method, dict(
                spec=spec, model_name=model_name, model_preset=model_preset, train_set=train_set,
                val_set=val_set, cfg=cfg, device=dev, settings=settings, epoch=epoch, threads=threads,
                method_preset=spec.default_preset, overrides=overrides,
            )))
    # Every pass visits every pair, so a pair's blocks are spread over the whole run: a load that
    # lasts for a while hits some of its blocks (the interval sees it), not all of them.
    records: dict[tuple[str, str], list[dict[str, Any]]] = {}
    failed: dict[tuple[str, str], dict[str, Any]] = {}
    for index in range(settings.passes):
        for name, method, kwargs in pairs:
            if (name, method) in failed:
                continue
            if progress:
                print(f"bench {method} on {name} (pass {index + 1}/{settings.passes}, batch "
                      f"{kwargs['cfg'].batch_size}, {dev.type})", file=sys.stderr, flush=True)
            kw = {k: v for k, v in kwargs.items() if k != "spec"}
            try:
                record = bench_pair(method, kwargs["spec"], pass_index=index, **kw)
            except MMBalanceError:
                raise  # the user's input: fail fast
            except RuntimeError as exc:  # e.g. torch.OutOfMemoryError at paper sizes: record, go on
                error = f"{type(exc).__name__}: {exc}"[:2000]
                failed[(name, method)] = {"method": method, "task": name, "error": error}
                records.pop((name, method), None)
                if progress:
                    print(f"bench {method} on {name} FAILED: {error.splitlines()[0]}", file=sys.stderr)
                if dev.type == "cuda":
                    torch.cuda.empty_cache()
                continue
            records.setdefault((name, method), []).append({**record, "task": name})
    results = [finish_pair(parts[0], parts[1:]) for parts in records.values()]
    config = {**dataclasses.asdict(settings), "epoch": "default" if epoch is None else epoch,
              "threads": threads, "amp": amp, "seed": seed, "method_overrides": dict(overrides or {})}
    return {
        "env": environment(dev), "config": config, "results": results, "skipped": skipped,
        "failed": list(failed.values()),
    }


def format_table(report: Mapping[str, Any], fmt: str = "github") -> str:
    """The printed table: ratio with its interval, FLOP floor, signals per step, times, memory."""
    cuda = report["env"].get("device_type") == "cuda"
    rows = []
    for r in report["results"]:
        row = [
            r["method"], r["task"], r.get("epoch", ""), ratio_text(r), f"{r['floor']:.3f}",
            _per_step(r, "aten_ops"),
            f"{r['step_ms_median']:.2f} ± {r['step_ms_iqr']:.2f}",
            f"{r['joint_step_ms_median']:.2f} ± {r['joint_step_ms_iqr']:.2f}",
            f"{r['mem_overhead_bytes'] / 2**20:.3f}",
        ]
        rows.append(row + ([_per_step(r, "syncs")] if cuda else []))
    headers = [
        "method", "task", "epoch", "ratio vs joint [95% CI]", "floor (FLOPs)", "ATen ops/step (m / j)",
        "step ms (med ± IQR)", "joint ms", "mem overhead MiB",
    ] + (["syncs/step (m / j)"] if cuda else [])
    env = report["env"]
    kind = "CUDA peak-allocated delta" if cuda else "CPU persistent state bytes"
    threads = ", ".join(str(t) for t in sorted({r.get("threads") for r in report["results"]} - {None}))
    caption = (
        f"Device: {env['device']}; torch {env['torch']}; memory = {kind}; amp = {report['config']['amp']}"
        + (f"; intra-op threads per pair: {threads}" if threads else "")
    )
    if report["config"].get("method_overrides"):
        caption += f"; method overrides {report['config']['method_overrides']}"
    if fmt == "csv":  # the same name and format as `mmbalance table --format csv`
        import csv
        import io

        buffer = io.StringIO()
        csv.writer(buffer, lineterminator="\n").writerows([headers, *rows])
        return buffer.getvalue() + "# " + caption
    return tabulate(rows, headers=headers, tablefmt=fmt, disable_numparse=True) + "\n\n" + caption


def write_json_atomic(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, indent=2, allow_nan=True)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _per_step(result: Mapping[str, Any], key: str) -> str:
    """``method / joint`` value of a signal per counted step, for the table."""
    signals = result.get("signals")
    if not signals:
        return ""
    steps = signals["steps"]
    return f"{signals['method'][key] / steps:,.0f} / {signals['joint'][key] / steps:,.0f}"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    d = BenchSettings()
    add = parser.add_argument
    add("--methods", help="comma-separated method names (default: every registered method)")
    add("--tasks", help=f"comma-separated datasets or paper cases (default: {','.join(SYNTHETIC_TASKS)})")
    add("--paper-models", action="store_true", help="add the paper-sized models on random inputs")
    add("--device", default="auto", help="auto | cpu | cuda")
    add("--batch-size", type=int, help="default: 64 (synthetic), 8 (paper models on CPU), the paper's (CUDA)")
    add("--blocks", type=int, default=d.blocks, help=f"timing blocks per pair (default {d.blocks})")
    add("--steps", type=int, default=d.steps, help=f"timed steps per trainer per block (default {d.steps})")
    add("--warmup", type=int, default=d.warmup, help=f"untimed warm-up steps (default {d.warmup})")
    add("--passes", type=int, default=d.passes,
        help=f"passes over all pairs, each timing a share of every pair's blocks (default {d.passes})")
    add("--signal-steps", type=int, default=d.signal_steps,
        help=f"steps counted for the deterministic signals (default {d.signal_steps})")
    add("--epoch", type=int, default=None,
        help="epoch index of the measured steps (default: the last epoch of the case's training preset, or "
        "the method's modulation_ends when earlier)")
    add("--amp", default="none", choices=["none", "bf16", "fp16"], help="autocast on CUDA")
    add("--seed", type=int, default=0, help="seed of the models and batches (default 0)")
    add("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
        help="method config field for every benchmarked method, repeatable (e.g. --methods cggm --set "
        "side_stream=true)")
    add("--out", default="bench.json", help="JSON report path (default bench.json)")
    add("--format", default="github", choices=["github", "latex", "csv"],
        help="printed table format (default: github)")
    add("--compare", metavar="BASE.json",
        help="fail if a signal or the memory grew, or the ratio's lower 95%% bound grew past the threshold")
    add("--threshold", type=float, default=0.10,
        help="relative ratio growth allowed at the lower 95%% bound (default 0.10)")
    add("--quiet", action="store_true", help="no progress lines on stderr")


def _split(text: str | None) -> list[str] | None:
    return None if text is None else [t.strip() for t in text.split(",") if t.strip()]


def main(args: argparse.Namespace) -> int:
    if args.threshold < 0:
        raise ConfigError(f"--threshold must be >= 0, got {args.threshold}")
    base = None
    if args.compare:
        path = Path(args.compare)
        if not path.is_file():
            raise ConfigError(
                f"--compare: no such file {str(path)!r}; expected a JSON report written by mmbalance bench"
            )
        try:
            base = json.loads(path.read_text())
            base["results"]
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise ConfigError(f"--compare: {str(path)!r} is not a mmbalance bench report ({exc})") from exc
    settings = BenchSettings(
        blocks=args.blocks, steps=args.steps, warmup=args.warmup, signal_steps=args.signal_steps,
        passes=args.passes,
    )
    overrides = {k.removeprefix("method."): v for k, v in parse_set(getattr(args, "sets", [])).items()}
    report = run_bench(
        _split(args.methods), _split(args.tasks), paper_models=args.paper_models, device=args.device,
        batch_size=args.batch_size, settings=settings, epoch=args.epoch,
        threads=getattr(args, "threads", "auto"), amp=args.amp, seed=args.seed, progress=not args.quiet,
        overrides=overrides,
    )
    report["command"] = getattr(args, "command_line", None) or " ".join(sys.argv)
    write_json_atomic(Path(args.out), report)
    print(format_table(report, args.format))
    for f in report["failed"]:
        print(f"FAILED: {f['method']} on {f['task']}: {f['error'].splitlines()[0]}", file=sys.stderr)
    status = 1 if report["failed"] else 0
    if base is None:
        return status
    for note in compare_notes(base, report):
        print("note: " + note, file=sys.stderr)
    problems = compare(base, report, args.threshold)
    if problems:
        print("\nRegressions against " + args.compare + ":", file=sys.stderr)
        for p in problems:
            print("  " + p, file=sys.stderr)
        return 1
    print(f"\nNo regression against {args.compare} (signals and memory exact; ratio: lower 95% bound of the "
          f"change within +{args.threshold * 100:.0f}%).")
    return status
