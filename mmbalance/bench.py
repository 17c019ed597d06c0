"""``mmbalance bench``: step-time ratio and memory overhead of every method against ``joint``.

For each (method, task) pair the method and ``joint`` are built on the same initial weights, given
the same batches, and stepped strictly alternately in one process (:mod:`mmbalance.measure`). The
result records, per pair, the step-time medians and IQRs, ``ratio_vs_joint``, the memory overhead
(CUDA: peak-allocated delta; CPU: exact persistent bytes of the method's own state), and
``floor``: the ratio of floating-point operations executed by one method step over one joint step
(``torch.utils.flop_counter``), i.e. the cost the algorithm's own extra work explains. A measured
ratio far above its floor is overhead worth investigating.

``--compare BASE.json`` is the regression gate: it exits non-zero when a pair's ``ratio_vs_joint``
grew by more than ``--threshold`` (relative, default 10 %) or its memory overhead grew at all.
Ratios, not seconds, so the gate holds on noisy shared CI machines.

Paper-sized models (``--paper-models``) run on random inputs of the paper datasets' shapes (no data
needed): MOSI/IEMOCAP MulT-style, Food-101 ViT-B/16 + BERT-base, BraTS DeepLabv3+ ResNet-101. Each
case's initial model is built once per process and copied for every pair (:class:`InitialModels`):
a paper-sized model takes seconds to initialise, its copy on the device milliseconds.

``--set KEY=VALUE`` overrides method config fields for every benchmarked method (e.g.
``--methods cggm --set side_stream=true``); a method without that field is an error.

A pair that fails at run time (a ``RuntimeError`` such as CUDA running out of memory at paper sizes)
is recorded under ``failed`` with its error and the others go on; the command then exits with 1.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import random
import sys
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tabulate import tabulate

from mmbalance.balancer import EpochContext
from mmbalance.config import parse_set
from mmbalance.datasets import DATASETS
from mmbalance.datasets.base import DatasetSpec, TensorDictDataset
from mmbalance.errors import ConfigError, MMBalanceError, UnsupportedError
from mmbalance.measure import compare_cost
from mmbalance.methods import METHODS
from mmbalance.models import MODELS
from mmbalance.registry import config_fields
from mmbalance.tasks import make_task
from mmbalance.train import (
    TrainConfig,
    Trainer,
    batch_to_device,
    make_loader,
    resolve_device,
    seed_everything,
)

__all__ = [
    "BenchCase", "PAPER_CASES", "InitialModels", "build_pair", "bench_pair", "run_bench", "compare", "main",
    "add_arguments",
]

SYNTHETIC_TASKS = ("synthetic_cls2", "synthetic_cls3", "synthetic_reg3", "synthetic_seg4")


@dataclass(frozen=True)
class BenchCase:
    """A model + input shapes to benchmark on: a registered dataset, or a paper-shaped random one."""

    name: str
    spec: DatasetSpec
    model: str
    model_preset: str | None
    batch_size: int  # the paper's batch size (used on CUDA); CPU runs use --batch-size
    train_preset: str | None = None


def _paper_cases() -> dict[str, BenchCase]:
    mosi = DatasetSpec(
        task="reg",
        modalities={"text": (50, 768), "audio": (50, 5), "vision": (50, 20)},
        num_outputs=1,
        default_model="mult",
        default_preset="mosi",
    )
    iemocap = DatasetSpec(
        task="cls",
        modalities={"audio": (350, 130), "vision": (50, 342), "text": (22, 1024)},
        num_outputs=4,
        default_model="mult",
        default_preset="iemocap",
    )
    food = DatasetSpec(
        task="cls",
        modalities={"image": (3, 224, 224), "text": (50,)},
        num_outputs=101,
        default_model="vit_bert",
        default_preset="food101",
    )
    brats = DatasetSpec(
        task="seg",
        modalities={"flair": (1, 160, 160), "t1ce": (1, 160, 160), "t1": (1, 160, 160), "t2": (1, 160, 160)},
        num_outputs=4,
        target_shape=(160, 160),
        default_model="deeplab",
        default_preset="brats",
    )
    return {
        "paper_mosi": BenchCase("paper_mosi", mosi, "mult", "mosi", 64, "mosi"),
        "paper_iemocap": BenchCase("paper_iemocap", iemocap, "mult", "iemocap", 64, "iemocap"),
        "paper_food101": BenchCase("paper_food101", food, "vit_bert", "food101", 128, "food101"),
        "paper_brats": BenchCase("paper_brats", brats, "deeplab", "brats", 64, "brats"),
    }


PAPER_CASES = _paper_cases()


def random_batches(spec: DatasetSpec, batch_size: int, n: int, seed: int = 0) -> TensorDictDataset:
    """``n * batch_size`` random samples of ``spec``'s shapes (token ids for 1-D int inputs)."""
    g = torch.Generator().manual_seed(seed)
    size = n * batch_size
    tensors: dict[str, torch.Tensor] = {}
    for m, shape in spec.modalities.items():
        if len(shape) == 1:  # token ids (Food-101 text): ids in [1, 30000), no padding
            tensors[m] = torch.randint(1, 30000, (size, *shape), generator=g)
        else:
            tensors[m] = torch.randn(size, *shape, generator=g)
    if spec.task == "cls":
        tensors["target"] = torch.randint(0, spec.num_outputs, (size,), generator=g)
    elif spec.task == "reg":
        tensors["target"] = torch.empty(size).uniform_(-3, 3, generator=g)
    else:
        tensors["target"] = torch.randint(0, spec.num_outputs, (size, *spec.target_shape), generator=g)
    return TensorDictDataset(tensors)


