"""A run's configuration, resolved once: names, presets and overrides into Config objects and an id.

A run is (method, dataset, model, seed, resolved configs). :func:`resolve_run` turns what the user
asks for (:class:`RunSpec`) into a :class:`ResolvedRun` holding the four Config objects (method,
training, dataset, model); everything downstream (building, training, the result row, the matrix
plan) uses those objects and never resolves again. Nothing is built to read its defaults: a dataset
class declares its task, modalities, default model and default preset as class attributes.

Overrides are ``key=value`` pairs (textual form: :func:`mmbalance.config.parse_set`); an
unprefixed key is looked up in the method, training, dataset and model configs (it must name exactly
one field), a prefixed key (``method.rho``, ``train.lr``, ``dataset.n_train``, ``model.hidden``)
names its config directly.

The run id is the first 12 hex digits of the SHA-256 of the canonical JSON of (method, dataset,
model, configs), so it does not depend on the device, the output folder or the order of ``--set``
options. Fields naming paths on this machine (:data:`MACHINE_PATH_FIELDS`) are left out, and so are
fields added after results were published while they hold their default
(:data:`IDENTITY_DEFAULTS`), so earlier rows keep their ids.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import typing
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from mmbalance.config import takes_list
from mmbalance.datasets import DATASETS
from mmbalance.errors import ConfigError, RegistryError, UnsupportedError
from mmbalance.methods import METHODS
from mmbalance.models import MODELS
from mmbalance.presets import TRAIN_PRESETS
from mmbalance.registry import config_fields, resolve_dataclass
from mmbalance.train import DIVERGENCE_FACTOR, TrainConfig

__all__ = [
    "RunSpec",
    "ResolvedRun",
    "resolve_run",
    "split_overrides",
    "list_valued_keys",
    "run_identity",
    "canonical_json",
    "SECTIONS",
    "MACHINE_PATH_FIELDS",
    "IDENTITY_DEFAULTS",
]

SECTIONS = ("method", "train", "dataset", "model")
MACHINE_PATH_FIELDS = frozenset({"root", "cache_dir"})  # where data lives is not what the run is
# Fields added after results were published: left out of the run id while they hold this value.
IDENTITY_DEFAULTS: Mapping[str, Mapping[str, Any]] = {
    "train": {"divergence_factor": DIVERGENCE_FACTOR},
    "method": {"side_stream": False},  # CGGM: where its heads run, not what they compute
}


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
    """A run with every name, preset and override resolved into Config objects (no data read)."""

    spec: RunSpec
    run_id: str
    method: str
    dataset: str
    model: str
    preset: str | None
    task: str
    modalities: tuple[str, ...]
    label: str  # display name: the method, or ``unimodal[text]`` for per-modality methods
    method_config: Any
    train_config: TrainConfig
    dataset_config: Any
    model_config: Any

    @property
    def seed(self) -> int:
        return self.train_config.seed

    @property
    def config(self) -> dict[str, dict[str, Any]]:
        """The four configs as plain dicts (the row's ``config`` field)."""
        return _config_dicts(self.method_config, self.train_config, self.dataset_config, self.model_config)


def _config_dicts(method: Any, train: Any, dataset: Any, model: Any) -> dict[str, dict[str, Any]]:
    def as_dict(config: Any) -> dict[str, Any]:
        return dataclasses.asdict(config) if dataclasses.is_dataclass(config) else {}

    configs = {"method": method, "train": train, "dataset": dataset, "model": model}
    return {section: as_dict(config) for section, config in configs.items()}


def canonical_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


def run_identity(method: str, dataset: str, model: str, config: Mapping[str, Mapping[str, Any]]) -> str:
    """The run id: 12 hex digits of the SHA-256 of the canonical JSON of the run's identity."""
    sections = {}
    for section, values in config.items():
        omit = IDENTITY_DEFAULTS.get(section, {})
        sections[section] = {
            k: v
            for k, v in values.items()
            if k not in MACHINE_PATH_FIELDS and not (k in omit and v == omit[k])
        }
    identity = {"method": method, "dataset": dataset, "model": model, "config": sections}
    return hashlib.sha256(canonical_json(identity).encode()).hexdigest()[:12]


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
                valid = ", ".join(sorted(fields[section])) or "(none)"
                raise ConfigError(f"unknown config key {name!r} for {section}{hint} Valid keys: {valid}")
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
            forms = ", ".join(f"{s}.{key}" for s in owners)
            raise ConfigError(f"config key {key!r} is ambiguous; use one of {forms}")
        out[owners[0]][key] = value
    return out


def _config_classes(method: str, dataset: str, model: str | None) -> dict[str, type]:
    dataset_cls = DATASETS.get(dataset)
    return {
        "method": METHODS.get(method).Config, "train": TrainConfig,
        "dataset": dataset_cls.Config, "model": MODELS.get(model or dataset_cls.default_model).Config,
    }


def list_valued_keys(method: str, dataset: str, model: str | None, keys: Iterable[str]) -> list[str]:
    """The override ``keys`` whose config field takes a list (``model.aspp_rates``), routed as in
    :func:`split_overrides` (so an unknown or ambiguous key raises the same ConfigError)."""
    classes = _config_classes(method, dataset, model)
    out = []
    for key in keys:
        routed = split_overrides({key: None}, classes)
        section = next(s for s in SECTIONS if routed[s])
        name = next(iter(routed[section]))
        if takes_list(typing.get_type_hints(classes[section]).get(name)):
            out.append(key)
    return out


def _presets_of(cls: type) -> Mapping[str, Any]:
    return getattr(cls, "presets", {}) or {}


def resolve_run(spec: RunSpec) -> ResolvedRun:
    """Resolve names, presets and overrides into Config objects and a run id (no data read).

    Raises:
        RegistryError: unknown method / dataset / model / preset.
        ConfigError: unknown or ambiguous key, a value of the wrong type, an out-of-range value.
        UnsupportedError: the method does not declare the dataset's task or modality count.
    """
    method_cls = METHODS.get(spec.method)
    dataset_cls = DATASETS.get(spec.dataset)
    # A model override cannot change which model is used: the model is needed to route overrides.
    model_name = spec.model or dataset_cls.default_model
    model_cls = MODELS.get(model_name)
    routed = split_overrides(
        spec.overrides,
        {
            "method": method_cls.Config, "train": TrainConfig,
            "dataset": dataset_cls.Config, "model": model_cls.Config,
        },
    )
    if spec.data_root is not None:
        if "root" not in config_fields(dataset_cls.Config):
            raise ConfigError(
                f"--data-root given, but dataset {spec.dataset!r} reads no files (it has no 'root' option)"
            )
        routed["dataset"]["root"] = str(spec.data_root)

    preset = spec.preset or dataset_cls.default_preset
    if preset is not None and not (
        preset in TRAIN_PRESETS or preset in _presets_of(method_cls) or preset in _presets_of(model_cls)
    ):
        raise RegistryError(
            f"unknown preset {preset!r}; training presets: {', '.join(sorted(TRAIN_PRESETS))}"
        )
    train_values = dict(TRAIN_PRESETS.get(preset, {})) if preset else {}
    train_values.update(routed["train"])
    if spec.seed is not None:
        train_values["seed"] = spec.seed
    train_cfg = resolve_dataclass(TrainConfig, train_values, owner="training")
    method_preset = preset if preset in _presets_of(method_cls) else None
    method_cfg = METHODS.resolve_config(spec.method, method_preset, routed["method"])
    model_preset = preset if preset in _presets_of(model_cls) else None
    model_cfg = MODELS.resolve_config(model_name, model_preset, routed["model"])
    ds_cfg = DATASETS.resolve_config(spec.dataset, None, routed["dataset"])

    task, modalities = dataset_cls.task, tuple(dataset_cls.modality_names)
    if not method_cls.supports(task=task, modalities=len(modalities)):
        hi = "any" if method_cls.max_modalities is None else method_cls.max_modalities
        raise UnsupportedError(
            f"method {spec.method!r} supports tasks {sorted(method_cls.tasks)} with "
            f"{method_cls.min_modalities} "
            f"to {hi} modalities; dataset {spec.dataset!r} is task {task!r} with {len(modalities)} modalities"
        )
    modality = getattr(method_cfg, "modality", None)
    label = f"{spec.method}[{modality}]" if modality else spec.method
    configs = _config_dicts(method_cfg, train_cfg, ds_cfg, model_cfg)
    run_id = run_identity(spec.method, spec.dataset, model_name, configs)
    return ResolvedRun(
        spec=spec, run_id=run_id, method=spec.method, dataset=spec.dataset, model=model_name, preset=preset,
        task=task, modalities=modalities, label=label, method_config=method_cfg, train_config=train_cfg,
        dataset_config=ds_cfg, model_config=model_cfg,
    )
