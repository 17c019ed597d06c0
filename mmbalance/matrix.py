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

    [method_overrides.cggm]              # runs of one method
    rho = 1.2

Overrides merge in the order ``overrides`` <- ``dataset_overrides[d]`` <- ``method_overrides[m]``
<- ``--set``, later wins. A method whose config has a ``modality`` field (``unimodal``) expands to
one run per modality of each dataset (label ``unimodal[text]``) unless an override fixes it.

Runs are ordered seed-major (all cells of seed 0, then seed 1, ...), so an interrupted matrix has
whole tables of its first seeds. ``--shard K/N`` (1-based) takes every N-th run starting at the
K-th: shards never overlap, their union is the matrix, and each gets a mix of datasets and methods.

Each run is written to ``<out>/<run_id>.json`` atomically (see :func:`mmbalance.results.write_json_atomic`).
Re-running the same matrix skips runs whose file says ``ok`` or ``unsupported``, and retries
``failed`` runs and unreadable files. A method that does not support a dataset's task or modality
count gets an ``unsupported`` row without training (the table shows ``-``). A run that raises is
recorded as ``failed`` with its error and traceback, and the matrix goes on. The whole plan is
resolved before anything runs, so an unknown name or key stops the matrix at once. The plan itself
goes to ``<out>/_matrix/<hash>.json``, from which tables know the expected cells.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shlex
import sys
import time
import tomllib
import traceback
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from mmbalance.datasets import DATASETS
from mmbalance.errors import ConfigError, RegistryError, ResultError, UnsupportedError
from mmbalance.methods import METHODS
from mmbalance.registry import config_fields
from mmbalance.results import PLAN_DIR, read_row, write_json_atomic, write_row
from mmbalance.runner import ResolvedRun, RunSpec, environment, resolve_run, run_one
from mmbalance.train import resolve_device

__all__ = [
    "MatrixSpec",
    "PlannedRun",
    "MatrixReport",
    "SPEC_KEYS",
    "load_spec",
    "parse_spec",
    "parse_shard",
    "parse_set",
    "format_set",
    "plan_matrix",
    "select_shard",
    "run_matrix",
    "PRIMARY_METRIC",
]

SPEC_KEYS = (
    "methods", "datasets", "seeds", "preset", "model", "device", "data_root",
    "overrides", "dataset_overrides", "method_overrides",
)
# The metric the progress line shows, per task.
PRIMARY_METRIC = {"cls": "acc", "reg": "mae", "seg": "dice_mean"}
_SHARD_RE = re.compile(r"^\s*(\d+)\s*/\s*(\d+)\s*$")
_BARE_WORD = re.compile(r"^[^\s\"'\[\]{}=,#]+$")
_KEY_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)?$")


# -- parsing ---------------------------------------------------------------------------------------
def _toml_value(text: str) -> Any:
    return tomllib.loads(f"v = {text}")["v"]


def parse_set(items: Sequence[str], *, option: str = "--set") -> dict[str, Any]:
    """``["epochs=3", "method.rho=1.2", "modality=text"]`` -> ``{"epochs": 3, ...}``.

    Values are TOML values (``3``, ``1e-3``, ``true``, ``"text"``, ``[1, 2]``); a bare word without
    spaces or quotes (``text``, ``/data/mosi``) is a string. Later items win.

    Raises:
        ConfigError: naming ``option``, the item and the expected form ``key=value``.
    """
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        key, raw = key.strip(), raw.strip()
        if not sep or not key or not raw:
            raise ConfigError(f"{option} expects key=value (e.g. {option} epochs=3); got {item!r}")
        if not _KEY_RE.match(key):
            raise ConfigError(
                f"{option} key must be a config field, optionally prefixed (epochs, method.rho); got {key!r} in {item!r}"
            )
        try:
            value = _toml_value(raw)
        except tomllib.TOMLDecodeError:
            if not _BARE_WORD.match(raw):
                raise ConfigError(
                    f"{option} value in {item!r} is not a TOML value (number, true/false, \"string\", [array]) "
                    "or a bare word; quote strings that contain spaces or special characters"
                ) from None
            value = raw
        if isinstance(value, dict):
            raise ConfigError(f"{option} value in {item!r} must be a scalar or an array, not a table")
        out[key] = value
    return out