def _flops(trainer: Trainer, batch: Mapping[str, torch.Tensor]) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        trainer.train_step(batch, 0, 0)
    trainer.flush_terms()
    return int(counter.get_total_flops())


class InitialModels:
    """The initial model of the last (model, preset, shapes, seed) asked for, built once and kept on
    the device, with the RNG states right after building it.

    :meth:`get` seeds as ``seed_everything(seed)`` does, then returns a copy of that model and leaves
    the Python, NumPy and torch CPU RNGs where building it anew would have left them, so everything
    drawn afterwards (a balancer's heads, dropout masks) is what it would be without the cache.
    Only the last key is kept: a paper-sized model is a gigabyte.
    """

    def __init__(self) -> None:
        self._key: tuple[Any, ...] | None = None
        self._model: torch.nn.Module | None = None
        self._rng: tuple[Any, Any, torch.Tensor] | None = None

    def get(
        self, model_name: str, preset: str | None, spec: DatasetSpec, seed: int, deterministic: bool,
        device: torch.device,
    ) -> torch.nn.Module:
        key = (model_name, preset, repr(spec), seed, str(device))
        seed_everything(seed, deterministic)
        if key != self._key:
            self._key, self._model = None, None  # free the previous case's model before building
            model = MODELS.build(model_name, preset)(spec)
            self._rng = (random.getstate(), np.random.get_state(), torch.get_rng_state())
            self._model, self._key = model.to(device), key
        assert self._model is not None and self._rng is not None
        random.setstate(self._rng[0])
        np.random.set_state(self._rng[1])
        torch.set_rng_state(self._rng[2])
        return copy.deepcopy(self._model)


_INITIAL_MODELS = InitialModels()  # per process: consecutive pairs of one case share the build


def _method_overrides(method: str, spec: DatasetSpec) -> dict[str, Any]:
    """Required options for timing: ``unimodal`` trains the first modality."""
    if "modality" in config_fields(METHODS.get(method).Config):
        return {"modality": spec.modality_names[0]}
    return {}


