"""One run: resolve names and configs, train, test on the best-validation state, measure cost.

A run is (method, dataset, model, seed, resolved configs). Its id is the first 12 hex digits of the
SHA-256 of the canonical JSON of those, so it does not depend on the device, the output folder or
the order of ``--set`` options. Overrides are ``key=value`` pairs; an unprefixed key is looked up in
the method, training, dataset and model configs (it must name exactly one field), a prefixed key
(``method.rho``, ``train.lr``, ``dataset.n_train``, ``model.hidden``) names its config directly.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import hashlib
import json
import platform
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

import mmbalance
from mmbalance.datasets import DATASETS
from mmbalance.errors import ConfigError, RegistryError, UnsupportedError
from mmbalance.measure import compare_cost
from mmbalance.methods import METHODS
from mmbalance.models import MODELS
from mmbalance.presets import TRAIN_PRESETS
from mmbalance.registry import config_fields, resolve_dataclass
from mmbalance.tasks import make_task
from mmbalance.train import (
    TrainConfig,
    Trainer,
    batch_to_device,
    fit,
    make_loader,
    resolve_device,
    seed_everything,
)

__all__ = ["RunSpec", "ResolvedRun", "resolve_run", "run_one", "ROW_FIELDS", "environment", "split_overrides"]

ROW_FIELDS = ("run_id", "status", "method", "dataset", "task", "seed", "config", "metrics", "history", "cost", "env", "command")
SECTIONS = ("method", "train", "dataset", "model")
MACHINE_PATH_FIELDS = frozenset({"root", "cache_dir"})  # left out of the run id


@dataclass(frozen=True)
class RunSpec:
    """What the user asks for. ``seed=None`` keeps the preset's (or TrainConfig's) seed."""

    method: str
    dataset: str
    model: str | None = None
    preset: str | None = None
    seed: int | None = None
    overrides: Mapping[str, Any] = field(default_factory=dict)
    data_root: str | None = None


@dataclass(frozen=True)
class ResolvedRun:
    spec: RunSpec
    run_id: str
    method: str
    dataset: str
    model: str
    preset: str | None
    task: str
    modalities: tuple[str, ...]
    config: dict[str, dict[str, Any]]
    label: str

    @property
    def seed(self) -> int:
        return int(self.config["train"]["seed"])

    def train_config(self) -> TrainConfig:
        return TrainConfig(**self.config["train"])


def split_overrides(overrides: Mapping[str, Any], classes: Mapping[str, type]) -> dict[str, dict[str, Any]]:
    """Route each override to its config section (see the module docstring).

    Raises:
        ConfigError: unknown section prefix, unknown key (with close matches), or a key that names
            fields in several sections (listing the prefixed forms to use).
    """
    out: dict[str, dict[str, Any]] = {s: {} for s in SECTIONS}
    fields = {s: set(config_fields(c)) for s, c in classes.items()}
    for key, value in overrides.items():
        if "." in key:
            section, name = key.split(".", 1)
            if section not in SECTIONS:
                raise ConfigError(f"override {key!r}: prefix must be one of {SECTIONS}, got {section!r}")
            if name not in fields[section]:
                close = difflib.get_close_matches(name, sorted(fields[section]), n=1)
                hint = f"; did you mean {section}.{close[0]}?" if close else ""
                raise ConfigError(
                    f"unknown config key {name!r} for {section}{hint} Valid keys: {', '.join(sorted(fields[section])) or '(none)'}"
                )
            out[section][name] = value
            continue
        owners = [s for s in SECTIONS if key in fields[s]]
        if not owners:
            every = sorted({f for fs in fields.values() for f in fs})
            close = difflib.get_close_matches(key, every, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ConfigError(
                f"unknown config key {key!r}{hint} Valid keys: "
                + "; ".join(f"{s}: {', '.join(sorted(fields[s])) or '(none)'}" for s in SECTIONS)
            )
        if len(owners) > 1:
            raise ConfigError(f"config key {key!r} is ambiguous; use one of {', '.join(f'{s}.{key}' for s in owners)}")
        out[owners[0]][key] = value
    return out


def _dataset_defaults(dataset_cls: type, ds_config: Any) -> tuple[str, str | None]:
    """(default model, default preset) from class attributes, or from the built dataset's spec."""
    model = getattr(dataset_cls, "default_model", None)
    preset = getattr(dataset_cls, "default_preset", None)
    if model:
        return model, preset
    spec = dataset_cls(ds_config).spec
    return spec.default_model, spec.default_preset


