"""The benchmark matrix: methods x datasets x seeds, resumable, shardable, one JSON file per run.

Spec format (TOML, read with the standard library's ``tomllib``)::

    methods  = ["joint", "unimodal", "cggm"]      # registered method names (required)
    datasets = ["synthetic_cls2", "synthetic_reg3"]  # registered dataset names (required)
    seeds    = [0, 1, 2]                          # distinct integers >= 0 (required)
    preset   = "synthetic"   # optional; default: each dataset's own default preset
    model    = "small_mlp"   # optional; default: each dataset's default model
    device   = "auto"        # optional: auto | cpu | cuda[:N]; ``--device`` wins
    data_root = "/data"      # optional; sets the dataset's ``root``; ``--data-root`` wins

    [overrides]              # every run; keys as in ``--set`` (see mmbalance.runner)
    epochs = 3
    "dataset.n_train" = 512  # a prefixed key, quoted ...
    model.hidden = 32        # ... or a TOML dotted key / sub-table: flattened to "model.hidden"

    [dataset_overrides.synthetic_seg4]   # runs on one dataset
    epochs = 2

    [method_overrides.cggm]              # runs of one method (and of its variants)
    rho = 1.2

    [variants.cggm_paper]                # a row of its own: a method with its own overrides
    method = "cggm"
    direction = "paper"
    lam = [0.1, 0.2]                     # a list sweeps: rows cggm_paper[lam=0.1], cggm_paper[lam=0.2]

Overrides merge in the order ``overrides`` <- ``dataset_overrides[d]`` <- ``method_overrides[m]``
<- ``variants[v]`` <- ``--set``, later wins. A method whose config has a ``modality`` field
(``unimodal``) expands to one run per modality of each dataset (label ``unimodal[text]``) unless an
override fixes it. Variants and grids: :mod:`mmbalance.variants`. The rows are the ``methods`` in
their order (a name there may be a variant's), then the variants not listed, in spec order.

Runs are ordered seed-major (all cells of seed 0, then seed 1, ...), so an interrupted matrix has
whole tables of its first seeds. ``--shard K/N`` (1-based) takes every N-th run starting at the
K-th: shards never overlap, their union is the matrix, and each gets a mix of datasets and methods.

This module plans: it parses the spec, expands and resolves every run (each run's configuration
is resolved once, here, and carried by its :class:`PlannedRun`), assigns run ids and shards. The
whole plan is resolved before anything runs, so an unknown name or key stops the matrix at once,
with the spec's path in the message. Running a plan (resume, one JSON row per run, failures
recorded) is :func:`mmbalance.matrix_run.run_matrix`, through an executor
(:mod:`mmbalance.executor`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import shlex
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mmbalance.config import format_set
from mmbalance.datasets import DATASETS
from mmbalance.errors import ConfigError, DataError, RegistryError, UnsupportedError
from mmbalance.methods import METHODS
from mmbalance.registry import config_fields
from mmbalance.resolve import ResolvedRun, RunSpec, list_valued_keys, resolve_run
from mmbalance.variants import Variant, grid_points, parse_variants, row_label

__all__ = [
    "MatrixSpec",
    "PlannedRun",
    "SPEC_KEYS",
    "load_spec",
    "parse_spec",
    "parse_shard",
    "plan_matrix",
    "plan_hash",
    "select_shard",
    "missing_data",
    "check_data",
]

SPEC_KEYS = (
    "methods", "datasets", "seeds", "preset", "model", "device", "data_root",
    "overrides", "dataset_overrides", "method_overrides", "variants",
)
_SHARD_RE = re.compile(r"^\s*(\d+)\s*/\s*(\d+)\s*$")


# -- parsing ---------------------------------------------------------------------------------------
def parse_shard(text: str | None) -> tuple[int, int] | None:
    """``"2/4"`` -> ``(2, 4)``; None stays None.

    Raises:
        ConfigError: naming ``--shard``, the value and the expected form ``K/N`` with 1 <= K <= N.
    """
    if text is None:
        return None
    m = _SHARD_RE.match(str(text))
    if m:
        k, n = int(m.group(1)), int(m.group(2))
        if 1 <= k <= n:
            return k, n
    raise ConfigError(f"--shard must be K/N with integers 1 <= K <= N (e.g. --shard 2/4); got {text!r}")


def _flatten(table: Mapping[str, Any], where: str, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in table.items():
        full = f"{prefix}{key}"
        if isinstance(value, dict):
            if prefix:
                raise ConfigError(f"{where}: {full!r} nests too deep; use section.key = value")
            out.update(_flatten(value, where, f"{full}."))
        else:
            out[full] = value
    return out


@dataclass(frozen=True)
class MatrixSpec:
    """A parsed matrix spec (see the module docstring for the TOML form)."""

    methods: tuple[str, ...]
    datasets: tuple[str, ...]
    seeds: tuple[int, ...]
    preset: str | None = None
    model: str | None = None
    device: str = "auto"
    data_root: str | None = None
    overrides: Mapping[str, Any] = field(default_factory=dict)
    dataset_overrides: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    method_overrides: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    variants: Mapping[str, Variant] = field(default_factory=dict)
    source: str = "<matrix spec>"

    @property
    def rows(self) -> list[tuple[str, str]]:
        """``(row name, method)`` per row: ``methods`` in order, then the variants not listed."""
        names = [*self.methods, *(v for v in self.variants if v not in self.methods)]
        return [(n, self.variants[n].method if n in self.variants else n) for n in names]

    def to_dict(self) -> dict[str, Any]:
        return {
            "methods": list(self.methods),
            "datasets": list(self.datasets),
            "seeds": list(self.seeds),
            "preset": self.preset,
            "model": self.model,
            "device": self.device,
            "data_root": self.data_root,
            "overrides": dict(self.overrides),
            "dataset_overrides": {k: dict(v) for k, v in self.dataset_overrides.items()},
            "method_overrides": {k: dict(v) for k, v in self.method_overrides.items()},
            "variants": {k: v.to_dict() for k, v in self.variants.items()},
        }


def _names(data: Mapping[str, Any], key: str, where: str) -> tuple[str, ...]:
    value = data.get(key)
    if not isinstance(value, list) or not value or not all(isinstance(v, str) and v for v in value):
        raise ConfigError(f"{where}: {key!r} must be a non-empty list of names, got {value!r}")
    dup = sorted({v for v in value if value.count(v) > 1})
    if dup:
        raise ConfigError(f"{where}: {key!r} lists {', '.join(map(repr, dup))} more than once")
    return tuple(value)


def parse_spec(data: Mapping[str, Any], source: str = "<matrix spec>") -> MatrixSpec:
    """Validate a decoded TOML spec.

    Raises:
        ConfigError: unknown key (listing the valid ones), a missing or ill-typed field, a duplicate
            method / dataset / seed, or a per-method / per-dataset table for a name not in the lists.
    """
    unknown = [k for k in data if k not in SPEC_KEYS]
    if unknown:
        raise ConfigError(
            f"{source}: unknown key(s) {', '.join(map(repr, unknown))}; valid keys: {', '.join(SPEC_KEYS)}"
        )
    methods = _names(data, "methods", source)
    datasets = _names(data, "datasets", source)
    seeds = data.get("seeds")
    if (
        not isinstance(seeds, list)
        or not seeds
        or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in seeds)
    ):
        raise ConfigError(f"{source}: 'seeds' must be a non-empty list of integers >= 0, got {seeds!r}")
    if len(set(seeds)) != len(seeds):
        raise ConfigError(f"{source}: 'seeds' lists a seed more than once: {seeds!r}")
    for key in ("preset", "model", "data_root"):
        if data.get(key) is not None and not (isinstance(data[key], str) and data[key]):
            raise ConfigError(f"{source}: {key!r} must be a non-empty string, got {data[key]!r}")
    device = data.get("device", "auto")
    if not isinstance(device, str):
        raise ConfigError(f"{source}: 'device' must be a string (auto, cpu, cuda), got {device!r}")
    overrides = data.get("overrides", {})
    if not isinstance(overrides, dict):
        raise ConfigError(f"{source}: 'overrides' must be a table, got {overrides!r}")
    variants = parse_variants(data.get("variants", {}), source, _flatten)
    bases = [*(m for m in methods if m not in variants), *(v.method for v in variants.values())]
    per: dict[str, dict[str, dict[str, Any]]] = {}
    for key, allowed in (("dataset_overrides", datasets), ("method_overrides", tuple(dict.fromkeys(bases)))):
        tables = data.get(key, {})
        if not isinstance(tables, dict) or not all(isinstance(v, dict) for v in tables.values()):
            raise ConfigError(
                f"{source}: {key!r} must hold one table per name ([{key}.NAME]), got {tables!r}"
            )
        stray = [n for n in tables if n not in allowed]
        if stray and stray[0] in variants:
            raise ConfigError(
                f"{source}: [{key}.{stray[0]}] names a variant; put its keys in [variants.{stray[0]}]"
            )
        if stray:
            kind = key.split("_")[0] + "s"
            raise ConfigError(
                f"{source}: [{key}.{stray[0]}] names {stray[0]!r}, which is not in {kind} "
                f"({', '.join(allowed)})"
            )
        per[key] = {n: _flatten(t, f"{source} [{key}.{n}]") for n, t in tables.items()}
    return MatrixSpec(
        methods=methods,
        datasets=datasets,
        seeds=tuple(seeds),
        preset=data.get("preset"),
        model=data.get("model"),
        device=device,
        data_root=data.get("data_root"),
        overrides=_flatten(overrides, f"{source} [overrides]"),
        dataset_overrides=per["dataset_overrides"],
        method_overrides=per["method_overrides"],
        variants=variants,
        source=source,
    )


def load_spec(path: str | os.PathLike[str]) -> MatrixSpec:
    """Read and validate a TOML matrix spec.

    Raises:
        ConfigError: naming the path: missing or unreadable file, not UTF-8 text, TOML syntax error
            (with its position), or an invalid spec.
    """
    path = Path(path)
    try:
        text = path.read_bytes().decode("utf-8")
    except OSError as exc:
        raise ConfigError(f"matrix spec {str(path)!r} cannot be read: {exc.strerror or exc}") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"matrix spec {str(path)!r} is not UTF-8 text (byte {exc.start}: {exc.reason}); save it as UTF-8"
        ) from exc
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"matrix spec {str(path)!r} is not valid TOML: {exc}") from exc
    return parse_spec(data, str(path))


# -- planning --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PlannedRun:
    """One run of the matrix, resolved (or known to be unsupported) before anything trains."""

    spec: RunSpec
    run_id: str
    label: str
    task: str
    resolved: ResolvedRun | None  # None when unsupported
    unsupported_reason: str | None = None

    @property
    def method(self) -> str:
        return self.spec.method

    @property
    def dataset(self) -> str:
        return self.spec.dataset

    @property
    def seed(self) -> int:
        return int(self.spec.seed if self.spec.seed is not None else 0)

    def command(self) -> str:
        """The ``mmbalance run`` command that reproduces this run alone."""
        parts = ["mmbalance", "run", shlex.quote(self.spec.method), shlex.quote(self.spec.dataset)]
        parts += ["--seed", str(self.seed)]
        if self.spec.preset:
            parts += ["--preset", shlex.quote(self.spec.preset)]
        if self.spec.model:
            parts += ["--model", shlex.quote(self.spec.model)]
        if self.spec.data_root:
            parts += ["--data-root", shlex.quote(self.spec.data_root)]
        for key, value in self.spec.overrides.items():
            parts += ["--set", format_set(key, value)]
        return " ".join(parts)

    def plan_entry(self) -> dict[str, Any]:
        return {
            "run_id": self.run_id,
            "label": self.label,
            "method": self.method,
            "dataset": self.dataset,
            "task": self.task,
            "seed": self.seed,
            "unsupported": self.resolved is None,
        }


def _hash(obj: Any) -> str:
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def plan_hash(runs: Sequence[PlannedRun]) -> str:
    """Name of a plan's file under ``<out>/_matrix/``: a hash of its run ids, in order."""
    return _hash([r.run_id for r in runs])


