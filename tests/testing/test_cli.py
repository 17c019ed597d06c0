"""``python -m mmbalance.testing``: one line per check, exit 0 / 1 / 2; the README's example method,
installed as a plugin through an entry point, passes it in a fresh process without pytest; a
plugin that edits gradients outside its declared scope fails it, naming the check."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from mmbalance.methods import METHODS
from mmbalance.testing.__main__ import main

from ..test_readme import README, _example
from ..test_registry import _write_plugin

ROOT = Path(__file__).resolve().parents[2]


def test_one_line_per_check_and_exit_0(capsys):
    assert main(["joint", "--tasks", "synthetic_cls2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(" [")[0] for line in lines[:-1]] == [
        f"ok   joint synthetic_cls2 {check}" for check in (
            "finite_steps", "seeded_determinism", "grad_edit_scope", "state_round_trip",
            "weights_only_state", "stop_resume_finish",
        )
    ]
    assert lines[-1] == "joint: 6 of 6 checks passed on synthetic_cls2 (cpu)"


def test_bad_arguments_exit_2_with_one_line(capsys):
    assert main(["ogm_gee", "joint"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err == (
        "python -m mmbalance.testing: error: unknown method 'ogm_gee'; did you mean 'ogm_ge'?\n"
    )
    assert main(["mla", "--tasks", "synthetic_reg3"]) == 2
    assert "method 'mla' does not declare 'synthetic_reg3'" in capsys.readouterr().err
    assert main(["joint", "--device", "gpu0"]) == 2
    assert "device must be a torch device such as 'cpu' or 'cuda', got 'gpu0'" in capsys.readouterr().err
    assert main(["joint", "--threads", "0"]) == 2
    assert "--threads must be an integer >= 1, got 0" in capsys.readouterr().err


def test_a_plugin_that_fails_to_import_fails_with_exit_1(tmp_path, monkeypatch, capsys):
    _write_plugin(tmp_path, "kit_bad", "kit_bad_mod", "raise ImportError('boom')\n", "kit_bad")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(METHODS, "_plugins_loaded", False)
    try:
        assert main(["kit_bad", "joint", "--tasks", "synthetic_cls2"]) == 1
    finally:
        METHODS.unregister("kit_bad")
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "FAIL kit_bad: the plugin failed to import: ImportError('boom')"
    assert lines[-1] == "joint: 6 of 6 checks passed on synthetic_cls2 (cpu)"


def _run_kit(tmp_path, *args):
    """``python -m mmbalance.testing ARGS`` in a fresh process that sees this tree and the plugins
    in ``tmp_path``, where ``import pytest`` fails."""
    (tmp_path / "pytest.py").write_text("raise ImportError('mmbalance.testing must not need pytest')\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(ROOT)])}
    return subprocess.run([sys.executable, "-m", "mmbalance.testing", *args], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)


def test_the_readme_example_installed_as_a_plugin_passes(tmp_path):
    assert "python -m mmbalance.testing damp_first" in README.split("## Register a new method", 1)[1]
    code = _example()
    assert code.count("\nrow = run(") == 1
    method = code.split("\nrow = run(", 1)[0]  # the method, without the lines that train it
    assert '@register_method("damp_first")' in method
    _write_plugin(tmp_path, "damp_first_plugin", "damp_first_plugin", method, "damp_first")
    done = _run_kit(tmp_path, "damp_first")
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    assert len(lines) == 4 * 6 + 1
    assert all(line.startswith("ok   damp_first synthetic_") for line in lines[:-1]), done.stdout
    assert lines[-1] == (
        "damp_first: 24 of 24 checks passed on synthetic_cls2, synthetic_cls3, synthetic_reg3, "
        "synthetic_seg4 (cpu)"
    )


def test_a_plugin_editing_gradients_outside_its_scope_fails_naming_the_check(tmp_path):
    body = """
        import torch

        from mmbalance import Balancer, register_method


        @register_method("head_outside_scope")
        class HeadOutsideScope(Balancer):
            paper = "deliberately broken: declares the encoders, edits the head"
            grad_edit_scope = frozenset({"encoders"})

            def on_after_backward(self, ctx):
                torch._foreach_mul_([p.grad for p in ctx.model.head.parameters() if p.grad is not None], 0.5)
    """
    _write_plugin(tmp_path, "head_outside_scope", "head_outside_scope", body, "head_outside_scope")
    done = _run_kit(tmp_path, "head_outside_scope", "--tasks", "synthetic_cls2")
    assert done.returncode == 1, done.stdout + done.stderr
    failed = [line for line in done.stdout.splitlines() if line.startswith("FAIL")]
    assert len(failed) == 1, done.stdout
    assert failed[0].startswith("FAIL head_outside_scope synthetic_cls2 grad_edit_scope [")
    assert ": head_outside_scope on synthetic_cls2, check grad_edit_scope: edited gradients outside " \
           "grad_edit_scope ['encoders']: ['head." in failed[0]
    assert done.stdout.splitlines()[-1].startswith("head_outside_scope: 5 of 6 checks passed")
