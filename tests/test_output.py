"""Safe writing: atomic JSON, errors that name path and errno, probes, stale temporary files."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import mmbalance.output as output
from mmbalance.errors import OutputError
from mmbalance.output import prepare_output, remove_stale_temps, write_json_atomic


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_temp_file_is_hidden_and_named_by_pid_and_host(tmp_path, monkeypatch):
    seen = []
    real_replace = os.replace

    def spy(src, dst):
        seen.append(Path(src).name)
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", spy)
    write_json_atomic(tmp_path / "abc.json", {"v": 1})
    assert seen == [f".abc.json.{os.getpid()}@{output._host()}.tmp"]
    assert json.loads((tmp_path / "abc.json").read_text()) == {"v": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["abc.json"]


def test_write_failure_names_path_and_errno_and_leaves_nothing(tmp_path, monkeypatch):
    target = tmp_path / "abc.json"
    write_json_atomic(target, {"v": 1})

    def full(fd, data):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def unlink_fails(self, missing_ok=False):
        raise PermissionError(errno.EACCES, "cleanup refused")

    monkeypatch.setattr(os, "write", full)
    monkeypatch.setattr(Path, "unlink", unlink_fails)  # the cleanup fails too: it must not hide ENOSPC
    with pytest.raises(OutputError) as err:
        write_json_atomic(target, {"v": 2})
    message = str(err.value)
    assert str(target) in message and "No space left on device (ENOSPC, errno 28)" in message
    assert isinstance(err.value.__cause__, OSError) and err.value.__cause__.errno == errno.ENOSPC
    monkeypatch.undo()
    assert json.loads(target.read_text()) == {"v": 1}  # the previous file is intact


def test_write_failure_removes_the_temp_file(tmp_path, monkeypatch):
    def full(fd, data):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "write", full)
    with pytest.raises(OutputError, match="ENOSPC"):
        write_json_atomic(tmp_path / "abc.json", {"v": 2})
    monkeypatch.undo()
    assert list(tmp_path.iterdir()) == []


def test_prepare_output_creates_probes_and_refuses(tmp_path, monkeypatch):
    folder = prepare_output(tmp_path / "a" / "b")
    assert folder.is_dir() and list(folder.iterdir()) == []  # the probe file is gone
    a_file = tmp_path / "file"
    a_file.write_text("x")
    with pytest.raises(OutputError, match=rf"--out '{a_file}': '{a_file}' is a file, expected a folder"):
        prepare_output(a_file)
    with pytest.raises(OutputError, match=rf"'{a_file}' is a file, expected a folder"):
        prepare_output(a_file / "below", option="fixtures DIR")
    with pytest.raises(OutputError, match=r"--out: cannot create folder '/proc/mmbalance-x'"):
        prepare_output("/proc/mmbalance-x")

    real_open = os.open

    def read_only(path, flags, *args):
        if flags & os.O_CREAT and str(path).startswith(str(folder)):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
        return real_open(path, flags, *args)

    monkeypatch.setattr(os, "open", read_only)
    with pytest.raises(OutputError, match=r"--out: cannot write into folder .*Read-only file system \(EROFS"):
        prepare_output(folder)


def test_remove_stale_temps_only_of_dead_writers_on_this_host(tmp_path):
    dead, host = _dead_pid(), output._host()
    stale = [f".abc.json.{dead}@{host}.tmp", f".abc.json.{dead}.tmp"]  # the second: the older name form
    kept = [
        f".abc.json.{os.getpid()}@{host}.tmp",  # a live writer (this process)
        f".abc.json.{dead}@another-host.tmp",  # a writer on another machine sharing the folder
        "abc.json",
        ".hidden-note",
    ]
    for name in stale + kept:
        (tmp_path / name).write_text("{")
    removed = remove_stale_temps(tmp_path)
    assert sorted(p.name for p in removed) == sorted(stale)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(kept)
    assert remove_stale_temps(tmp_path / "missing") == []
