"""The Ray executor: each planned run is one Ray task; Ray places it on a node with the resources it
asks for and retries it when its worker process or node dies; mmbalance plans the runs, claims them
and writes the rows (:mod:`mmbalance.matrix_run`).

Connection (``--address``): none starts a local cluster sized to this machine (``ray.init()``) and
stops it at the end; ``auto`` joins the cluster this machine belongs to (``ray start`` ran here, as
in ``examples/slurm/ray_matrix.sbatch``); ``HOST:PORT`` its GCS; ``ray://HOST:PORT`` through Ray
Client. A cluster that cannot be reached within :data:`CONNECT_TIMEOUT_S` is an error naming the
address. A process where Ray is already initialised (a notebook, a test) uses that connection.

Resources and device: a run asks for ``cpus_per_run`` CPUs and ``gpus_per_run`` GPUs (default 1
when runs train on CUDA, 0 on CPU; a fraction below 1 lets several small runs share a GPU). Inside
the task torch uses ``cpus_per_run`` intra-op threads, and the device is the GPU Ray assigned (Ray
sets ``CUDA_VISIBLE_DEVICES``, so the run trains on ``cuda:0`` of its own view) or the CPU. The
device the matrix asks for decides the kind: ``auto`` is CUDA when the cluster has GPUs (or
``gpus_per_run`` > 0); ``cuda:N`` is refused (Ray picks the GPU). Before any run is submitted, some
node must offer what one run asks for; otherwise the runs would wait forever, so it is an error.

Rows, attempts, failures: the task returns the row, and the driver writes it, adding
``env.node`` (the worker's host), ``env.ray_task_id`` and ``attempts``. Attempts are counted by a
small actor of the driver (each attempt reports its start); Ray retries a task whose worker or node
died up to ``max_retries`` times (default 2). A run that raises is not retried: the task returns the
error, recorded once as a failed row. Ctrl-C on the driver cancels the tasks in flight.

Code, data and files on the nodes: every node needs mmbalance and its dependencies (same versions);
the folder the driver imported mmbalance from (a source checkout) goes first on the workers'
``PYTHONPATH``, so a local cluster, or nodes that share that path, run the driver's code. The dataset
root must be readable on every node: a task that cannot read it fails naming the node and the path.
Rows need no shared file system; epoch checkpoints are written where the run trains, under
``<out>/_ckpt/``: with ``--out`` on a shared file system a retry on another node resumes from them
and the driver removes them after the row; on a node that does not see ``--out`` (no ``_matrix``
folder there) the task removes its own once it has returned a final row.
"""

from __future__ import annotations

import functools
import logging
import math
import os
import platform
import socket
import threading
import traceback
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

import mmbalance
from mmbalance.errors import ConfigError, DataError
from mmbalance.executor import Executor, RunFailure, RunFn
from mmbalance.results import PLAN_DIR

if TYPE_CHECKING:
    from mmbalance.checkpoint import RunCheckpoint
    from mmbalance.matrix import PlannedRun
    from mmbalance.resolve import ResolvedRun

__all__ = ["RayExecutor", "RayOptions", "import_ray", "RAY_EXTRA", "CONNECT_TIMEOUT_S"]

RAY_EXTRA = "pip install 'mmbalance[ray]'"
MIN_RAY = (2, 40)
CONNECT_TIMEOUT_S = 30.0  # seconds to reach an existing cluster


def import_ray() -> Any:
    """The ``ray`` module. Raises ConfigError naming the extra to install when it is missing or old."""
    try:
        import ray
    except ImportError as exc:
        raise ConfigError(
            f"--executor ray needs the ray package, which is not installed: {RAY_EXTRA} (ray>=2.40)"
        ) from exc
    parts = tuple(int(p) for p in ray.__version__.split(".")[:2] if p.isdigit())
    if parts < MIN_RAY:
        raise ConfigError(f"--executor ray needs ray>=2.40, found ray {ray.__version__}: {RAY_EXTRA}")
    return ray


