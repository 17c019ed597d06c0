"""The Slurm examples and the README's cluster section cannot rot: the scripts are valid bash, and every
``mmbalance`` command in them parses with the CLI's own parser (shell variables given sample values)."""

from __future__ import annotations

import re
import shlex
import subprocess
from pathlib import Path

import pytest

from mmbalance.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = sorted((ROOT / "examples" / "slurm").glob("*.sbatch"))
SAMPLE = {"SPEC": "matrices/paper.toml", "OUT": "runs/paper", "DATA_ROOT": "/data", "K": "2", "N": "8",
          "GPUS_PER_RUN": "1", "CPUS_PER_RUN": "8", "SLURM_CPUS_PER_TASK": "8", "address": "10.0.0.1:6379"}


def _commands(text: str) -> list[str]:
    """``mmbalance ...`` commands of ``text``, continuation lines joined, comments dropped."""
    joined = re.sub(r"\\\n\s*", " ", text)
    out = []
    for line in joined.splitlines():
        line = line.split(" #", 1)[0].strip().split(" || ", 1)[0].split(" > ", 1)[0]
        if line.startswith("mmbalance "):
            out.append(re.sub(r'"?\$\{?(\w+)\}?"?', lambda m: SAMPLE[m.group(1)], line))
    return out


def test_there_are_both_scripts():
    assert [p.name for p in SCRIPTS] == ["array.sbatch", "ray_matrix.sbatch"]


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_script_is_valid_bash_with_parsable_mmbalance_commands(script):
    subprocess.run(["bash", "-n", str(script)], check=True)
    text = script.read_text()
    assert text.startswith("#!/bin/bash\n") and "#SBATCH --job-name=" in text
    commands = _commands(text)
    assert any(" matrix " in c for c in commands)
    for command in commands:
        build_parser().parse_args(shlex.split(command)[1:])


def test_the_readme_section_shows_both_scripts_and_the_local_form():
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Run the matrix on a cluster", 1)[1].split("\n## ", 1)[0]
    for script in SCRIPTS:
        assert f"sbatch examples/slurm/{script.name}" in section
    commands = _commands(section)
    assert any("--executor ray" in c and "--address" not in c for c in commands)  # the one-line local form
    for command in commands:
        build_parser().parse_args(shlex.split(command)[1:])
