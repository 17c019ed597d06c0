"""``mmbalance matrix --jobs N``: N local worker processes share one matrix through its claims.

The command's own process is the first worker: it prints the progress lines, the summary and the
tables. It starts N - 1 more ``mmbalance matrix`` processes with the same spec, folder and options
(quiet, without tables, ``--jobs 1``). Every worker claims a run before training it
(:mod:`mmbalance.claims`), so the runs are split between them and none trains twice. When the
other workers have exited, the runs they trained are counted from their rows, and a run whose worker
died is trained by this process (the claim of a dead process on this host is taken over at once).

A worker dies with the command: Ctrl-C stops them all, and a command killed outright takes its
workers with it (``PR_SET_PDEATHSIG`` on Linux); their claims are taken over by the next run of the
matrix, and their runs resume from their epoch checkpoints.

Threads: the workers share the machine's cores. With N jobs on C usable cores, every worker caps
torch at ``max(1, C // N)`` intra-op threads (``torch.set_num_threads`` here, ``OMP_NUM_THREADS`` in
the others), so ``--threads auto`` gives a small model one thread and a large one ``C // N``, and
the workers do not oversubscribe the cores.

``--jobs auto`` (the default): on the CPU with the local executor, one job per usable core
(``os.sched_getaffinity``), since the synthetic models train on one thread each (measured: the
default benchmark on 2 cores in ``README.md``), but no more jobs than one per
:data:`RUNS_PER_JOB` runs left to train: a worker costs a process start (importing torch takes
seconds), which pays off only over several runs. On CUDA one job (one device), and with Ray one
(Ray places the runs). A number ``--jobs N`` is taken as given.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from mmbalance.errors import ConfigError

if TYPE_CHECKING:
    from mmbalance.matrix_run import MatrixReport

__all__ = ["usable_cores", "parse_jobs", "resolve_jobs", "worker_argv", "run_with_jobs", "RUNS_PER_JOB"]

RUNS_PER_JOB = 8  # --jobs auto starts a worker for every 8 runs left to train, at most one per core


def usable_cores() -> int:
    """CPU cores this process may run on (its affinity mask; ``os.cpu_count()`` where there is none)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def parse_jobs(text: str) -> int | str:
    """``--jobs``: ``auto`` or an integer >= 1.

    Raises:
        ConfigError: naming ``--jobs``, the value and what is expected.
    """
    if text == "auto":
        return "auto"
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise ConfigError(f"--jobs must be 'auto' or an integer >= 1, got {text!r}")
    return value


def resolve_jobs(setting: int | str, executor: str, device: str | None, left: int) -> int:
    """The number of worker processes for ``setting`` (see the module docstring); ``left``: the
    runs left to train.

    Raises:
        ConfigError: more than one job with ``--executor ray`` (Ray places the runs itself).
    """
    if executor != "local":
        if setting not in ("auto", 1):
            raise ConfigError(f"--jobs {setting} applies to --executor local; with ray use --max-in-flight")
        return 1
    if setting != "auto":
        return int(setting)
    if (device or "auto").startswith("cuda") or _cuda_by_default(device):
        return 1
    return max(1, min(usable_cores(), -(-left // RUNS_PER_JOB)))


def _cuda_by_default(device: str | None) -> bool:
    if device not in (None, "auto"):
        return False
    import torch

    return torch.cuda.is_available()


def worker_argv(argv: Sequence[str]) -> list[str]:
    """The command line of another worker: ``argv`` without its ``--jobs`` / ``--quiet`` /
    ``--no-tables`` options, then ``--jobs 1 --quiet --no-tables``."""
    out: list[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
            continue
        if arg == "--jobs":
            skip = True
            continue
        if arg.startswith("--jobs=") or arg in ("-q", "--quiet", "--no-tables"):
            continue
        out.append(arg)
    return [*out, "--jobs", "1", "--quiet", "--no-tables"]


def run_with_jobs(
    args: Any, run: Callable[[bool], MatrixReport], to_train: Callable[[], list[str]], device: str | None
) -> MatrixReport:
    """``run(quiet)`` (one :func:`~mmbalance.matrix_run.run_matrix` call) with ``args.jobs`` workers;
    ``to_train()`` lists the runs left to train (:func:`~mmbalance.matrix_run.runs_to_train`),
    ``device`` is the device asked for (``--device``, else the spec's).

    Raises:
        ConfigError: a bad ``--jobs`` value, or another worker that ended with a user error (its
            message).
    """
    setting = parse_jobs(str(args.jobs))
    pending = set(to_train()) if args.executor == "local" else set()
    jobs = resolve_jobs(setting, args.executor, device, len(pending))
    if jobs == 1:
        return run(args.quiet)
    import torch

    cap = max(1, usable_cores() // jobs)
    torch.set_num_threads(cap)
    env = {**os.environ, "OMP_NUM_THREADS": str(cap)}
    command = [sys.executable, "-m", "mmbalance.cli", *worker_argv(args.argv)]
    logs = [tempfile.TemporaryFile(mode="w+") for _ in range(jobs - 1)]
    workers = [
        subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=log, preexec_fn=_die_with_parent)
        for log in logs
    ]
    try:
        report = run(args.quiet)
        codes = [w.wait() for w in workers]
    except BaseException:
        for w in workers:
            w.terminate()
        for w in workers:
            w.wait()
        raise
    for code, log in zip(codes, logs, strict=True):
        log.seek(0)
        lines = [ln for ln in log.read().splitlines() if ln.startswith("mmbalance: error:")]
        if code == 2 and lines:
            message = lines[-1].removeprefix("mmbalance: error: ")
            raise ConfigError(f"another --jobs worker stopped: {message}")
    # the runs other workers claimed: counted from their rows; a dead worker's runs trained here
    return _settle(report, run(True), pending)


def _die_with_parent() -> None:
    """In a worker, before it starts: end it (SIGTERM) when this process dies, killed or not, so that
    no worker trains on after the command is gone (Linux; elsewhere workers finish their runs)."""
    try:
        import ctypes
        import signal

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _settle(first: MatrixReport, final: MatrixReport, pending: set[str]) -> MatrixReport:
    """``first`` with each run another worker claimed replaced by its outcome in ``final`` (a second
    pass after the workers exited); a run of ``pending`` (not done when the command started) counts
    as done by this command, whichever worker did it, not as done before it."""
    from mmbalance.matrix_run import CLAIMED

    outcome = {run.run_id: status for run, status, _ in final.outcomes}
    settled = []
    for run, status, skipped in first.outcomes:
        if status == CLAIMED:
            status = outcome.get(run.run_id, CLAIMED)
        if run.run_id in pending and status != CLAIMED:
            skipped = False
        settled.append((run, status, skipped))
    first.outcomes = settled
    return first