@dataclass(frozen=True)
class RayOptions:
    """Options of the Ray executor (``mmbalance matrix --executor ray ...``).

    Raises (at construction):
        ConfigError: naming the option, the value and what is expected.
    """

    address: str | None = None  # None: a local cluster; auto | HOST:PORT | ray://HOST:PORT
    gpus_per_run: float | None = None  # None: 1 on CUDA, 0 on CPU; a fraction < 1 shares a GPU
    cpus_per_run: int = 1  # CPUs of a run's task, and its intra-op threads
    max_in_flight: int | None = None  # runs submitted at once; None: twice what the cluster holds
    max_retries: int = 2  # retries of a task whose worker or node died

    def __post_init__(self) -> None:
        g = self.gpus_per_run
        if g is not None and (isinstance(g, bool) or not isinstance(g, int | float) or not math.isfinite(g)
                              or g < 0 or (g > 1 and g != int(g))):
            raise ConfigError(
                f"--gpus-per-run must be a number >= 0, a fraction below 1 or a whole number, got {g!r}"
            )
        for option, value, least in (("--cpus-per-run", self.cpus_per_run, 1),
                                     ("--max-in-flight", self.max_in_flight, 1),
                                     ("--max-retries", self.max_retries, 0)):
            if value is None and option == "--max-in-flight":
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise ConfigError(f"{option} must be an integer >= {least}, got {value!r}")
        if self.address is not None and not (isinstance(self.address, str) and self.address.strip()):
            raise ConfigError(f"--address must be auto, HOST:PORT or ray://HOST:PORT, got {self.address!r}")


# -- inside the cluster ----------------------------------------------------------------------------
class _Ledger:
    """Counts the attempts of each run (a Ray actor of the driver's job, on the driver's node)."""

    def __init__(self) -> None:
        self.attempts: dict[str, int] = {}

    def start(self, run_id: str) -> int:
        self.attempts[run_id] = self.attempts.get(run_id, 0) + 1
        return self.attempts[run_id]

    def count(self, run_id: str) -> int:
        return self.attempts.get(run_id, 0)

    def started(self, run_ids: list[str]) -> int:
        return sum(1 for r in run_ids if r in self.attempts)


def _check_data_root(resolved: ResolvedRun, node: str) -> None:
    root = getattr(resolved.dataset_config, "root", None)
    if root is None:
        return
    path = Path(root)
    why = "no such folder" if not path.exists() else "not a folder" if not path.is_dir() else "not readable"
    if not (path.is_dir() and os.access(path, os.R_OK | os.X_OK)):
        raise DataError(
            f"node {node!r} cannot read --data-root {str(root)!r} ({why}); the dataset root must be readable "
            "on every node of the Ray cluster (a shared file system, or the same path on each node)"
        )


def _train_task(resolved: ResolvedRun, run_fn: RunFn | None, command: str, device_type: str, threads: int,
                checkpoint: RunCheckpoint | None, ledger: Any, run_id: str) -> dict[str, Any]:
    """One run in a Ray worker: ``{"row": ..., "record": ...}`` or ``{"failure": ..., "record": ...}``."""
    import ray

    from mmbalance.runner import environment, run_one

    node = platform.node()
    record: dict[str, Any] = {
        "attempts": ray.get(ledger.start.remote(run_id)),
        "env": {"node": node, "ray_task_id": ray.get_runtime_context().get_task_id()},
    }
    device = torch.device("cpu")
    try:
        torch.set_num_threads(threads)
        if device_type == "cuda":
            gpu_ids = ray.get_gpu_ids()
            if not gpu_ids:
                raise ConfigError(f"node {node!r}: Ray assigned no GPU to a run that trains on CUDA")
            record["env"]["ray_gpu_ids"] = [str(i) for i in gpu_ids]
            device = torch.device("cuda", 0)
        _check_data_root(resolved, node)
        extra = {"checkpoint": checkpoint} if checkpoint is not None else {}
        train = run_fn or functools.partial(run_one, threads=threads)
        row = train(resolved, device=device, quiet=True, command=command, **extra)
    except (Exception, SystemExit) as exc:  # KeyboardInterrupt (a cancel) ends the task
        message = f"the run called sys.exit({exc.code!r})" if isinstance(exc, SystemExit) else str(exc)
        record["env"] = {**environment(device), **record["env"]}
        failure = {"type_name": type(exc).__name__, "message": message,
                   "traceback_text": "".join(traceback.format_exception(exc))}
        return {"failure": failure, "record": record}
    shared = checkpoint is not None and (checkpoint.folder.parent.parent / PLAN_DIR).is_dir()
    if checkpoint is not None and not shared and not checkpoint.keep and row.get("status") != "failed":
        checkpoint.remove()  # the driver cannot see this node's files
    return {"row": row, "record": record}


