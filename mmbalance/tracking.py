"""Experiment tracking: mirror each run to TensorBoard and / or MLflow (``--log tensorboard|mlflow``).

What a tracked run records, under the run id as the tracker's run name:

* at the start: the resolved configuration, flattened (``method.rho``, ``train.lr``, ...), and the
  run's identity (run id, label, method, dataset, model, seed);
* after every epoch: every number of the epoch's history record, flattened with ``/`` (``train_loss``,
  ``val/acc``, ``val/score/text``, ``diagnostics/B/text``, ``terms/task``), at step = the epoch;
* at the end: the status, the test metrics (``test/<m>``), the validation metrics of the best epoch
  (``best_val/<m>``), ``best_epoch`` and the cost fields (``cost/step_time_ratio``, ...).

TensorBoard: one event-file folder per run, ``<log_dir>/<run_id>/`` (``tensorboard --logdir
<log_dir>`` lists runs by id); the configuration and the final row are text summaries (``config``,
``result``), the numbers scalars. MLflow: one run per run in the experiment ``experiment``, with the
configuration as params, the numbers as metrics and the identity and status as tags
(``mmbalance.*``); the tracking URI defaults to a SQLite store in the log folder,
``sqlite:///<log_dir>/mlflow.db`` (a ``file:`` URI selects MLflow's file store, which MLflow 3 only
opens with ``MLFLOW_ALLOW_FILE_STORE=true``).

The trackers are optional extras (``pip install mmbalance[tensorboard]``, ``mmbalance[mlflow]``);
asking for one that is not installed is a :class:`~mmbalance.errors.ConfigError` before training.
Tracking adds no work to a training step: it reads the per-epoch history the runner records anyway.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mmbalance.errors import ConfigError

__all__ = ["TRACKERS", "Tracking", "RunTracker", "flatten_numbers", "flatten_params", "parse_log"]

TRACKERS = ("tensorboard", "mlflow")
_EXTRA = {"tensorboard": ("tensorboard", "tensorboard"), "mlflow": ("mlflow", "mlflow")}


def parse_log(values: Sequence[str]) -> tuple[str, ...]:
    """``["tensorboard", "mlflow"]`` or ``["tensorboard,mlflow"]`` -> the trackers, in order.

    Raises:
        ConfigError: naming ``--log``, the value and the trackers known.
    """
    out: list[str] = []
    for value in values:
        for name in (v.strip() for v in str(value).split(",")):
            if name not in TRACKERS:
                known = ", ".join(TRACKERS)
                raise ConfigError(f"--log must be one of {known} (comma-separated); got {name!r}")
            if name not in out:
                out.append(name)
    return tuple(out)


@dataclass(frozen=True)
class Tracking:
    """Which trackers a run mirrors to, and where (module docstring).

    Args:
        trackers: names from :data:`TRACKERS`.
        log_dir: TensorBoard's root folder and the default MLflow SQLite store's folder.
        mlflow_uri: MLflow tracking URI; None: ``sqlite:///<log_dir>/mlflow.db``.
        experiment: MLflow experiment name (created when missing).
    """

    trackers: tuple[str, ...]
    log_dir: str
    mlflow_uri: str | None = None
    experiment: str = "mmbalance"

    def __post_init__(self) -> None:
        unknown = [t for t in self.trackers if t not in TRACKERS]
        if unknown:
            raise ConfigError(f"unknown tracker(s) {unknown}; known: {', '.join(TRACKERS)}")

    def check_installed(self) -> None:
        """Raises ConfigError naming the extra to install for a tracker whose package is missing."""
        import importlib.util

        for name in self.trackers:
            module, extra = _EXTRA[name]
            if importlib.util.find_spec(module) is None:
                raise ConfigError(
                    f"--log {name} needs the {module!r} package: pip install 'mmbalance[{extra}]'"
                )

    @property
    def uri(self) -> str:
        if self.mlflow_uri:
            return self.mlflow_uri
        return f"sqlite:///{(Path(self.log_dir) / 'mlflow.db').resolve()}"


def _number(value: Any) -> float | None:
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, int | float):
        return float(value)
    return None


def flatten_numbers(record: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    """The numbers of a (nested) record as ``{"a/b": float}``; strings, lists and None are left out."""
    out: dict[str, float] = {}
    for key, value in record.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten_numbers(value, f"{name}/"))
        elif (number := _number(value)) is not None:
            out[name] = number
    return out


def flatten_params(config: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """A config as ``{"method.rho": "1.3"}`` (JSON text of each value; None as ``null``)."""
    out: dict[str, str] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and prefix == "":
            out.update(flatten_params(value, f"{name}."))
        else:
            out[name] = json.dumps(value, sort_keys=True, default=str)
    return out


class _TensorBoard:
    def __init__(self, tracking: Tracking, run_id: str) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(Path(tracking.log_dir) / run_id))

    def start(self, identity: Mapping[str, Any], params: Mapping[str, str]) -> None:
        text = json.dumps({**identity, "config": params}, indent=1, default=str)
        self.writer.add_text("config", f"```\n{text}\n```", 0)

    def epoch(self, epoch: int, numbers: Mapping[str, float]) -> None:
        for name, value in numbers.items():
            self.writer.add_scalar(name, value, epoch)
        self.writer.flush()

    def end(self, status: str, final: Mapping[str, float], summary: str) -> None:
        for name, value in final.items():
            self.writer.add_scalar(name, value, 0)
        self.writer.add_text("result", f"status: {status}\n\n```\n{summary}\n```", 0)
        self.writer.close()


class _MLflow:
    _STATUS = {"ok": "FINISHED", "diverged": "FAILED", "failed": "FAILED"}

    def __init__(self, tracking: Tracking, run_id: str) -> None:
        from mlflow.tracking import MlflowClient

        if tracking.mlflow_uri is None:
            Path(tracking.log_dir).mkdir(parents=True, exist_ok=True)
        self.client = MlflowClient(tracking_uri=tracking.uri)
        experiment = self.client.get_experiment_by_name(tracking.experiment)
        if experiment is None:
            exp_id = self.client.create_experiment(tracking.experiment)
        else:
            exp_id = experiment.experiment_id
        self.run = self.client.create_run(exp_id, run_name=run_id)
        self.id = self.run.info.run_id

    def start(self, identity: Mapping[str, Any], params: Mapping[str, str]) -> None:
        from mlflow.entities import Param, RunTag

        tags = [RunTag(f"mmbalance.{k}", str(v)) for k, v in identity.items()]
        items = [Param(k, v[:6000]) for k, v in params.items()]
        for i in range(0, len(items), 100):  # MLflow's batch limit for params
            self.client.log_batch(self.id, params=items[i : i + 100], tags=tags if i == 0 else [])

    def _metrics(self, numbers: Mapping[str, float], step: int) -> None:
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(k, v, now, step) for k, v in numbers.items() if not math.isinf(v)]
        for i in range(0, len(items), 1000):  # MLflow's batch limit for metrics
            self.client.log_batch(self.id, metrics=items[i : i + 1000])

    def epoch(self, epoch: int, numbers: Mapping[str, float]) -> None:
        self._metrics(numbers, epoch)

    def end(self, status: str, final: Mapping[str, float], summary: str) -> None:
        self._metrics(final, 0)
        self.client.set_tag(self.id, "mmbalance.status", status)
        self.client.set_terminated(self.id, self._STATUS.get(status, "FAILED"))


class RunTracker:
    """The trackers of one run, started on creation with the row's identity and config; ``epoch``
    after each epoch, ``end(row)`` with the finished row (returned), ``fail(exc)`` when the run
    raises. A no-op when ``tracking`` is None.

    Raises:
        ConfigError: a tracker's package is not installed (before anything trains).
    """

    def __init__(self, tracking: Tracking | None, row: Mapping[str, Any]) -> None:
        self.backends: list[Any] = []
        if tracking is None:
            return
        tracking.check_installed()
        kinds = {"tensorboard": _TensorBoard, "mlflow": _MLflow}
        run_id = str(row["run_id"])
        self.backends = [kinds[name](tracking, run_id) for name in tracking.trackers]
        identity = {k: row.get(k) for k in ("run_id", "label", "method", "dataset", "model", "seed")}
        params = flatten_params(row.get("config") or {})
        for backend in self.backends:
            backend.start(identity, params)

    def epoch(self, record: Mapping[str, Any]) -> None:
        epoch = int(record.get("epoch", 0))
        numbers = flatten_numbers({k: v for k, v in record.items() if k != "epoch"})
        for backend in self.backends:
            backend.epoch(epoch, numbers)

    def end(self, row: dict[str, Any]) -> dict[str, Any]:
        metrics = row.get("metrics") or {}
        final = {
            **flatten_numbers(metrics.get("test") or {}, "test/"),
            **flatten_numbers(metrics.get("val") or {}, "best_val/"),
            **flatten_numbers({"best_epoch": metrics.get("best_epoch")}),
            **flatten_numbers(row.get("cost") or {}, "cost/"),
        }
        status = str(row.get("status", "ok"))
        reason = (row.get("divergence") or {}).get("reason", "")
        summary = json.dumps({"status": status, "reason": reason, **final}, indent=1, default=str)
        for backend in self.backends:
            backend.end(status, final, summary)
        return row

    def fail(self, exc: BaseException) -> None:
        for backend in self.backends:
            backend.end("failed", {}, f"{type(exc).__name__}: {exc}")

    def guard(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """``fn(*args, **kwargs)``; when it raises, the trackers end the run as failed first."""
        try:
            return fn(*args, **kwargs)
        except BaseException as exc:
            self.fail(exc)
            raise