def _modality_variants(method: str, dataset: str, overrides: Mapping[str, Any]) -> list[str | None]:
    """[None] for an ordinary method; the dataset's modalities for one with a ``modality`` field."""
    if "modality" not in config_fields(METHODS.get(method).Config):
        return [None]
    fixed = overrides.get("method.modality", overrides.get("modality"))
    modalities = tuple(DATASETS.get(dataset).modality_names)
    if fixed is not None:
        if fixed not in modalities:
            raise ConfigError(
                f"override modality={fixed!r} for method {method!r}, but dataset {dataset!r} has "
                f"modalities {modalities}"
            )
        return [None]  # the override already names it
    return list(modalities)


def _plan_cell(
    spec: MatrixSpec,
    row: tuple[str, str],
    dataset: str,
    seed: int,
    overrides: Mapping[str, Any],
    swept: tuple[tuple[str, Any], ...],
    root: str | None,
) -> list[PlannedRun]:
    """The runs of one (seed, dataset, row, grid point) cell: one, or one per modality."""
    name, method = row
    per_modality = "modality" in config_fields(METHODS.get(method).Config)
    out = []
    for modality in _modality_variants(method, dataset, overrides):
        run_overrides = dict(overrides)
        if modality is not None:
            run_overrides["modality"] = modality
        shown = run_overrides.get("modality", run_overrides.get("method.modality"))  # also a fixed one
        label = row_label(name, shown if per_modality and isinstance(shown, str) else None, swept)
        run_spec = RunSpec(
            method=method, dataset=dataset, model=spec.model, preset=spec.preset,
            seed=seed, overrides=run_overrides, data_root=root,
        )
        try:
            resolved = resolve_run(run_spec)
        except (ConfigError, RegistryError) as exc:
            raise type(exc)(f"{label} on {dataset}, seed {seed}: {exc}") from exc
        except UnsupportedError as exc:
            identity = {"unsupported": True, "method": method, "dataset": dataset, "model": spec.model,
                        "preset": spec.preset, "seed": seed, "overrides": run_overrides}
            task = DATASETS.get(dataset).task
            out.append(PlannedRun(run_spec, _hash(identity), label, task, None, str(exc)))
        else:
            resolved = dataclasses.replace(resolved, label=label)
            out.append(PlannedRun(run_spec, resolved.run_id, label, resolved.task, resolved))
    return out