def _as_dict(config: Any) -> dict[str, Any]:
    return dataclasses.asdict(config) if dataclasses.is_dataclass(config) else {}


def canonical_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


def resolve_run(spec: RunSpec) -> ResolvedRun:
    """Resolve names, presets and overrides into plain config dicts and a run id (no data read).

    Raises:
        RegistryError: unknown method / dataset / model / preset.
        ConfigError: unknown or ambiguous key, out-of-range value.
        UnsupportedError: the method does not declare the dataset's task or modality count.
    """
    method_cls = METHODS.get(spec.method)
    dataset_cls = DATASETS.get(spec.dataset)
    # The model is needed to route overrides; a model override cannot change which model is used.
    first_pass_model = spec.model
    ds_fields = set(config_fields(dataset_cls.Config))
    ds_over = {k.split(".", 1)[-1]: v for k, v in spec.overrides.items() if k.startswith("dataset.")}
    if spec.data_root is not None:
        if "root" not in ds_fields:
            raise ConfigError(f"--data-root given, but dataset {spec.dataset!r} reads no files (it has no 'root' option)")
        ds_over["root"] = str(spec.data_root)
    ds_probe = resolve_dataclass(dataset_cls.Config, ds_over, owner=f"dataset {spec.dataset!r}")
    default_model, default_preset = _dataset_defaults(dataset_cls, ds_probe)
    model_name = first_pass_model or default_model
    model_cls = MODELS.get(model_name)
    routed = split_overrides(
        spec.overrides,
        {"method": method_cls.Config, "train": TrainConfig, "dataset": dataset_cls.Config, "model": model_cls.Config},
    )
    if spec.data_root is not None:
        routed["dataset"]["root"] = str(spec.data_root)

    preset = spec.preset or default_preset
    known = [
        preset in TRAIN_PRESETS,
        preset in (getattr(method_cls, "presets", {}) or {}),
        preset in (getattr(model_cls, "presets", {}) or {}),
    ]
    if preset is not None and not any(known):
        raise RegistryError(
            f"unknown preset {preset!r}; training presets: {', '.join(sorted(TRAIN_PRESETS))}"
        )
    train_values = dict(TRAIN_PRESETS.get(preset, {})) if preset else {}
    train_values.update(routed["train"])
    if spec.seed is not None:
        train_values["seed"] = int(spec.seed)
    train_cfg = resolve_dataclass(TrainConfig, train_values, owner="training")
    method_preset = preset if preset in (getattr(method_cls, "presets", {}) or {}) else None
    method_cfg = METHODS.resolve_config(spec.method, method_preset, routed["method"])
    model_preset = preset if preset in (getattr(model_cls, "presets", {}) or {}) else None
    model_cfg = MODELS.resolve_config(model_name, model_preset, routed["model"])
    ds_cfg = DATASETS.resolve_config(spec.dataset, None, routed["dataset"])

    task = getattr(dataset_cls, "task", None)
    modalities = tuple(getattr(dataset_cls, "modality_names", ()) or ())
    if task is None or not modalities:
        ds_spec = dataset_cls(ds_cfg).spec
        task, modalities = ds_spec.task, ds_spec.modality_names
    if not method_cls.supports(task=task, modalities=len(modalities)):
        hi = "any" if method_cls.max_modalities is None else method_cls.max_modalities
        raise UnsupportedError(
            f"method {spec.method!r} supports tasks {sorted(method_cls.tasks)} with {method_cls.min_modalities} "
            f"to {hi} modalities; dataset {spec.dataset!r} is task {task!r} with {len(modalities)} modalities"
        )
    config = {
        "method": _as_dict(method_cfg),
        "train": _as_dict(train_cfg),
        "dataset": _as_dict(ds_cfg),
        "model": _as_dict(model_cfg),
    }
    identity = {
        "method": spec.method,
        "dataset": spec.dataset,
        "model": model_name,
        # Where data and caches live on this machine is not what the run is.
        "config": {
            section: {k: v for k, v in values.items() if k not in MACHINE_PATH_FIELDS} for section, values in config.items()
        },
    }
    run_id = hashlib.sha256(canonical_json(identity).encode()).hexdigest()[:12]
    label = spec.method
    if "modality" in config["method"] and config["method"]["modality"]:
        label = f"{spec.method}[{config['method']['modality']}]"
    return ResolvedRun(spec, run_id, spec.method, spec.dataset, model_name, preset, task, modalities, config, label)


