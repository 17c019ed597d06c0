"""A disk that fills up during a matrix, and a read-only results folder."""

from __future__ import annotations

import errno
import os
import shutil
import stat
from pathlib import Path

import pytest

from mmbalance.cli import main
from mmbalance.results import load_rows
from tests.faults.conftest import TINY_SET, TINY_SPEC, one_line_error, snapshot

pytestmark = pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc/self/fd (Linux)")


def _fd_path(fd: int) -> str:
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return ""


def test_full_disk_ends_the_matrix_with_one_line_keeping_what_was_written(
    tmp_path, spec, monkeypatch, capsys
):
    """The second row's write fails with ENOSPC: one error line naming the file and the errno, the
    first row stays, no temporary file is left, and the remaining run is not attempted."""
    out = tmp_path / "out"
    real_write = os.write
    rows_written: list[str] = []

    def disk_fills_up(fd, data):
        path = _fd_path(fd)
        if path.endswith(".tmp") and "/_matrix/" not in path and ".json." in path:  # a row being written
            if rows_written and path not in rows_written:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            rows_written.append(path)
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", disk_fills_up)
    line = one_line_error(capsys, ["--threads", "1", "matrix", str(spec(TINY_SPEC)), "--out", str(out), "-q"])
    monkeypatch.undo()
    assert (
        "cannot write" in line and str(out) in line and "No space left on device (ENOSPC, errno 28)" in line
    )
    assert len(load_rows(out).rows) == 1 and load_rows(out).problems == ()  # the first run's row stays
    assert not [p for p in out.rglob("*") if p.name.endswith(".tmp")]

    assert (
        main(["--threads", "1", "matrix", str(spec(TINY_SPEC)), "--out", str(out), "-q", "--no-tables"]) == 0
    )
    assert len(load_rows(out).rows) == 3  # with space again, the matrix resumes and completes


@pytest.fixture
def read_only(monkeypatch):
    """``read_only(folder)``: make writes into ``folder`` fail with EROFS / EACCES. A chmod where it
    binds (not as root); else ``os.open`` of a file created there raises EROFS, as a read-only mount."""
    folders: list[Path] = []

    def make(folder: Path) -> None:
        folders.append(folder)
        folder.chmod(stat.S_IRUSR | stat.S_IXUSR)
        probe = folder / ".can-i-write"
        try:
            probe.write_text("x")
        except OSError:
            return  # the chmod binds
        probe.unlink()
        real_open = os.open

        def open_read_only(path, flags, *args, **kwargs):
            if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT) and Path(path).resolve().is_relative_to(
                folder.resolve()
            ):
                raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
            return real_open(path, flags, *args, **kwargs)

        monkeypatch.setattr(os, "open", open_read_only)

    yield make
    for folder in folders:
        folder.chmod(stat.S_IRWXU)


def test_read_only_folder_fails_before_training(out, read_only, monkeypatch, capsys):
    before = snapshot(out)
    read_only(out)
    trained = []
    monkeypatch.setattr("mmbalance.runner.fit", lambda *a, **k: trained.append(1))
    line = one_line_error(
        capsys, ["run", "joint", "synthetic_cls2", *TINY_SET, "--seed", "7", "--out", str(out)]
    )
    assert f"--out: cannot write into folder '{out}'" in line and ("EROFS" in line or "EACCES" in line)
    spec_path = out.parent / "more.toml"
    spec_path.write_text(TINY_SPEC.replace("seeds = [0]", "seeds = [0, 1]"))
    line = one_line_error(capsys, ["matrix", str(spec_path), "--out", str(out), "-q", "--no-tables"])
    assert f"--out: cannot write into folder '{out}'" in line
    assert trained == [] and snapshot(out) == before


def test_read_only_folder_of_a_finished_matrix_still_prints_its_tables(
    made_rows, tmp_path, read_only, spec, capsys
):
    out = tmp_path / "done"
    shutil.copytree(made_rows, out)
    before = snapshot(out)
    read_only(out)
    assert main(["--threads", "1", "matrix", str(spec(TINY_SPEC)), "--out", str(out)]) == 0
    captured = capsys.readouterr()
    assert "3 already done" in captured.err
    assert "| joint " in captured.out and snapshot(out) == before
