"""The README's promises: the method example works as written and fits in 30 lines; the quick
start is exactly two commands and `.ci/run` runs the second one."""

from __future__ import annotations

import re
import runpy
from pathlib import Path

from mmbalance.methods import METHODS

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def _example() -> str:
    block = README.split("<!-- readme-example:start -->", 1)[1].split("<!-- readme-example:end -->", 1)[0]
    return block.split("```python", 1)[1].rsplit("```", 1)[0]


def test_register_example_runs_as_written(capsys, tmp_path):
    code = _example()
    assert len([line for line in code.splitlines() if line.strip()]) <= 30  # at most 30 lines of code
    script = tmp_path / "readme_example.py"
    script.write_text(code)
    try:
        runpy.run_path(str(script), run_name="readme_example")
        out = capsys.readouterr().out.split()
        acc, ratio = float(out[0]), float(out[1])
        assert 0.0 <= acc <= 1.0 and ratio > 0
    finally:
        METHODS.unregister("damp_first")


def test_quick_start_is_two_commands_and_ci_runs_the_second():
    quick = README.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    commands = [c.strip() for c in re.findall(r"```bash\n(.*?)```", quick, re.S)]
    commands = [next(line for line in c.splitlines() if not line.startswith("#")) for c in commands]
    assert len(commands) == 2
    assert "matrices/default.toml" in commands[0]
    ci = (ROOT / ".ci" / "run").read_text()
    assert commands[1] in ci.splitlines()


def test_method_table_lists_every_registered_method_with_its_tasks_and_card():
    section = README.split("## What is inside", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\| `(\w+)` \| ([a-z, ]+) \| ([0-9+-]+) \| (.+?) \| (.+?) \|$", section, re.M)
    listed = {name: (tasks, card) for name, tasks, _, _, card in rows}
    assert sorted(listed) == sorted(METHODS.names())
    for name, (tasks, card) in listed.items():
        cls = METHODS.get(name)
        assert tasks == ", ".join(t for t in ("cls", "reg", "seg") if t in cls.tasks), name
        if card != "baseline":
            assert card == f"[card](methods/{name}.md)" and (ROOT / "methods" / f"{name}.md").is_file(), name
