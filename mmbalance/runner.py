"""One run: build it from its resolved configuration, train, test on the best-validation state,
measure cost, and return the result row.

The configuration is resolved once, by :func:`mmbalance.resolve.resolve_run`; :func:`run_one`
takes a :class:`~mmbalance.resolve.RunSpec` (and resolves it) or an already
:class:`~mmbalance.resolve.ResolvedRun` (a matrix plan's run), and builds the dataset, the model
builder, the model and the balancer once each, from the resolved Config objects.

A run whose training diverges (:class:`~mmbalance.errors.DivergedError`: the loss rose above
``TrainConfig.divergence_factor`` times its start, or a loss term became NaN or inf) is not an
error of the tool: its row has status ``diverged``, no metrics, the history of the epochs it
finished, and ``divergence: {"step", "epoch", "reason"}``.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import platform
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

import mmbalance
from mmbalance.checkpoint import RunCheckpoint
from mmbalance.datasets import DATASETS
from mmbalance.datasets.base import check_batch
from mmbalance.errors import ConfigError, DivergedError
from mmbalance.measure import compare_cost
from mmbalance.methods import METHODS
from mmbalance.models import MODELS
from mmbalance.resolve import ResolvedRun, RunSpec, canonical_json, resolve_run
from mmbalance.tasks import make_task
from mmbalance.threads import ThreadSetting, decide_threads, intra_op_threads
from mmbalance.tracking import RunTracker, Tracking
from mmbalance.train import (
    TrainConfig,
    Trainer,
    batch_to_device,
    fit,
    make_loader,
    resolve_device,
    seed_everything,
)

__all__ = ["RunSpec", "ResolvedRun", "resolve_run", "run_one", "build_run", "environment", "measure_run_cost"]


def _git_state() -> tuple[str | None, bool | None]:
    root = Path(mmbalance.__file__).resolve().parent.parent
    try:
        commit = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"],
            capture_output=True, text=True, timeout=5, check=True,
        ).stdout.strip()
        status = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True, text=True, timeout=5, check=True,
        ).stdout.strip()
        return commit or None, bool(status)
    except (OSError, subprocess.SubprocessError):
        return None, None


def environment(device: torch.device) -> dict[str, Any]:
    """The ``env`` fields of a row: device name, torch, mmbalance, git commit and dirty flag, and the
    process that trained it (``pid``: which ``--jobs`` worker)."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = f"cpu ({platform.machine()}, {torch.get_num_threads()} threads)"
    commit, dirty = _git_state()
    return {
        "device": name,
        "device_type": device.type,
        "torch": torch.__version__,
        "mmbalance": mmbalance.__version__,
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
        "git_commit": commit,
        "dirty": dirty,
        "pid": os.getpid(),
    }


def build_run(resolved: ResolvedRun) -> tuple[Any, Any, Any, Any, Any]:
    """(dataset, task, model builder, model, balancer) of a resolved run, each built once, in a
    seeded order (the model's initial weights depend only on the run's seed)."""
    dataset = DATASETS.get(resolved.dataset)(resolved.dataset_config)
    spec = dataset.spec
    task = make_task(spec.task, spec.num_outputs, **dict(spec.task_options))
    seed_everything(resolved.seed, resolved.train_config.deterministic)
    builder = MODELS.get(resolved.model)(resolved.model_config)
    model = builder(spec)
    balancer = METHODS.get(resolved.method)(resolved.method_config)
    return dataset, task, builder, model, balancer


def run_one(
    spec: RunSpec | ResolvedRun | None = None,
    *,
    device: str | torch.device = "auto",
    quiet: bool = True,
    command: str | None = None,
    threads: ThreadSetting | None = "auto",
    tracking: Tracking | None = None,
    checkpoint: RunCheckpoint | None = None,
    **spec_kwargs: Any,
) -> dict[str, Any]:
    """Train, select on validation, test once, measure cost vs joint; return the result row.

    ``run_one(RunSpec("cggm", "synthetic_cls3"))``, ``run_one(method="cggm", dataset=...)``, or
    ``run_one(resolved_run)``. A diverged run returns a ``diverged`` row (module docstring).
    ``threads``: intra-op CPU threads for this run, ``"auto"`` (:mod:`mmbalance.threads`: one
    thread for small models), a count, or None (torch's current count); restored afterwards, and
    recorded in ``env.threads`` / ``env.threads_rule`` (not in the run id). ``tracking`` mirrors
    the run to TensorBoard / MLflow (:mod:`mmbalance.tracking`). With a ``checkpoint``
    (:class:`~mmbalance.checkpoint.RunCheckpoint` of this run), the run continues from the
    checkpoint's epoch when there is one (the row says ``resumed_from_epoch``) and writes epoch
    checkpoints; it never removes them (the matrix does, once the row is written).
    """
    if spec is None:
        spec = RunSpec(**spec_kwargs)
    elif spec_kwargs:
        raise ConfigError(f"pass either a RunSpec or keyword arguments, not both (got {sorted(spec_kwargs)})")
    resolved = spec if isinstance(spec, ResolvedRun) else resolve_run(spec)
    if checkpoint is not None and checkpoint.run_id != resolved.run_id:
        raise ConfigError(f"checkpoint of run {checkpoint.run_id} given to run {resolved.run_id}")
    dev = resolve_device(device)
    train_cfg = resolved.train_config
    dataset, task, builder, model, balancer = build_run(resolved)
    splits = {s: dataset.split(s) for s in ("train", "val", "test")}
    data_spec = dataset.spec
    # A model builder may transform the data once before training (vit_bert's frozen-feature cache).
    prepare = getattr(builder, "prepare_splits", None)
    if prepare is not None:
        dataset_key = canonical_json({"dataset": resolved.dataset, "config": resolved.config["dataset"]})
        splits, data_spec = prepare(splits, data_spec, dev, dataset_key=dataset_key)
    first = None
    if dev.type == "cpu":  # the thread rule reads one forward pass (mmbalance.threads)
        probe = make_loader(splits["train"], dataclasses.replace(train_cfg, num_workers=0), dev, train=False)
        first = next(iter(probe))
        check_batch(first, data_spec, source=f"dataset split 'train' ({type(splits['train']).__name__})")
    count, rule = decide_threads(threads, model, first, dev)
    with intra_op_threads(count):
        built = (task, model, balancer)
        extras = (tracking, checkpoint)
        return _train_and_measure(resolved, dev, quiet, command, built, splits, data_spec, rule, extras)


