"""Fault injection: a folder of real rows from a tiny matrix, and the checks every fault shares.

Every fault runs the CLI in process (``mmbalance.cli.main``) against a copy of that folder and
asserts: exit status 2, exactly one ``mmbalance: error: ...`` line on stderr naming the argument or
path, no traceback, and the folder's files byte-identical afterwards.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from mmbalance.cli import main

# joint, unimodal[strong], unimodal[weak] on synthetic_cls2, seed 0: three tiny runs (about 1 s each)
TINY_SPEC = """\
methods = ["joint", "unimodal"]
datasets = ["synthetic_cls2"]
seeds = [0]
device = "cpu"

[overrides]
epochs = 1
max_train_batches = 2
cost_steps = 0
eval_modality_scores = false
"dataset.n_train" = 64
"dataset.n_val" = 32
"dataset.n_test" = 32
"""
TINY_SET = [
    "--set",
    "epochs=1",
    "--set",
    "max_train_batches=2",
    "--set",
    "cost_steps=0",
    "--set",
    "eval_modality_scores=false",
    "--set",
    "dataset.n_train=64",
    "--set",
    "dataset.n_val=32",
    "--set",
    "dataset.n_test=32",
    "--device",
    "cpu",
    "-q",
]


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` (relative path -> bytes)."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(autouse=True)
def one_thread():
    """``--threads`` sets torch's global thread count: put it back after each test."""
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def made_rows(tmp_path_factory) -> Path:
    """A results folder written by a real tiny matrix (3 rows and the plan)."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("made")
    spec = root / "tiny.toml"
    spec.write_text(TINY_SPEC)
    assert main(["--threads", "1", "matrix", str(spec), "--out", str(root / "out"), "-q", "--no-tables"]) == 0
    assert len(list((root / "out").glob("*.json"))) == 3
    return root / "out"


@pytest.fixture
def out(made_rows, tmp_path) -> Path:
    """A private copy of the made rows."""
    dst = tmp_path / "out"
    shutil.copytree(made_rows, dst)
    return dst


@pytest.fixture
def spec(tmp_path) -> Callable[..., Path]:
    """``spec(text=TINY_SPEC, name="m.toml")`` writes a matrix spec and returns its path."""

    def write(text: str = TINY_SPEC, name: str = "m.toml", raw: bytes | None = None) -> Path:
        path = tmp_path / name
        if raw is not None:
            path.write_bytes(raw)
        else:
            path.write_text(text)
        return path

    return write


def one_line_error(capsys, argv: list[str]) -> str:
    """Run ``argv``; assert exit 2, one ``mmbalance: error:`` line on stderr, no traceback; return it."""
    code = main(argv)
    captured = capsys.readouterr()
    assert code == 2, (code, captured.err)
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mmbalance: error: "), captured.err
    assert "Traceback" not in captured.err
    return lines[0]