def build_pair(
    method: str,
    spec: DatasetSpec,
    model_name: str,
    *,
    model_preset: str | None,
    train_set: TensorDictDataset,
    val_set: TensorDictDataset,
    cfg: TrainConfig,
    device: torch.device,
    method_preset: str | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> tuple[dict[str, Trainer], list[dict[str, torch.Tensor]]]:
    """Trainers ``{"method", "joint"}`` on identical initial weights, their epoch-level work done
    (untimed), and the training batches on the device. ``overrides``: method config fields."""
    from mmbalance.methods.joint import Joint

    cls = METHODS.get(method)
    if not cls.supports(task=spec.task, modalities=len(spec.modalities)):
        raise UnsupportedError(
            f"method {method!r} does not support task {spec.task!r} with {len(spec.modalities)} modalities"
        )
    task = make_task(spec.task, spec.num_outputs, **dict(spec.task_options))
    model = _INITIAL_MODELS.get(model_name, model_preset, spec, cfg.seed, cfg.deterministic, device)
    joint_model = copy.deepcopy(model)
    preset = method_preset if method_preset in (cls.presets or {}) else None
    balancer = METHODS.build(method, preset, **{**_method_overrides(method, spec), **(overrides or {})})
    train_loader = make_loader(train_set, cfg, device, train=True)
    val_loader = make_loader(val_set, cfg, device, train=False)
    trainers = {
        "method": Trainer(model, balancer, task, cfg, device, len(train_loader)),
        "joint": Trainer(joint_model, Joint(), task, cfg, device, len(train_loader)),
    }
    for t in trainers.values():  # epoch-level work (prototypes, teachers) runs once, untimed
        t.model.train()
        t.balancer.on_train_epoch_start(
            EpochContext(
                model=t.model, epoch=0, num_epochs=cfg.epochs, train_loader=train_loader, val_loader=val_loader,
                task=task, device=device, optimizer=t.optimizer, to_device=lambda b: batch_to_device(b, device),
            )
        )
    return trainers, [batch_to_device(b, device) for b in train_loader]


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
    steps: int,
    warmup: int,
    method_preset: str | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Measure one method against joint on the same weights and batches (see module docstring)."""
    trainers, batches = build_pair(
        method, spec, model_name, model_preset=model_preset, train_set=train_set, val_set=val_set,
        cfg=cfg, device=device, method_preset=method_preset, overrides=overrides,
    )
    flops_m = _flops(trainers["method"], batches[0])
    flops_j = _flops(trainers["joint"], batches[0])
    cost = compare_cost(trainers["method"], trainers["joint"], batches, steps=steps, warmup=warmup, device=device)
    return {
        "method": method,
        "task": spec.default_preset if spec.default_preset else spec.task,
        "ratio_vs_joint": cost["step_time_ratio"],
        "floor": flops_m / flops_j if flops_j else float("nan"),
        "flops_method": flops_m,
        "flops_joint": flops_j,
        **{k: v for k, v in cost.items() if k != "step_time_ratio"},
        "batch_size": cfg.batch_size,
        "amp": cfg.amp,
        "extra_steps": trainers["method"].balancer.extra_steps(),
    }


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


def run_bench(
    methods: Sequence[str] | None = None,
    tasks: Sequence[str] | None = None,
    *,
    paper_models: bool = False,
    device: str = "auto",
    batch_size: int | None = None,
    steps: int = 30,
    warmup: int = 5,
    amp: str = "none",
    seed: int = 0,
    progress: bool = True,
    overrides: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Benchmark every (method, task) pair; returns ``{"env": ..., "results": [...], "skipped": [...]}``.
    ``overrides``: method config fields set for every method."""
    from mmbalance.runner import environment

    dev = resolve_device(device)
    if steps < 1 or warmup < 0:
        raise ConfigError(f"--steps must be >= 1 and --warmup >= 0, got {steps} and {warmup}")
    methods = list(methods) if methods else [m for m in METHODS.names() if m != "joint"]
    tasks = list(tasks) if tasks is not None else (list(SYNTHETIC_TASKS) if not paper_models else [])
    results: list[dict[str, Any]] = []
    skipped: list[dict[str, Any]] = []
    failed: list[dict[str, Any]] = []
    for name, spec, model_name, model_preset, source in _cases(tasks, paper_models):
        paper = isinstance(source, BenchCase)
        bs = batch_size or (source.batch_size if paper and dev.type == "cuda" else (8 if paper else 64))
        cfg = TrainConfig(batch_size=bs, seed=seed, amp=amp, eval_modality_scores=False, cost_steps=steps, cost_warmup=warmup)
        n_batches = min(steps + warmup, 8)
        if paper:
            train_set = random_batches(spec, bs, n_batches, seed)
            val_set = random_batches(spec, bs, 1, seed + 1)
        else:
            train_set, val_set = source.split("train"), source.split("val")
        for method in methods:
            cls = METHODS.get(method)
            if not cls.supports(task=spec.task, modalities=len(spec.modalities)):
                skipped.append({"method": method, "task": name, "reason": "unsupported"})
                continue
            if progress:
                print(f"bench {method} on {name} (batch {bs}, {dev.type})", file=sys.stderr, flush=True)
            try:
                r = bench_pair(
                    method, spec, model_name, model_preset=model_preset, train_set=train_set, val_set=val_set,
                    cfg=cfg, device=dev, steps=steps, warmup=warmup, method_preset=spec.default_preset,
                    overrides=overrides,
                )
            except MMBalanceError:
                raise  # the user's input: fail fast
            except RuntimeError as exc:  # e.g. torch.OutOfMemoryError at paper sizes: record, go on
                error = f"{type(exc).__name__}: {exc}"[:2000]
                failed.append({"method": method, "task": name, "error": error})
                if progress:
                    print(f"bench {method} on {name} FAILED: {error.splitlines()[0]}", file=sys.stderr)
                if dev.type == "cuda":
                    torch.cuda.empty_cache()
                continue
            r["task"] = name
            results.append(r)
    env = environment(dev)
    config = {"steps": steps, "warmup": warmup, "amp": amp, "seed": seed}
    config["method_overrides"] = dict(overrides or {})
    return {"env": env, "config": config, "results": results, "skipped": skipped, "failed": failed}


def compare(base: Mapping[str, Any], head: Mapping[str, Any], threshold: float = 0.10) -> list[str]:
    """Regressions of ``head`` against ``base``: ratio growth above ``threshold`` (relative) or any
    growth of the memory overhead. Pairs present in only one file are not compared."""
    index = {(r["method"], r["task"]): r for r in base["results"]}
    problems = []
    for r in head["results"]:
        key = (r["method"], r["task"])
        if key not in index:
            continue
        b = index[key]
        if r["ratio_vs_joint"] > b["ratio_vs_joint"] * (1 + threshold):
            problems.append(
                f"{key[0]} on {key[1]}: ratio_vs_joint {b['ratio_vs_joint']:.3f} -> {r['ratio_vs_joint']:.3f} "
                f"(+{(r['ratio_vs_joint'] / b['ratio_vs_joint'] - 1) * 100:.1f}% > {threshold * 100:.0f}%)"
            )
        if r["mem_overhead_bytes"] > b["mem_overhead_bytes"]:
            problems.append(
                f"{key[0]} on {key[1]}: mem_overhead_bytes {b['mem_overhead_bytes']} -> {r['mem_overhead_bytes']}"
            )
    return problems


def format_table(report: Mapping[str, Any], fmt: str = "github") -> str:
    rows = [
        [
            r["method"],
            r["task"],
            f"{r['ratio_vs_joint']:.3f}",
            f"{r['floor']:.3f}",
            f"{r['step_ms_median']:.2f} ± {r['step_ms_iqr']:.2f}",
            f"{r['joint_step_ms_median']:.2f} ± {r['joint_step_ms_iqr']:.2f}",
            f"{r['mem_overhead_bytes'] / 2**20:.3f}",
        ]
        for r in report["results"]
    ]
    headers = ["method", "task", "ratio vs joint", "floor (FLOPs)", "step ms (med ± IQR)", "joint ms", "mem overhead MiB"]
    env = report["env"]
    kind = "CUDA peak-allocated delta" if env.get("device_type") == "cuda" else "CPU persistent state bytes"
    caption = f"Device: {env['device']}; torch {env['torch']}; memory = {kind}; amp = {report['config']['amp']}"
    if report["config"].get("method_overrides"):
        caption += f"; method overrides {report['config']['method_overrides']}"
    if fmt == "csv":  # the same name and format as `mmbalance table --format csv`
        import csv
        import io

        buffer = io.StringIO()
        csv.writer(buffer, lineterminator="\n").writerows([headers, *rows])
        return buffer.getvalue() + "# " + caption
    return tabulate(rows, headers=headers, tablefmt=fmt) + "\n\n" + caption


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


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--methods", help="comma-separated method names (default: every registered method)")
    parser.add_argument("--tasks", help=f"comma-separated datasets or paper cases (default: {','.join(SYNTHETIC_TASKS)})")
    parser.add_argument("--paper-models", action="store_true", help="add the paper-sized models on random inputs")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda")
    parser.add_argument("--batch-size", type=int, help="default: 64 (synthetic), 8 (paper models on CPU), the paper's on CUDA")
    parser.add_argument("--steps", type=int, default=30, help="timed steps per trainer (default 30)")
    parser.add_argument("--warmup", type=int, default=5, help="discarded warm-up steps (default 5)")
    parser.add_argument("--amp", default="none", choices=["none", "bf16", "fp16"], help="autocast on CUDA")
    parser.add_argument("--seed", type=int, default=0, help="seed of the models and batches (default 0)")
    parser.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                        help="method config field for every benchmarked method, repeatable "
                        "(e.g. --methods cggm --set side_stream=true)")
    parser.add_argument("--out", default="bench.json", help="JSON report path (default bench.json)")
    parser.add_argument("--format", default="github", choices=["github", "latex", "csv"],
                        help="printed table format (default: github)")
    parser.add_argument("--compare", metavar="BASE.json", help="fail if a ratio grew > threshold or memory grew")
    parser.add_argument("--threshold", type=float, default=0.10, help="relative ratio growth allowed (default 0.10)")
    parser.add_argument("--quiet", action="store_true", help="no progress lines on stderr")