def _train_and_measure(
    resolved: ResolvedRun,
    dev: torch.device,
    quiet: bool,
    command: str | None,
    built: tuple[Any, Any, Any],
    splits: dict[str, Any],
    data_spec: Any,
    threads_rule: dict[str, Any],
    extras: tuple[Tracking | None, RunCheckpoint | None],
) -> dict[str, Any]:
    """The body of :func:`run_one`, run with the run's thread count set; ``extras`` = (tracking,
    checkpoint)."""
    task, model, balancer = built
    tracking, checkpoint = extras
    train_cfg = resolved.train_config
    row: dict[str, Any] = {
        "run_id": resolved.run_id,
        "status": "ok",
        "method": resolved.method,
        "label": resolved.label,
        "dataset": resolved.dataset,
        "model": resolved.model,
        "preset": resolved.preset,
        "task": resolved.task,
        "modalities": list(resolved.modalities),
        "seed": resolved.seed,
        "config": resolved.config,
        "data_notes": dict(data_spec.notes),
        "metrics": {},
        "history": [],
        "cost": {},
        "env": {**environment(dev), "threads_rule": threads_rule},
        "command": command if command is not None else " ".join(sys.argv),
    }
    epochs: list[dict[str, Any]] = []
    tracker = RunTracker(tracking, row)  # started: config and identity logged

    def on_epoch_end(record: dict[str, Any]) -> None:
        epochs.append(record)
        tracker.epoch(_jsonable_record(record))

    try:
        result = fit(
            model, balancer, splits, data_spec, task, train_cfg, dev, quiet=quiet, on_epoch_end=on_epoch_end,
            checkpoint=checkpoint,
        )
    except DivergedError as exc:
        row.update(
            status="diverged",
            history=[_jsonable_record(h) for h in epochs],
            divergence={"step": exc.step, "epoch": exc.epoch, "type": type(exc).__name__, "reason": str(exc)},
        )
        return tracker.end(row)
    except BaseException as exc:
        tracker.fail(exc)
        raise

    cost: dict[str, Any] = {}
    if train_cfg.cost_steps > 0:  # timed at the last trained epoch: warm-ups and windows are over
        last_epoch = len(result.history) - 1
        cost = tracker.guard(
            measure_run_cost, result.trainer, splits["train"], task, train_cfg, dev, epoch=last_epoch
        )
    cost["train_time_s"] = result.train_time_s
    cost["train_steps"] = result.steps
    cost["extra_steps"] = balancer.extra_steps()
    cost["loader_wait_s"] = sum(h["loader_wait_s"] for h in result.history)
    row.update(
        metrics={"val": result.val, "test": result.test, "best_epoch": result.best_epoch},
        history=[_jsonable_record(h) for h in result.history],
        cost=cost,
    )
    if result.resumed_from_epoch is not None:
        row["resumed_from_epoch"] = result.resumed_from_epoch
    return tracker.end(row)


def measure_run_cost(
    method_trainer: Trainer,
    train_set: Any,
    task: Any,
    cfg: TrainConfig,
    device: torch.device,
    *,
    epoch: int,
) -> dict[str, Any]:
    """Side-by-side cost of the trained method's step vs a fresh ``joint`` trainer on the same
    weights (the method's best-validation weights) and the same training batches, at epoch index
    ``epoch`` (the run's last trained epoch: what the hooks read, so a method with a warm-up or a
    modulation window is costed while it acts)."""
    from mmbalance.methods.joint import Joint

    joint_model = copy.deepcopy(method_trainer.model)
    joint_trainer = Trainer(joint_model, Joint(), task, cfg, device, method_trainer.steps_per_epoch)
    loader = make_loader(train_set, cfg, device, train=True)
    batches = []
    for batch in loader:
        batches.append(batch_to_device(batch, device))
        if len(batches) >= min(len(loader), cfg.cost_steps + cfg.cost_warmup):
            break
    method_trainer.model.train()
    method_trainer.balancer.train()
    joint_trainer.model.train()
    return compare_cost(
        method_trainer, joint_trainer, batches, steps=cfg.cost_steps, warmup=cfg.cost_warmup, device=device,
        epoch=epoch,
    )


def _jsonable_record(record: Mapping[str, Any]) -> dict[str, Any]:
    def conv(v: Any) -> Any:
        if isinstance(v, torch.Tensor):
            return v.detach().cpu().tolist()
        if isinstance(v, Mapping):
            return {str(k): conv(x) for k, x in v.items()}
        if isinstance(v, list | tuple):
            return [conv(x) for x in v]
        if isinstance(v, float | int | str | bool) or v is None:
            return v
        return float(v) if hasattr(v, "__float__") else str(v)

    return conv(record)