def _git_state() -> tuple[str | None, bool | None]:
    root = Path(mmbalance.__file__).resolve().parent.parent
    try:
        commit = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, check=True
        ).stdout.strip()
        status = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True, text=True, timeout=5, check=True,
        ).stdout.strip()
        return commit or None, bool(status)
    except (OSError, subprocess.SubprocessError):
        return None, None


def environment(device: torch.device) -> dict[str, Any]:
    """The ``env`` fields of a row: device name, torch, mmbalance, git commit and dirty flag."""
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
    }


def build_run(resolved: ResolvedRun) -> tuple[Any, Any, Any, Any]:
    """(dataset, task, model, balancer) for a resolved run, built in a seeded order."""
    cfg = resolved.config
    dataset = DATASETS.build(resolved.dataset, None, **cfg["dataset"])
    spec = dataset.spec
    task = make_task(spec.task, spec.num_outputs, **dict(spec.task_options))
    seed_everything(resolved.seed, cfg["train"]["deterministic"])
    builder = MODELS.build(resolved.model, None, **cfg["model"])
    model = builder(spec)
    balancer = METHODS.build(resolved.method, None, **cfg["method"])
    return dataset, task, model, balancer


def run_one(
    spec: RunSpec | None = None,
    *,
    device: str | torch.device = "auto",
    quiet: bool = True,
    command: str | None = None,
    **spec_kwargs: Any,
) -> dict[str, Any]:
    """Train, select on validation, test once, measure cost vs joint; return the result row.

    ``run_one(RunSpec("cggm", "synthetic_cls3"))`` or ``run_one(method="cggm", dataset=...)``.
    """
    if spec is None:
        spec = RunSpec(**spec_kwargs)
    elif spec_kwargs:
        raise ConfigError(f"pass either a RunSpec or keyword arguments, not both (got {sorted(spec_kwargs)})")
    resolved = resolve_run(spec)
    dev = resolve_device(device)
    train_cfg = resolved.train_config()
    dataset, task, model, balancer = build_run(resolved)
    splits = {s: dataset.split(s) for s in ("train", "val", "test")}
    data_spec = dataset.spec
    # A model builder may transform the data once before training (vit_bert's frozen-feature cache).
    prepare = getattr(MODELS.build(resolved.model, None, **resolved.config["model"]), "prepare_splits", None)
    if prepare is not None:
        dataset_key = canonical_json({"dataset": resolved.dataset, "config": resolved.config["dataset"]})
        splits, data_spec = prepare(splits, data_spec, dev, dataset_key=dataset_key)
    result = fit(model, balancer, splits, data_spec, task, train_cfg, dev, quiet=quiet)

    cost: dict[str, Any] = {}
    if train_cfg.cost_steps > 0:
        cost = measure_run_cost(result.trainer, splits["train"], task, train_cfg, dev)
    cost["train_time_s"] = result.train_time_s
    cost["train_steps"] = result.steps
    cost["extra_steps"] = balancer.extra_steps()
    cost["loader_wait_s"] = sum(h["loader_wait_s"] for h in result.history)

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
        "metrics": {"val": result.val, "test": result.test, "best_epoch": result.best_epoch},
        "history": [_jsonable_record(h) for h in result.history],
        "cost": cost,
        "env": environment(dev),
        "command": command if command is not None else " ".join(sys.argv),
    }
    return row


def measure_run_cost(
    method_trainer: Trainer,
    train_set: Any,
    task: Any,
    cfg: TrainConfig,
    device: torch.device,
) -> dict[str, Any]:
    """Side-by-side cost of the trained method's step vs a fresh ``joint`` trainer on the same
    weights (the method's best-validation weights) and the same training batches."""
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
    return compare_cost(method_trainer, joint_trainer, batches, steps=cfg.cost_steps, warmup=cfg.cost_warmup, device=device)


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