# -- the driver ----------------------------------------------------------------------------------------
class _QuietSigterm(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "SIGTERM handler is not set" not in record.getMessage()


def _code_path() -> str | None:
    """The folder holding the driver's mmbalance package when it is a source checkout."""
    root = Path(mmbalance.__file__).resolve().parent.parent
    return None if root.name in ("site-packages", "dist-packages") else str(root)


def _probe(address: str, timeout: float) -> None:
    """A TCP connection to ``HOST:PORT`` (also ``ray://HOST:PORT``); ConfigError when it fails."""
    target = address.removeprefix("ray://")
    host, _, port = target.rpartition(":")
    if not host or not port.isdigit():
        raise ConfigError(f"--address must be auto, HOST:PORT or ray://HOST:PORT, got {address!r}")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise ConfigError(f"cannot reach the Ray cluster at --address {address!r}: {reason}") from exc


class RayExecutor(Executor):
    """Trains each planned run as one Ray task (see the module docstring).

    Args:
        options: :class:`RayOptions`.
        run_fn: trains one run in the worker (default :func:`mmbalance.runner.run_one`); a module-level
            function, importable on every node.
    """

    def __init__(self, options: RayOptions | None = None, run_fn: RunFn | None = None) -> None:
        self.options = options if options is not None else RayOptions()
        self.run_fn = run_fn
        self.max_in_flight = self.options.max_in_flight or 1
        self._ray: Any = None
        self._owns_connection = False
        self._device: torch.device | None = None
        self._task: Any = None
        self._ledger: Any = None
        self._refs: dict[Future, tuple[Any, str]] = {}

    @property
    def threads(self) -> int:
        return self.options.cpus_per_run

    # -- starting ----------------------------------------------------------------------------------
    def start(self, device: str | torch.device) -> torch.device:
        ray = self._ray = import_ray()
        self._connect(ray)
        nodes = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]
        self._device = self._resolve_device(str(device), nodes)
        gpus = self._gpus_per_run()
        cpus = self.options.cpus_per_run
        self._check_fits(nodes, cpus, gpus)
        capacity = sum(min(r.get("CPU", 0) // cpus, r.get("GPU", 0) // gpus if gpus else math.inf)
                       for r in nodes)
        self.max_in_flight = self.options.max_in_flight or max(1, 2 * int(capacity))
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        strategy = NodeAffinitySchedulingStrategy(node_id=ray.get_runtime_context().get_node_id(), soft=True)
        self._ledger = ray.remote(num_cpus=0)(_Ledger).options(scheduling_strategy=strategy).remote()
        self._task = ray.remote(_train_task).options(
            num_cpus=cpus, num_gpus=gpus, max_retries=self.options.max_retries, retry_exceptions=False)
        return self._device

    def _connect(self, ray: Any) -> None:
        if ray.is_initialized():
            return
        code = _code_path()
        paths = [p for p in (code, os.environ.get("PYTHONPATH")) if p]
        runtime_env = {"env_vars": {"PYTHONPATH": os.pathsep.join(paths)}} if code else None
        address = self.options.address
        if address is None:
            ray.init(include_dashboard=False, runtime_env=runtime_env)
            self._owns_connection = True
            return
        if address != "auto":
            _probe(address, CONNECT_TIMEOUT_S)
        outcome: dict[str, BaseException | None] = {}

        def connect() -> None:
            try:
                ray.init(address=address, runtime_env=runtime_env)
                outcome["error"] = None
            except BaseException as exc:  # reported below, in the calling thread
                outcome["error"] = exc

        quiet = _QuietSigterm()
        logging.getLogger("ray").addFilter(quiet)
        logging.getLogger("ray._private.worker").addFilter(quiet)
        thread = threading.Thread(target=connect, name="mmbalance-ray-connect", daemon=True)
        thread.start()
        thread.join(CONNECT_TIMEOUT_S)
        if "error" not in outcome:
            raise ConfigError(
                f"no Ray cluster answered at --address {address!r} within {CONNECT_TIMEOUT_S:g} s"
            )
        if outcome["error"] is not None:
            error = outcome["error"]
            message = f"cannot connect to the Ray cluster at --address {address!r}: {error}"
            raise ConfigError(message) from error
        self._owns_connection = True

    def _resolve_device(self, requested: str, nodes: list[dict[str, float]]) -> torch.device:
        gpus, total = self.options.gpus_per_run, sum(r.get("GPU", 0) for r in nodes)
        if requested.startswith("cuda:"):
            raise ConfigError(
                f"device {requested!r} with --executor ray: Ray chooses each run's GPU; use device 'cuda'"
            )
        if requested == "auto":
            kind = "cuda" if (gpus or 0) > 0 or (gpus is None and total > 0) else "cpu"
        else:
            kind = requested
        if kind == "cpu" and (gpus or 0) > 0:
            raise ConfigError(
                f"--gpus-per-run {gpus:g} with device 'cpu': the runs would hold GPUs they do not use"
            )
        if kind == "cuda" and gpus == 0:
            raise ConfigError("device 'cuda' with --gpus-per-run 0: a run that trains on CUDA needs a GPU")
        return torch.device(kind)

    def _gpus_per_run(self) -> float:
        gpus = self.options.gpus_per_run
        return float(gpus) if gpus is not None else (1.0 if self._device is not None and
                                                      self._device.type == "cuda" else 0.0)

    def _check_fits(self, nodes: list[dict[str, float]], cpus: int, gpus: float) -> None:
        if any(r.get("CPU", 0) >= cpus and r.get("GPU", 0) >= gpus for r in nodes):
            return
        total_gpus = sum(r.get("GPU", 0) for r in nodes)
        most_cpus = max((r.get("CPU", 0) for r in nodes), default=0)
        where = (f"the Ray cluster ({len(nodes)} node(s), {total_gpus:g} GPU(s), at most {most_cpus:g} CPUs "
                 "a node)")
        if gpus > 0 and not any(r.get("GPU", 0) >= gpus for r in nodes):
            raise ConfigError(
                f"--gpus-per-run {gpus:g}: no node of {where} has {gpus:g} GPU(s), so the runs would wait "
                "forever; use --gpus-per-run 0 and --device cpu, or a cluster with GPUs"
            )
        raise ConfigError(
            f"--cpus-per-run {cpus}: no node of {where} has {cpus} CPUs"
            + (f" and {gpus:g} GPU(s)" if gpus else "") + ", so the runs would wait forever"
        )

    # -- running -----------------------------------------------------------------------------------
    def submit(self, run: PlannedRun, on_start: Callable[[PlannedRun], None] | None = None,
               checkpoint: RunCheckpoint | None = None) -> Future:
        if self._task is None or self._device is None:
            raise RuntimeError("RayExecutor.start(device) must be called before submit")
        if run.resolved is None:
            raise ValueError(
                f"run {run.run_id} ({run.label} on {run.dataset}) is unsupported; nothing to train"
            )
        future: Future = Future()
        future.set_running_or_notify_cancel()
        ref = self._task.remote(run.resolved, self.run_fn, run.command(), self._device.type, self.threads,
                                checkpoint, self._ledger, run.run_id)
        self._refs[future] = (ref, run.run_id)
        return future

    def as_completed(self, futures: Iterable[Future]) -> Iterator[Future]:
        futures = list(futures)
        waiting = {self._refs[f][0]: f for f in futures if f in self._refs}
        yield from (f for f in futures if f not in self._refs and f.done())
        while waiting:
            ready, _ = self._ray.wait(list(waiting), num_returns=1)
            for ref in ready:
                future = waiting.pop(ref)
                _, run_id = self._refs.pop(future)
                self._settle(future, ref, run_id)
                yield future

    def _settle(self, future: Future, ref: Any, run_id: str) -> None:
        ray = self._ray
        try:
            result = ray.get(ref)
        except ray.exceptions.RayError as exc:  # the worker or node died max_retries + 1 times, ...
            attempts = ray.get(self._ledger.count.remote(run_id))
            lines = str(exc).strip().splitlines()
            message = (f"the Ray task training this run failed after {attempts} attempt(s) (max_retries "
                       f"{self.options.max_retries}): {lines[0] if lines else type(exc).__name__}")
            future.set_exception(RunFailure(type(exc).__name__, message, str(exc), {"attempts": attempts}))
            return
        record = result["record"]
        if "failure" in result:
            future.set_exception(RunFailure(**result["failure"], record=record))
            return
        row = result["row"]
        row["attempts"] = record["attempts"]
        row["env"] = {**row.get("env", {}), **record["env"]}
        future.set_result(row)

    def running(self) -> int:
        if not self._refs or self._ledger is None:
            return 0
        return int(self._ray.get(self._ledger.started.remote([r for _, r in self._refs.values()])))

    def close(self) -> None:
        """Cancel the tasks in flight (Ctrl-C, an error), then leave a cluster this executor joined."""
        ray = self._ray
        if ray is None:
            return
        for ref, _ in reversed(list(self._refs.values())):  # the queued ones first: none starts meanwhile
            try:
                ray.cancel(ref, force=True)
            except Exception:  # already finished or gone: nothing to cancel
                pass
        self._refs.clear()
        if self._ledger is not None and ray.is_initialized():
            ray.kill(self._ledger)
            self._ledger = None
        if self._owns_connection and ray.is_initialized():
            ray.shutdown()
            self._owns_connection = False