def _format_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value) if not isinstance(value, float) or value == value else "nan"
    if isinstance(value, str):
        if _BARE_WORD.match(value):
            try:
                _toml_value(value)
            except tomllib.TOMLDecodeError:
                return value  # parses back as the same bare word
        return json.dumps(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_format_value(v) for v in value) + "]"
    raise ConfigError(f"cannot write override value {value!r} ({type(value).__name__}) as --set")


def format_set(key: str, value: Any) -> str:
    """One shell-quoted ``--set`` argument that :func:`parse_set` reads back as ``{key: value}``."""
    return shlex.quote(f"{key}={_format_value(value)}")


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
    source: str = "<matrix spec>"

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
        raise ConfigError(f"{source}: unknown key(s) {', '.join(map(repr, unknown))}; valid keys: {', '.join(SPEC_KEYS)}")
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
    per: dict[str, dict[str, dict[str, Any]]] = {}
    for key, allowed in (("dataset_overrides", datasets), ("method_overrides", methods)):
        tables = data.get(key, {})
        if not isinstance(tables, dict) or not all(isinstance(v, dict) for v in tables.values()):
            raise ConfigError(f"{source}: {key!r} must hold one table per name ([{key}.NAME]), got {tables!r}")
        stray = [n for n in tables if n not in allowed]
        if stray:
            kind = key.split("_")[0] + "s"
            raise ConfigError(
                f"{source}: [{key}.{stray[0]}] names {stray[0]!r}, which is not in {kind} ({', '.join(allowed)})"
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
        source=source,
    )


def load_spec(path: str | os.PathLike[str]) -> MatrixSpec:
    """Read and validate a TOML matrix spec.

    Raises:
        ConfigError: missing file, TOML syntax error (with its position), or an invalid spec.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"matrix spec {str(path)!r} cannot be read: {exc.strerror or exc}") from exc
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
        parts = ["mmbalance", "run", shlex.quote(self.spec.method), shlex.quote(self.spec.dataset), "--seed", str(self.seed)]
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
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str).encode()).hexdigest()[:12]


def _modality_variants(method: str, dataset: str, overrides: Mapping[str, Any]) -> list[str | None]:
    """[None] for an ordinary method; the dataset's modalities for one with a ``modality`` field."""
    method_cls = METHODS.get(method)
    if "modality" not in config_fields(method_cls.Config):
        return [None]
    fixed = overrides.get("method.modality", overrides.get("modality"))
    dataset_cls = DATASETS.get(dataset)
    modalities = tuple(getattr(dataset_cls, "modality_names", ()) or ())
    if not modalities:
        raise ConfigError(
            f"dataset {dataset!r} declares no modality_names, so method {method!r} cannot be expanded per "
            "modality; fix the dataset class or set modality=... in [method_overrides]"
        )
    if fixed is not None:
        if fixed not in modalities:
            raise ConfigError(
                f"override modality={fixed!r} for method {method!r}, but dataset {dataset!r} has modalities {modalities}"
            )
        return [None]  # the override already names it
    return list(modalities)


