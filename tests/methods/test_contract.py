"""Registry-wide contract tests: the checks of :mod:`mmbalance.testing`, parametrised over the
METHODS registry itself.

Every registered method, on every synthetic task it declares: three finite training steps; a
resume from a checkpoint (model, main optimizer and ``Balancer.training_state``) that continues
exactly like the uninterrupted run; a ``fit`` stopped inside an epoch, resumed from its epoch
checkpoint (:mod:`mmbalance.checkpoint`) and finished that ends exactly like the same ``fit`` run
straight through; a training state that ``torch.load(weights_only=True)`` reads; seeded
determinism; and gradient edits in ``on_after_backward`` confined to the model parts it declares
in ``grad_edit_scope``. Every file in ``mmbalance/methods/`` must be imported by
``BUILTIN_METHODS`` and register a method.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import mmbalance.methods as methods_pkg
from mmbalance.methods import BUILTIN_METHODS, METHODS
from mmbalance.testing import (
    check_finite_steps,
    check_grad_edit_scope,
    check_seeded_determinism,
    check_state_round_trip,
    check_stop_resume_finish,
    check_weights_only_state,
    declared_tasks,
    subject,
)

CASES = [(method, task) for method in METHODS.names() for task in declared_tasks(subject(method))]


def test_every_method_file_is_builtin_and_registers():
    folder = Path(methods_pkg.__file__).parent
    modules = {p.stem for p in folder.glob("*.py") if not p.stem.startswith("_")}
    assert modules == set(BUILTIN_METHODS), "mmbalance/methods/*.py and BUILTIN_METHODS differ"
    for stem in modules:
        tree = ast.parse((folder / f"{stem}.py").read_text())
        decorators = [
            d for node in ast.walk(tree) if isinstance(node, ast.ClassDef) for d in node.decorator_list
            if isinstance(d, ast.Call) and getattr(d.func, "id", "") == "register_method"
        ]
        assert decorators, f"mmbalance/methods/{stem}.py registers no method"


def test_every_method_has_a_card_and_a_paper():
    root = Path(methods_pkg.__file__).parents[2] / "methods"
    for name in METHODS.names():
        if name in ("joint", "unimodal"):
            continue
        assert (root / f"{name}.md").is_file(), f"methods/{name}.md (method card) is missing"
        assert METHODS.get(name).paper, f"method {name!r} has no paper citation"


@pytest.mark.parametrize("method, ds_name", CASES)
def test_three_finite_steps(method, ds_name):
    assert check_finite_steps(method, ds_name) is None


@pytest.mark.parametrize("method, ds_name", CASES)
def test_resume_from_training_state_continues_identically(method, ds_name):
    assert check_state_round_trip(method, ds_name) is None


@pytest.mark.parametrize("method, ds_name", CASES)
def test_stop_resume_finish_equals_straight_through(method, ds_name):
    assert check_stop_resume_finish(method, ds_name) is None


@pytest.mark.parametrize("method, ds_name", CASES)
def test_training_state_loads_with_weights_only(method, ds_name):
    assert check_weights_only_state(method, ds_name) is None


@pytest.mark.parametrize("method, ds_name", CASES)
def test_seeded_determinism(method, ds_name):
    assert check_seeded_determinism(method, ds_name) is None


@pytest.mark.parametrize("method, ds_name", CASES)
def test_gradient_edits_stay_in_declared_scope(method, ds_name):
    assert check_grad_edit_scope(method, ds_name) is None
