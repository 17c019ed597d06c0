"""Writing results safely: atomic JSON files, an output folder checked before training, no stray files.

* :func:`write_json_atomic` writes a temporary file in the same folder (``.<name>.<pid>@<host>.tmp``),
  ``fsync``\\ s it and ``os.replace``\\ s it onto the target, so a reader or a killed writer never sees
  half a file. If writing fails (full disk, read-only folder, no permission) the temporary file is
  removed, the previous file stays as it was, and :class:`OutputError` names the path and the
  errno; a failure of that cleanup never hides the original error.
* :func:`prepare_output` creates the output folder and writes (then removes) a probe file, so that
  ``run`` and ``matrix`` find an unusable ``--out`` before any training, not after.
* :func:`remove_stale_temps` removes the temporary files of writers that were killed (their process
  is gone); a matrix calls it when it starts. Temporary files of live processes, or of processes on
  another host sharing the folder, are left alone.
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import re
import socket
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from mmbalance.errors import OutputError

__all__ = [
    "write_json_atomic", "prepare_output", "remove_stale_temps", "strict_json", "output_error", "temp_path",
    "process_alive",
]

_TEMP_RE = re.compile(r"^\..+\.(\d+)(?:@([A-Za-z0-9_-]*))?\.tmp$")


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9_-]", "_", socket.gethostname().split(".")[0])


def _temp_name(name: str) -> str:
    return f".{name}.{os.getpid()}@{_host()}.tmp"


def temp_path(path: str | os.PathLike[str]) -> Path:
    """The temporary file this process writes before replacing ``path`` (hidden, named by pid and host,
    so :func:`remove_stale_temps` can remove it once this process is gone)."""
    path = Path(path)
    return path.with_name(_temp_name(path.name))


def strict_json(value: Any) -> Any:
    """Replace non-finite floats by None, recursively (strict JSON has no NaN)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {str(k): strict_json(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [strict_json(v) for v in value]
    return value


def output_error(path: str | os.PathLike[str], exc: OSError, doing: str = "cannot write") -> OutputError:
    """One-line error naming the path, the reason and the errno (``ENOSPC``, ``EROFS``, ...)."""
    code = errno.errorcode.get(exc.errno, "") if exc.errno is not None else ""
    reason = exc.strerror or str(exc) or type(exc).__name__
    suffix = f" ({code}, errno {exc.errno})" if code else ""
    return OutputError(f"{doing} {str(path)!r}: {reason}{suffix}")


def _write_all(fd: int, payload: bytes) -> None:
    view = memoryview(payload)
    while view:
        view = view[os.write(fd, view) :]


def write_json_atomic(path: str | os.PathLike[str], data: Any) -> Path:
    """Write ``data`` as JSON to ``path`` atomically: temp file in the same folder, fsync, replace.

    A process killed at any point leaves either the previous file or the new one, never a mix; at
    worst a hidden temporary file remains, which readers ignore and :func:`remove_stale_temps` removes.

    Raises:
        OutputError: (an ``OSError``) the folder cannot be created or the file cannot be written,
            naming the path and the errno; no temporary file is left behind.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise output_error(path.parent, exc, "cannot create folder") from exc
    payload = (json.dumps(strict_json(data), indent=1, allow_nan=False) + "\n").encode("utf-8")
    tmp = path.with_name(_temp_name(path.name))
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
        try:
            _write_all(fd, payload)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException as exc:
        with contextlib.suppress(OSError):  # cleanup never hides the original error
            tmp.unlink(missing_ok=True)
        if isinstance(exc, OSError) and not isinstance(exc, OutputError):
            raise output_error(path, exc) from exc
        raise
    _fsync_folder(path.parent)
    return path


def _fsync_folder(folder: Path) -> None:
    """Make a rename durable; some file systems refuse fsync on a folder (the replace is still atomic)."""
    try:
        dir_fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dir_fd)
    except OSError:
        pass
    finally:
        os.close(dir_fd)


def prepare_output(folder: str | os.PathLike[str], *, option: str = "--out") -> Path:
    """Create ``folder`` if needed and check that files can be written there (a probe file).

    Raises:
        OutputError: naming ``option``, the path and the reason: a file is in the way, the folder
            cannot be created, or a probe file cannot be written (read-only, no permission, disk full).
    """
    folder = Path(folder)
    for parent in (folder, *folder.parents):
        if parent.exists() and not parent.is_dir():
            raise OutputError(f"{option} {str(folder)!r}: {str(parent)!r} is a file, expected a folder")
        if parent.exists():
            break
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise output_error(folder, exc, f"{option}: cannot create folder") from exc
    probe = folder / _temp_name("write-probe")
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
        try:
            _write_all(fd, b"mmbalance write probe\n")
            os.fsync(fd)
        finally:
            os.close(fd)
        probe.unlink()
    except OSError as exc:
        with contextlib.suppress(OSError):
            probe.unlink(missing_ok=True)
        raise output_error(folder, exc, f"{option}: cannot write into folder") from exc
    return folder


def process_alive(pid: int) -> bool:
    """Whether process ``pid`` runs on this host (True when it cannot be told: another user's)."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True  # exists (another user's), or cannot tell: keep its file
    return True


def remove_stale_temps(folder: str | os.PathLike[str]) -> list[Path]:
    """Remove temporary files left in ``folder`` by killed writers on this host; return them.

    A file is stale when its writer's process id (in its name) no longer runs on this host. Files
    that cannot be removed (a read-only folder) are left, silently: they are hidden and never read.
    """
    folder = Path(folder)
    removed: list[Path] = []
    if not folder.is_dir():
        return removed
    host = _host()
    for path in folder.iterdir():
        match = _TEMP_RE.match(path.name)
        if match is None or not path.is_file():
            continue
        pid, writer_host = int(match.group(1)), match.group(2)
        if writer_host not in (None, host) or process_alive(pid):
            continue
        with contextlib.suppress(OSError):
            path.unlink()
            removed.append(path)
    return removed