def _check_names(spec: MatrixSpec) -> None:
    for key, registry, names in (
        ("methods", METHODS, [m for m in spec.methods if m not in spec.variants]),
        ("datasets", DATASETS, spec.datasets),
    ):
        for name in names:
            try:
                registry.get(name)
            except RegistryError as exc:
                raise RegistryError(f"{spec.source}: {key}: {exc}") from exc
    for variant in spec.variants.values():
        if variant.name in METHODS:
            raise ConfigError(
                f"{spec.source}: [variants.{variant.name}] is named like the registered method "
                f"{variant.name!r}; give the variant another name"
            )
        try:
            METHODS.get(variant.method)
        except RegistryError as exc:
            raise RegistryError(f"{spec.source}: [variants.{variant.name}] method: {exc}") from exc


def plan_matrix(
    spec: MatrixSpec,
    *,
    set_overrides: Mapping[str, Any] | None = None,
    data_root: str | None = None,
) -> list[PlannedRun]:
    """Expand and resolve every run of the matrix, in order (seed, dataset, row, grid point,
    modality); rows are :attr:`MatrixSpec.rows`, grids as in :mod:`mmbalance.variants`.

    Raises:
        RegistryError / ConfigError: naming the spec's path and the run: an unknown name, key or
            preset, a value of the wrong type or out of range, a variant named like a method, or
            two runs that resolve to the same run id. Nothing has run at that point.
    """
    _check_names(spec)
    root = data_root if data_root is not None else spec.data_root
    runs: list[PlannedRun] = []
    seen: dict[str, PlannedRun] = {}
    for seed in spec.seeds:
        for dataset in spec.datasets:
            for row in spec.rows:
                name, method = row
                variant = spec.variants.get(name)
                levels = [
                    spec.overrides,
                    spec.dataset_overrides.get(dataset, {}),
                    spec.method_overrides.get(method, {}),
                    variant.overrides if variant else {},
                ]
                try:
                    points = grid_points(
                        levels, set_overrides or {},
                        lambda keys, m=method, d=dataset: list_valued_keys(m, d, spec.model, keys),
                        f"{name} on {dataset}",
                    )
                    cell = [
                        run
                        for overrides, swept in points
                        for run in _plan_cell(spec, row, dataset, seed, overrides, swept, root)
                    ]
                except (ConfigError, RegistryError) as exc:
                    raise type(exc)(f"{spec.source}: {exc}") from exc
                for planned in cell:
                    if planned.run_id in seen:
                        other = seen[planned.run_id]
                        raise ConfigError(
                            f"{spec.source}: {planned.label} on {dataset} seed {seed} resolves to the same "
                            "run "
                            f"({planned.run_id}) as {other.label} on {other.dataset} seed {other.seed}"
                        )
                    seen[planned.run_id] = planned
                    runs.append(planned)
    return runs