def plan_matrix(
    spec: MatrixSpec,
    *,
    set_overrides: Mapping[str, Any] | None = None,
    data_root: str | None = None,
) -> list[PlannedRun]:
    """Expand and resolve every run of the matrix, in order (seed, dataset, method, modality).

    Raises:
        RegistryError / ConfigError: an unknown name, key or preset, an out-of-range value, or two
            runs that resolve to the same run id. Nothing has run at that point.
    """
    root = data_root if data_root is not None else spec.data_root
    runs: list[PlannedRun] = []
    seen: dict[str, PlannedRun] = {}
    for seed in spec.seeds:
        for dataset in spec.datasets:
            for method in spec.methods:
                merged = {
                    **spec.overrides,
                    **spec.dataset_overrides.get(dataset, {}),
                    **spec.method_overrides.get(method, {}),
                    **(set_overrides or {}),
                }
                for modality in _modality_variants(method, dataset, merged):
                    overrides = dict(merged)
                    if modality is not None:
                        overrides["modality"] = modality
                    run_spec = RunSpec(
                        method=method, dataset=dataset, model=spec.model, preset=spec.preset,
                        seed=seed, overrides=overrides, data_root=root,
                    )
                    try:
                        resolved = resolve_run(run_spec)
                    except (ConfigError, RegistryError) as exc:
                        what = f"{method}{f'[{modality}]' if modality else ''} on {dataset}, seed {seed}"
                        raise type(exc)(f"{spec.source}: {what}: {exc}") from exc
                    except UnsupportedError as exc:
                        dataset_cls = DATASETS.get(dataset)
                        identity = {"unsupported": True, "method": method, "dataset": dataset, "model": spec.model,
                                    "preset": spec.preset, "seed": seed, "overrides": overrides}
                        planned = PlannedRun(run_spec, _hash(identity), method, str(getattr(dataset_cls, "task", "")),
                                             None, str(exc))
                    else:
                        planned = PlannedRun(run_spec, resolved.run_id, resolved.label, resolved.task, resolved)
                    if planned.run_id in seen:
                        other = seen[planned.run_id]
                        raise ConfigError(
                            f"{spec.source}: {planned.label} on {dataset} seed {seed} resolves to the same run "
                            f"({planned.run_id}) as {other.label} on {other.dataset} seed {other.seed}"
                        )
                    seen[planned.run_id] = planned
                    runs.append(planned)
    return runs


def select_shard(runs: Sequence[PlannedRun], shard: tuple[int, int] | None) -> list[PlannedRun]:
    """Every N-th run from the K-th (1-based); the whole list without a shard."""
    if shard is None:
        return list(runs)
    k, n = shard
    return list(runs[k - 1 :: n])


# -- running ---------------------------------------------------------------------------------------
@dataclass
class MatrixReport:
    """What one invocation of :func:`run_matrix` did."""

    out: Path
    planned: int
    selected: int
    outcomes: list[tuple[PlannedRun, str, bool]] = field(default_factory=list)  # (run, status, skipped)

    @property
    def counts(self) -> Counter[str]:
        return Counter(status for _, status, _ in self.outcomes)

    @property
    def skipped(self) -> int:
        return sum(1 for *_, skipped in self.outcomes if skipped)

    @property
    def failed(self) -> list[PlannedRun]:
        return [run for run, status, _ in self.outcomes if status == "failed"]

    def summary(self) -> str:
        c = self.counts
        shard = f" (shard of {self.planned})" if self.selected != self.planned else ""
        return (
            f"{self.selected} runs{shard}: {c['ok']} ok, {c['unsupported']} unsupported, {c['failed']} failed; "
            f"{self.skipped} already done; results in {self.out}"
        )


def _base_row(run: PlannedRun, status: str, env: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "run_id": run.run_id,
        "status": status,
        "method": run.method,
        "label": run.label,
        "dataset": run.dataset,
        "task": run.task,
        "seed": run.seed,
        "config": dict(run.resolved.config) if run.resolved else {},
        "metrics": {},
        "history": [],
        "cost": {},
        "env": dict(env),
        "command": run.command(),
    }


def _previous_status(path: Path) -> tuple[str | None, str | None]:
    """(status of an existing row file, reason it is unusable)."""
    if not path.exists():
        return None, None
    try:
        return read_row(path).status, None
    except ResultError as exc:
        return None, str(exc)


