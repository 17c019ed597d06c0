"""Claims: which process trains which run of a results folder, so that no run is trained twice.

Before a run trains, the process that will train it (a ``mmbalance matrix`` process, or the driver
of a Ray matrix, for the runs it submits) claims it by creating ``<out>/_claims/<run_id>`` with
``O_CREAT | O_EXCL``: of several processes, exactly one creates the file (also on NFS v3 and later,
whose exclusive create is atomic). The file is JSON: run id, host, pid, PID namespace, a random
token, the start time and a heartbeat (Unix time) that a thread of the owner rewrites every
``timeout / 4`` seconds (atomically, after checking that the file still holds its token). Other
processes skip a claimed run. A claim is *stale*, and the next process that reaches the run takes
it over, when

* its owner ran on this host, in this PID namespace, and is gone (a SIGKILLed local worker or
  driver): taken over at once; or
* its heartbeat is older than ``timeout`` (default :data:`DEFAULT_CLAIM_TIMEOUT_S`, 10 minutes: the
  owner's node died, or the owner hangs). An unreadable claim (its owner died between creating and
  writing it) counts from the file's modification time.

A takeover is serialised by a second exclusive file, ``<run_id>.takeover``, held while the taker
re-reads the claim and replaces it with its own; the previous owner (host, pid, start, heartbeat)
and the reason are recorded in the run's row (``takeover``). A claim is removed when its run's row
is written, or when the owner gives the run back (Ctrl-C). Heartbeats compare wall-clock times
across hosts: hosts sharing a folder need clocks that agree to well within the timeout (NTP), and
the timeout must exceed the longest pause of a live owner (a suspended job), or the run is trained
twice (the owner notices at its next heartbeat and says so).

This is what makes ``--shard``, two ``mmbalance matrix`` processes on one folder, Slurm array jobs,
a restart on another node and N local worker processes sharing one matrix (``--jobs``) safe: each
process walks the plan in order and trains the runs it manages to claim.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import secrets
import threading
import time
import warnings
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from mmbalance.errors import ConfigError, OutputError
from mmbalance.output import output_error, process_alive, remove_stale_temps, write_json_atomic

__all__ = ["CLAIMS_DIR", "DEFAULT_CLAIM_TIMEOUT_S", "ClaimInfo", "Claim", "ClaimBook", "pid_namespace"]

CLAIMS_DIR = "_claims"  # sub-folder of a results folder holding the claims of runs being trained
DEFAULT_CLAIM_TIMEOUT_S = 600.0  # a heartbeat older than this makes a claim stale


def pid_namespace() -> str:
    """This process's PID namespace (``pid:[4026531836]`` on Linux; ``""`` where it cannot be read):
    two containers on one host share a host name but not their process ids."""
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return ""


@dataclass(frozen=True)
class ClaimInfo:
    """The content of a claim file."""

    run_id: str
    host: str
    pid: int
    namespace: str
    token: str
    started: float
    heartbeat: float

    @classmethod
    def from_json(cls, text: str) -> ClaimInfo:
        data = json.loads(text)
        return cls(
            run_id=str(data["run_id"]), host=str(data["host"]), pid=int(data["pid"]),
            namespace=str(data.get("namespace", "")), token=str(data["token"]),
            started=float(data["started"]), heartbeat=float(data["heartbeat"]),
        )

    @classmethod
    def unknown(cls, run_id: str, since: float) -> ClaimInfo:
        """A holder that cannot be read (its claim is being written, or keeps changing)."""
        return cls(run_id, "", -1, "", "", since, since)

    def describe(self) -> str:
        """``host:pid (since HH:MM:SS)``: who holds the claim."""
        since = time.strftime("%H:%M:%S", time.localtime(self.started))
        return f"{self.host}:{self.pid} (since {since})" if self.host else f"another process (since {since})"


@dataclass
class Claim:
    """A claim this process holds. ``previous`` and ``reason`` are set when it was taken over."""

    info: ClaimInfo
    path: Path
    previous: ClaimInfo | None = None
    reason: str | None = None
    lost_to: ClaimInfo | None = field(default=None, repr=False)  # set when another process took it

    @property
    def run_id(self) -> str:
        return self.info.run_id

    def takeover_record(self) -> dict[str, Any] | None:
        """The row's ``takeover`` field: the previous owner and why its claim was stale."""
        if self.previous is None:
            return None
        prev = self.previous
        return {
            "host": prev.host, "pid": prev.pid, "started": prev.started, "heartbeat": prev.heartbeat,
            "reason": self.reason,
        }