def select_shard(runs: Sequence[PlannedRun], shard: tuple[int, int] | None) -> list[PlannedRun]:
    """Every N-th run from the K-th (1-based); the whole list without a shard.

    Raises:
        ConfigError: K is beyond the number of runs (the shard would be empty).
    """
    if shard is None:
        return list(runs)
    k, n = shard
    if k > len(runs):
        raise ConfigError(
            f"--shard {k}/{n} selects no run: the matrix has {len(runs)} run(s), so K must be at most "
            f"{len(runs)} (use N <= {len(runs)})"
        )
    return list(runs[k - 1 :: n])


def missing_data(runs: Sequence[PlannedRun]) -> list[str]:
    """Every missing data root, folder or file of the runs' datasets, each once, in run order
    (:meth:`~mmbalance.datasets.MultimodalDataset.missing_data`; nothing is read)."""
    out: dict[str, None] = {}
    for run in runs:
        if run.resolved is not None:
            for line in DATASETS.get(run.dataset).missing_data(run.resolved.dataset_config):
                out.setdefault(line, None)
    return list(out)


def check_data(runs: Sequence[PlannedRun], source: str) -> None:
    """Refuse to start a matrix whose runs would miss data.

    Raises:
        DataError: one error listing everything missing and how many runs need it.
    """
    missing = missing_data(runs)
    if missing:
        raise DataError(
            f"{source}: data missing for the runs to do, nothing was run: {'; '.join(missing)} "
            "(the dataset READMEs under datasets/ describe each layout; `mmbalance fixtures DIR` "
            "writes tiny copies to try the pipeline)"
        )
