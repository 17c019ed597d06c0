"""The whole repository passes the project's ruff rules (``[tool.ruff]`` in pyproject.toml: E, F, I,
B, UP, lines of at most 110 characters), as ``tox -e lint`` checks: the package, tests, benchmarks,
dataset preparation scripts and the analysis scripts under ``results/``."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _ruff(*args: str) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "ruff", "check", "--no-cache", "--output-format", "concise", *args]
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def ruff() -> None:
    if importlib.util.find_spec("ruff") is None:
        pytest.skip("ruff is not installed (it is in the 'test' extra)")
    if not (ROOT / "pyproject.toml").is_file():
        pytest.skip("not a source checkout: no pyproject.toml with the ruff configuration")


def test_repository_has_no_ruff_findings(ruff):
    result = _ruff(".")
    assert result.returncode == 0, f"ruff check . found problems:\n{result.stdout}{result.stderr}"


def test_the_configured_rules_flag_a_long_line(ruff, tmp_path):
    """The rules in pyproject.toml include E501 at 110 characters (a line of 111 is a finding), so a
    clean run above means the tree respects the line length."""
    sample = tmp_path / "sample.py"
    sample.write_text('NAME = "' + "x" * 102 + '"\n')  # 8 + 102 + 1 = 111 characters
    assert len(sample.read_text().rstrip("\n")) == 111
    result = _ruff("--config", str(ROOT / "pyproject.toml"), str(sample))
    assert result.returncode == 1 and "E501" in result.stdout, result.stdout + result.stderr