class ClaimBook:
    """Claims of one process on one results folder, with the heartbeat thread that keeps them fresh.

    Args:
        out: the results folder (claims go to ``out/_claims/``).
        timeout: seconds after which a claim without a heartbeat is stale (> 0).
        heartbeat_every: seconds between heartbeats (default ``timeout / 4``).

    Use as a context manager, or call :meth:`close`: it stops the thread and releases every claim
    still held (runs given back unfinished).
    """

    def __init__(self, out: str | os.PathLike[str], timeout: float = DEFAULT_CLAIM_TIMEOUT_S,
                 heartbeat_every: float | None = None) -> None:
        if not (isinstance(timeout, int | float) and 0 < timeout < float("inf")):
            raise ConfigError(f"--claim-timeout must be a number of seconds > 0, got {timeout!r}")
        self.folder = Path(out) / CLAIMS_DIR
        self.timeout = float(timeout)
        self.heartbeat_every = heartbeat_every if heartbeat_every is not None else self.timeout / 4
        self.host = platform.node()
        self.namespace = pid_namespace()
        self._held: dict[str, Claim] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- acquiring -------------------------------------------------------------------------------
    def acquire(self, run_id: str) -> Claim | ClaimInfo:
        """Claim ``run_id``: our :class:`Claim`, or the :class:`ClaimInfo` of the live owner.

        Raises:
            OutputError: the claims folder or file cannot be written (naming the path and errno).
        """
        path = self.folder / run_id
        if not self.folder.is_dir():
            try:
                self.folder.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise output_error(self.folder, exc, "cannot create folder") from exc
            remove_stale_temps(self.folder)
        for _ in range(3):  # a claim released, being written or taken over meanwhile: look again
            mine = self._new_info(run_id)
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                pass
            except OSError as exc:
                raise output_error(path, exc, "cannot create claim") from exc
            else:
                try:
                    os.write(fd, self._payload(mine))
                    os.fsync(fd)
                finally:
                    os.close(fd)
                return self._hold(Claim(mine, path))
            current = self._read(path)
            if current is _GONE:
                continue
            reason = self._stale_reason(path, current)
            if reason is None:
                if isinstance(current, ClaimInfo):
                    return current
                time.sleep(0.05)  # being written by its creator
                continue
            taken = self._take_over(path, current, mine, reason)
            if taken is not None:
                return self._hold(taken)
        holder = self._read(path)
        return holder if isinstance(holder, ClaimInfo) else ClaimInfo.unknown(run_id, time.time())

    def discard_stale(self, run_ids: Iterable[str]) -> list[str]:
        """Remove the stale claims of ``run_ids`` (runs whose rows are written: an owner killed between
        writing the row and releasing the claim); return their run ids. Claims of live owners stay,
        and a folder that cannot be written is left as it is."""
        if not self.folder.is_dir():
            return []
        removed = []
        for run_id in sorted(set(run_ids) & {p.name for p in self.folder.iterdir()}):
            path = self.folder / run_id
            if self._stale_reason(path, self._read(path)) is not None:
                with contextlib.suppress(OSError):
                    path.unlink()
                    removed.append(run_id)
        return removed

    def _new_info(self, run_id: str) -> ClaimInfo:
        now = time.time()
        return ClaimInfo(run_id, self.host, os.getpid(), self.namespace, secrets.token_hex(8), now, now)

    @staticmethod
    def _payload(info: ClaimInfo) -> bytes:
        return (json.dumps(asdict(info)) + "\n").encode()

    def _read(self, path: Path) -> ClaimInfo | None | object:
        """The claim's content; None when unreadable (being written); :data:`_GONE` when missing."""
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return _GONE
        except OSError:
            return None
        try:
            return ClaimInfo.from_json(text)
        except (ValueError, KeyError, TypeError):
            return None

    def _stale_reason(self, path: Path, info: ClaimInfo | None | object) -> str | None:
        """Why a claim is stale, or None while its owner is presumed alive."""
        if isinstance(info, ClaimInfo):
            local = info.host == self.host and info.namespace == self.namespace and bool(self.namespace)
            if local and info.pid != os.getpid() and not process_alive(info.pid):
                return f"its process {info.pid} on {info.host} is gone"
            age = time.time() - info.heartbeat
            what = "heartbeat"
        else:
            try:
                age = time.time() - path.stat().st_mtime
            except OSError:
                return None
            what = "unreadable claim, last written"
        if age > self.timeout:
            return f"{what} {age:.0f} s ago, more than the claim timeout of {self.timeout:g} s"
        return None

    def _take_over(self, path: Path, seen: ClaimInfo | None | object, mine: ClaimInfo,
                   reason: str) -> Claim | None:
        lock = path.with_name(path.name + ".takeover")
        try:
            fd = os.open(lock, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            with contextlib.suppress(OSError):  # left by a taker that died: remove it for the next look
                if time.time() - lock.stat().st_mtime > self.timeout:
                    lock.unlink()
            return None
        except OSError as exc:
            raise output_error(lock, exc, "cannot create claim takeover lock") from exc
        try:
            current = self._read(path)
            if current != seen:  # released, refreshed or taken by another process meanwhile
                return None
            write_json_atomic(path, asdict(mine))
        finally:
            os.close(fd)
            with contextlib.suppress(OSError):
                lock.unlink()
        previous = seen if isinstance(seen, ClaimInfo) else None
        return Claim(mine, path, previous=previous, reason=reason)

    # -- holding ---------------------------------------------------------------------------------
    def _hold(self, claim: Claim) -> Claim:
        with self._lock:
            self._held[claim.run_id] = claim
            if self._thread is None:
                self._thread = threading.Thread(target=self._beat, name="mmbalance-claims", daemon=True)
                self._thread.start()
        return claim

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_every):
            with self._lock:
                claims = list(self._held.values())
            for claim in claims:
                self.refresh(claim)

    def refresh(self, claim: Claim) -> None:
        """Rewrite ``claim``'s heartbeat, unless another process has taken it (then warn once)."""
        with self._lock:  # never rewrite a claim that release() is removing
            if self._held.get(claim.run_id) is claim and claim.lost_to is None:
                self._refresh(claim)

    def _refresh(self, claim: Claim) -> None:
        current = self._read(claim.path)
        if not isinstance(current, ClaimInfo) or current.token != claim.info.token:
            claim.lost_to = current if isinstance(current, ClaimInfo) else claim.info
            holder = current.describe() if isinstance(current, ClaimInfo) else "nobody (the file is gone)"
            warnings.warn(
                f"the claim on run {claim.run_id} now belongs to {holder}: this process was paused for "
                f"longer than the claim timeout ({self.timeout:g} s); the run may be trained twice",
                RuntimeWarning, stacklevel=2,
            )
            return
        claim.info = ClaimInfo(**{**asdict(claim.info), "heartbeat": time.time()})
        with contextlib.suppress(OutputError):  # a missed heartbeat is retried at the next one
            write_json_atomic(claim.path, asdict(claim.info))

    def release(self, claim: Claim) -> None:
        """Remove ``claim``'s file (if it still holds our token) and stop refreshing it."""
        with self._lock:
            self._held.pop(claim.run_id, None)
            current = self._read(claim.path)
            if isinstance(current, ClaimInfo) and current.token == claim.info.token:
                with contextlib.suppress(FileNotFoundError):
                    claim.path.unlink()

    def close(self) -> None:
        """Stop the heartbeat thread and release every claim still held."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        with self._lock:
            held = list(self._held.values())
        for claim in held:
            with contextlib.suppress(OSError):
                self.release(claim)

    def __enter__(self) -> ClaimBook:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


_GONE = object()  # a claim file that does not exist (released)
