"""Registry-wide contract tests, parametrised over the METHODS registry itself.

Every registered method, on every synthetic task it declares:
three finite training steps; a ``state_dict`` round trip; seeded determinism; and gradient edits in
``on_after_backward`` confined to the model parts it declares in ``grad_edit_scope``.
Every file in ``mmbalance/methods/`` must be imported by ``BUILTIN_METHODS`` and register a method.
"""

from __future__ import annotations

import ast
import functools
from pathlib import Path

import pytest
import torch

import mmbalance.methods as methods_pkg
from mmbalance.balancer import EpochContext
from mmbalance.datasets import DATASETS
from mmbalance.methods import BUILTIN_METHODS, METHODS
from mmbalance.models import MODELS
from mmbalance.registry import config_fields
from mmbalance.tasks import make_task
from mmbalance.train import TrainConfig, Trainer, batch_to_device, make_loader, seed_everything

CPU = torch.device("cpu")
SYNTHETIC = ("synthetic_cls2", "synthetic_cls3", "synthetic_reg3", "synthetic_seg4")


def _cases():
    cases = []
    for method in METHODS.names():
        cls = METHODS.get(method)
        for ds in SYNTHETIC:
            if ds not in DATASETS:
                continue
            dcls = DATASETS.get(ds)
            if cls.supports(task=dcls.task, modalities=len(dcls.modality_names)):
                cases.append((method, ds))
    return cases


@functools.cache
def _data(ds_name):
    ds = DATASETS.build(ds_name)
    spec = ds.spec
    return ds, spec, make_task(spec.task, spec.num_outputs, **dict(spec.task_options))


# Extra-stage lengths cut to two batches so that multi-stage methods (G-Blending estimation, UMT
# teachers, ReconBoost stages) run their real code paths in seconds.
FAST_STAGES = {"estimate_batches": 2, "teacher_batches": 2, "boost_batches": 2}


def _method_overrides(method, spec):
    fields = config_fields(METHODS.get(method).Config)
    over = {k: v for k, v in FAST_STAGES.items() if k in fields}
    if "modality" in fields:
        over["modality"] = spec.modality_names[-1]
    return over


def _trainer(method, ds_name, seed=0):
    ds, spec, task = _data(ds_name)
    cfg = TrainConfig(batch_size=16, seed=seed, epochs=2, eval_modality_scores=False, cost_steps=0)
    seed_everything(seed)
    model = MODELS.build(spec.default_model)(spec)
    balancer = METHODS.build(method, None, **_method_overrides(method, spec))
    train_loader = make_loader(ds.split("train"), cfg, CPU, train=True)
    val_loader = make_loader(ds.split("val"), cfg, CPU, train=False)
    trainer = Trainer(model, balancer, task, cfg, CPU, steps_per_epoch=len(train_loader))
    ctx = EpochContext(
        model=model, epoch=0, num_epochs=cfg.epochs, train_loader=train_loader, val_loader=val_loader,
        task=task, device=CPU, optimizer=trainer.optimizer, to_device=lambda b: batch_to_device(b, CPU),
    )
    balancer.on_train_epoch_start(ctx)
    batches = []
    for i, b in enumerate(train_loader):
        batches.append(batch_to_device(b, CPU))
        if i == 2:
            break
    return trainer, batches


def _steps(trainer, batches):
    for i, b in enumerate(batches):
        trainer.train_step(b, 0, i)
    trainer.flush_terms()  # raises NonFiniteLossError on a NaN/inf term


CASES = _cases()


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
    trainer, batches = _trainer(method, ds_name)
    _steps(trainer, batches)
    for p in trainer.model.parameters():
        assert torch.isfinite(p).all()


@pytest.mark.parametrize("method, ds_name", CASES)
def test_state_dict_round_trip(method, ds_name):
    trainer, batches = _trainer(method, ds_name)
    _steps(trainer, batches)
    state = {k: v.clone() for k, v in trainer.balancer.state_dict().items()}
    other, other_batches = _trainer(method, ds_name, seed=1)
    _steps(other, other_batches[:1])  # materialise lazily built heads
    other.balancer.load_state_dict(state)
    loaded = other.balancer.state_dict()
    assert set(loaded) == set(state)
    for k in state:
        assert torch.equal(loaded[k], state[k]), k


@pytest.mark.parametrize("method, ds_name", CASES)
def test_seeded_determinism(method, ds_name):
    finals = []
    for _ in range(2):
        trainer, batches = _trainer(method, ds_name, seed=7)
        _steps(trainer, batches)
        finals.append([p.detach().clone() for p in trainer.model.parameters()])
    for a, b in zip(*finals, strict=True):
        assert torch.equal(a, b)


def _scope_params(model, scope):
    ids = set()
    if "encoders" in scope:
        ids |= {id(p) for p in model.encoders.parameters()}
    if "fusion" in scope:
        ids |= {id(p) for p in model.fusion.parameters()}
    if "head" in scope:
        ids |= {id(p) for p in model.head.parameters()}
    return ids


@pytest.mark.parametrize("method, ds_name", CASES)
def test_gradient_edits_stay_in_declared_scope(method, ds_name):
    trainer, batches = _trainer(method, ds_name)
    balancer = trainer.balancer
    allowed = _scope_params(trainer.model, balancer.grad_edit_scope)
    violations = []
    original = balancer.on_after_backward

    def spy(ctx):
        before = {id(p): (None if p.grad is None else p.grad.clone()) for p in ctx.model.parameters()}
        original(ctx)
        for name, p in ctx.model.named_parameters():
            g0 = before[id(p)]
            changed = (g0 is None) != (p.grad is None) or (g0 is not None and not torch.equal(g0, p.grad))
            if changed and id(p) not in allowed:
                violations.append(name)

    balancer.on_after_backward = spy
    _steps(trainer, batches)
    assert not violations, f"{method} edited gradients outside {sorted(balancer.grad_edit_scope)}: {violations[:5]}"