def _outcome_text(row: Mapping[str, Any], task: str) -> str:
    if row.get("status") != "ok":
        err = row.get("error") or {}
        return f"{err.get('type', 'error')}: {str(err.get('message', '')).splitlines()[0] if err.get('message') else ''}"
    key = PRIMARY_METRIC.get(task, "")
    value = (row.get("metrics", {}).get("test") or {}).get(key)
    if value is None:
        return ""
    return f"test {key} {value * 100:.2f}%" if key != "mae" else f"test {key} {value:.4f}"


def run_matrix(
    spec: MatrixSpec,
    out: str | os.PathLike[str],
    *,
    shard: tuple[int, int] | None = None,
    set_overrides: Mapping[str, Any] | None = None,
    data_root: str | None = None,
    device: str | None = None,
    quiet: bool = False,
    stream: TextIO | None = None,
    run_fn: Callable[..., dict[str, Any]] = run_one,
) -> MatrixReport:
    """Run (or resume) the matrix's runs of ``shard`` into ``out``; one progress line per run.

    ``run_fn(spec, device=..., quiet=..., command=...)`` trains one run (default
    :func:`mmbalance.runner.run_one`). ``KeyboardInterrupt`` stops the matrix without recording the
    interrupted run; any other exception is recorded as a ``failed`` row.

    Raises:
        ConfigError / RegistryError: invalid spec, shard, override or device (before any run).
    """
    stream = stream if stream is not None else sys.stderr
    dev_name = device if device is not None else spec.device
    dev = resolve_device(dev_name)
    runs = plan_matrix(spec, set_overrides=set_overrides, data_root=data_root)
    selected = select_shard(runs, shard)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    plan = {"spec": spec.to_dict(), "spec_file": spec.source, "runs": [r.plan_entry() for r in runs]}
    write_json_atomic(out / PLAN_DIR / f"{_hash([r.run_id for r in runs])}.json", plan)
    report = MatrixReport(out=out, planned=len(runs), selected=len(selected))
    env: dict[str, Any] | None = None
    width = len(str(len(selected)))
    for i, run in enumerate(selected, 1):
        path = out / f"{run.run_id}.json"
        head = f"[{i:>{width}}/{len(selected)}] {run.label} on {run.dataset}, seed {run.seed} ({run.run_id}): "
        previous, unreadable = _previous_status(path)
        if previous in ("ok", "unsupported"):
            report.outcomes.append((run, previous, True))
            if not quiet:
                print(head + f"{previous}, already done", file=stream, flush=True)
            continue
        if not quiet:
            note = "retrying failed run, " if previous == "failed" else f"re-running ({unreadable}), " if unreadable else ""
            print(head + note, end="", file=stream, flush=True)
        if env is None:
            env = environment(dev)
        t0 = time.perf_counter()
        if run.resolved is None:
            row = _base_row(run, "unsupported", env)
            row["reason"] = run.unsupported_reason
        else:
            try:
                row = run_fn(run.spec, device=dev, quiet=True, command=run.command())
            except KeyboardInterrupt:
                if not quiet:
                    print("interrupted", file=stream, flush=True)
                raise
            except Exception as exc:  # any failure of one run is recorded; the matrix goes on
                row = _base_row(run, "failed", env)
                row["error"] = {
                    "type": type(exc).__name__,
                    "message": str(exc),
                    "traceback": traceback.format_exc(),
                }
            else:
                if row.get("run_id") != run.run_id:
                    raise RuntimeError(
                        f"run_one returned run_id {row.get('run_id')!r} for planned run {run.run_id}; "
                        "run ids must not depend on anything outside the resolved run"
                    )
                row.setdefault("label", run.label)
        write_row(out, row)
        status = row["status"]
        report.outcomes.append((run, status, False))
        if not quiet:
            print(f"{status} in {time.perf_counter() - t0:.1f} s {_outcome_text(row, run.task)}".rstrip(), file=stream, flush=True)
    return report