def _split(text: str | None) -> list[str] | None:
    return None if text is None else [t.strip() for t in text.split(",") if t.strip()]


def main(args: argparse.Namespace) -> int:
    if args.threshold < 0:
        raise ConfigError(f"--threshold must be >= 0, got {args.threshold}")
    base = None
    if args.compare:
        path = Path(args.compare)
        if not path.is_file():
            raise ConfigError(f"--compare: no such file {str(path)!r}; expected a JSON report written by mmbalance bench")
        try:
            base = json.loads(path.read_text())
            base["results"]
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise ConfigError(f"--compare: {str(path)!r} is not a mmbalance bench report ({exc})") from exc
    tasks = _split(args.tasks)
    overrides = {k.removeprefix("method."): v for k, v in parse_set(getattr(args, "sets", [])).items()}
    report = run_bench(
        _split(args.methods), tasks, paper_models=args.paper_models, device=args.device, batch_size=args.batch_size,
        steps=args.steps, warmup=args.warmup, amp=args.amp, seed=args.seed, progress=not args.quiet,
        overrides=overrides,
    )
    report["command"] = " ".join(["mmbalance", "bench", *sys.argv[2:]]) if sys.argv[1:2] == ["bench"] else " ".join(sys.argv)
    write_json_atomic(Path(args.out), report)
    print(format_table(report, args.format))
    for f in report["failed"]:
        print(f"FAILED: {f['method']} on {f['task']}: {f['error'].splitlines()[0]}", file=sys.stderr)
    if base is not None:
        problems = compare(base, report, args.threshold)
        if problems:
            print("\nRegressions against " + args.compare + ":", file=sys.stderr)
            for p in problems:
                print("  " + p, file=sys.stderr)
            return 1
        print(f"\nNo regression against {args.compare} (threshold {args.threshold * 100:.0f}%, memory exact).")
    return 1 if report["failed"] else 0

