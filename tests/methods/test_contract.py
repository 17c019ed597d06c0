"""Registry-wide contract tests, parametrised over the METHODS registry itself.

Every registered method, on every synthetic task it declares:
three finite training steps; a resume from a checkpoint (model, main optimizer and
``Balancer.training_state``) that continues exactly like the uninterrupted run; a ``fit`` stopped
inside an epoch, resumed from its epoch checkpoint (:mod:`mmbalance.checkpoint`) and finished that
ends exactly like the same ``fit`` run straight through; a training state that
``torch.load(weights_only=True)`` reads; seeded determinism; and gradient edits in
``on_after_backward`` confined to the model parts it declares in ``grad_edit_scope``.
Every file in ``mmbalance/methods/`` must be imported by ``BUILTIN_METHODS`` and register a method.
"""

from __future__ import annotations

import ast
import functools
import io
import math
from collections.abc import Mapping
from pathlib import Path

import pytest
import torch

import mmbalance.methods as methods_pkg
from mmbalance.balancer import EpochContext
from mmbalance.checkpoint import TIMING_FIELDS, RunCheckpoint
from mmbalance.datasets import DATASETS
from mmbalance.methods import BUILTIN_METHODS, METHODS
from mmbalance.models import MODELS
from mmbalance.registry import config_fields
from mmbalance.tasks import make_task
from mmbalance.train import TrainConfig, Trainer, batch_to_device, fit, make_loader, seed_everything

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


def _trainer(method, ds_name, seed=0, init_seed=None, epoch=0, epochs=2, device=CPU, amp="none", *,
             train_options=None, method_options=None):
    """Trainer on ``device`` (AMP mode ``amp``, CUDA only) after ``on_train_epoch_start`` of ``epoch``,
    and three training batches on the device. ``seed`` is the run's seed (loader order); ``init_seed``
    (default ``seed``) seeds the global RNG that draws the initial weights. ``train_options`` /
    ``method_options``: more TrainConfig / method config fields."""
    ds, spec, task = _data(ds_name)
    cfg = TrainConfig(
        batch_size=16, seed=seed, epochs=epochs, eval_modality_scores=False, cost_steps=0, amp=amp,
        **(train_options or {}),
    )
    seed_everything(seed if init_seed is None else init_seed)
    model = MODELS.build(spec.default_model)(spec)
    balancer = METHODS.build(method, None, **{**_method_overrides(method, spec), **(method_options or {})})
    train_loader = make_loader(ds.split("train"), cfg, device, train=True)
    trainer = Trainer(model, balancer, task, cfg, device, steps_per_epoch=len(train_loader))
    _start_epoch(trainer, ds_name, epoch)
    batches = []
    for i, b in enumerate(train_loader):
        batches.append(batch_to_device(b, device))
        if i == 2:
            break
    return trainer, batches


def _start_epoch(trainer, ds_name, epoch):
    """``on_train_epoch_start`` as the loop calls it, with the run's train and validation loaders."""
    ds, cfg, device = _data(ds_name)[0], trainer.cfg, trainer.device
    trainer.model.train()
    trainer.balancer.train()
    trainer.balancer.on_train_epoch_start(EpochContext(
        model=trainer.model, epoch=epoch, num_epochs=cfg.epochs,
        train_loader=make_loader(ds.split("train"), cfg, device, train=True),
        val_loader=make_loader(ds.split("val"), cfg, device, train=False),
        task=trainer.task, device=device, optimizer=trainer.optimizer,
        to_device=lambda b: batch_to_device(b, device),
    ))


def _steps(trainer, batches, epoch=0):
    for i, b in enumerate(batches):
        trainer.train_step(b, epoch, i)
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


# -- resuming from a checkpoint ------------------------------------------------------------------------
RESUME_EPOCHS = 3  # the run's length: the checkpoint is inside epoch 1, the comparison reaches epoch 2
RESUME_EPOCH = 1  # the checkpoint is taken inside the second epoch, after one epoch boundary
RESUME_AFTER = 2  # steps of that epoch before the checkpoint; the step after it is compared
NEXT_STEP_SEED = 123  # both runs draw what follows the checkpoint from this global RNG state



def _checkpoint(trainer):
    """What a resumed run restores: the model, the main optimizer, the scaler, the step counter and
    ``Balancer.training_state()`` (module state, every own optimizer's state, host state)."""
    return {
        "model": trainer.model.state_dict(),
        "optimizer": trainer.optimizer.state_dict(),
        "scaler": trainer.scaler.state_dict(),
        "global_step": trainer.global_step,
        "balancer": trainer.balancer.training_state(),
    }


def _serialised(obj):
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _resume(trainer, blob, map_location=None):
    ckpt = torch.load(io.BytesIO(blob), weights_only=False, map_location=map_location)
    trainer.model.load_state_dict(ckpt["model"])
    trainer.optimizer.load_state_dict(ckpt["optimizer"])
    trainer.scaler.load_state_dict(ckpt["scaler"])
    trainer.global_step = ckpt["global_step"]
    trainer.balancer.load_training_state(ckpt["balancer"])


def _run_to_checkpoint(method, ds_name, device=CPU):
    """Epoch 0 (two steps), the epoch boundary (``diagnostics``, ``on_train_epoch_start``), then
    ``RESUME_AFTER`` steps of epoch 1; returns the trainer and the batch of the next step."""
    trainer, batches = _trainer(method, ds_name, epochs=RESUME_EPOCHS, device=device)
    _steps(trainer, batches[:2])
    trainer.balancer.diagnostics()
    _start_epoch(trainer, ds_name, RESUME_EPOCH)
    _steps(trainer, batches[:RESUME_AFTER], epoch=RESUME_EPOCH)
    return trainer, batches[RESUME_AFTER]


def _grads_of_step(trainer, batch, epoch, step_in_epoch):
    """Run one step; return the gradient of every model and balancer parameter as the main
    optimizer sees it (after ``on_after_backward``)."""
    grads = {}
    balancer = trainer.balancer
    original = balancer.on_after_backward

    def spy(ctx):
        original(ctx)
        for prefix, module in (("model.", ctx.model), ("balancer.", balancer)):
            for name, p in module.named_parameters():
                grads[prefix + name] = None if p.grad is None else p.grad.detach().clone()

    balancer.on_after_backward = spy
    trainer.train_step(batch, epoch, step_in_epoch)
    trainer.flush_terms()
    del balancer.on_after_backward
    return grads


def _continue(trainer, ds_name, batch):
    """What follows the checkpoint, from a fixed global RNG state: the rest of the step's epoch (one
    step), the epoch boundary, and the first step of the next epoch (so state used only at epoch
    boundaries counts too). Returns the gradients of both steps."""
    seed_everything(NEXT_STEP_SEED)
    before = _grads_of_step(trainer, batch, RESUME_EPOCH, RESUME_AFTER)
    trainer.balancer.diagnostics()
    _start_epoch(trainer, ds_name, RESUME_EPOCH + 1)
    after = _grads_of_step(trainer, batch, RESUME_EPOCH + 1, 0)
    return {"next step": before, "first step of the next epoch": after}


def _differences(a, b, path):
    """Paths where two nested states (mappings, sequences, tensors, numbers) differ; exact, NaN == NaN."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)):
            return [f"{path}: {type(a).__name__} vs {type(b).__name__}"]
        if a.shape != b.shape or a.dtype != b.dtype:
            return [f"{path}: {a.dtype}{tuple(a.shape)} vs {b.dtype}{tuple(b.shape)}"]
        same = torch.equal(a, b) or (a.is_floating_point() and torch.equal(a.isnan(), b.isnan())
                                     and torch.equal(a.nan_to_num(), b.nan_to_num()))
        return [] if same else [path]
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        if set(a) != set(b):
            return [f"{path}: keys {sorted(map(str, set(a) ^ set(b)))[:5]} in one only"]
        return [d for k in a for d in _differences(a[k], b[k], f"{path}.{k}")]
    if isinstance(a, list | tuple) and isinstance(b, list | tuple):
        if len(a) != len(b):
            return [f"{path}: {len(a)} vs {len(b)} items"]
        pairs = enumerate(zip(a, b, strict=True))
        return [d for i, (x, y) in pairs for d in _differences(x, y, f"{path}[{i}]")]
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return []
    return [] if type(a) is type(b) and a == b else [f"{path}: {a!r} vs {b!r}"]


@pytest.mark.parametrize("method, ds_name", CASES)
def test_resume_from_training_state_continues_identically(method, ds_name):
    """Checkpoint inside epoch 1, load it into a fresh trainer built from other initial weights
    (whose ``on_train_epoch_start`` of epoch 1 saw those weights), and continue both runs into
    epoch 2: the gradients of every step and the whole state afterwards must be identical. A part of
    the state that the checkpoint misses (a Python counter, a lazily built part, an optimizer the
    balancer does not expose, a private generator, an epoch-level statistic) makes the resumed run
    diverge."""
    check_resume(method, ds_name)


def check_resume(method, ds_name, device=CPU, map_location=None):
    """The resume test on ``device``; the checkpoint is read with ``map_location``."""
    ran, batch = _run_to_checkpoint(method, ds_name, device)
    blob = _serialised(_checkpoint(ran))
    resumed, _ = _trainer(
        method, ds_name, init_seed=1, epoch=RESUME_EPOCH, epochs=RESUME_EPOCHS, device=device
    )
    _resume(resumed, blob, map_location)
    grads = _continue(ran, ds_name, batch)
    grads_resumed = _continue(resumed, ds_name, batch)
    assert all(grads.values()), "the gradient spy saw no parameter"
    for when in grads:
        bad = _differences(grads[when], grads_resumed[when], "grad")
        assert not bad, f"{method}: after a resume, the {when} has different gradients: {bad[:6]}"
    bad = _differences(_checkpoint(ran), _checkpoint(resumed), "state")
    assert not bad, f"{method}: the state after the resumed steps differs: {bad[:6]}"


# -- stop after an epoch, resume from the epoch checkpoint, finish ---------------------------------------
FIT_EPOCHS = 3
STOP_AT = (2, 1)  # (epoch, step): the run is stopped inside epoch 2, after the checkpoint of epoch 1


class _Stopped(Exception):
    """Stands for a kill: the run ends between two steps, its objects are thrown away."""


def _fit(method, ds_name, checkpoint, stop=False):
    """``fit`` of ``FIT_EPOCHS`` epochs of two steps, built as ``run_one`` builds a run (seeded
    first); returns the result and what the last epoch ended with (model weights, balancer state)."""
    ds = DATASETS.build(ds_name, n_train=64, n_val=32, n_test=32)
    spec = ds.spec
    task = make_task(spec.task, spec.num_outputs, **dict(spec.task_options))
    cfg = TrainConfig(epochs=FIT_EPOCHS, batch_size=16, max_train_batches=2, eval_modality_scores=False,
                      cost_steps=0)
    seed_everything(cfg.seed)
    model = MODELS.build(spec.default_model)(spec)
    balancer = METHODS.build(method, None, **_method_overrides(method, spec))
    final = {}

    def on_epoch_end(record):
        if record["epoch"] == FIT_EPOCHS - 1:
            final["model"] = {k: v.clone() for k, v in model.state_dict().items()}
            final["balancer"] = _serialised(balancer.training_state())

    if stop:
        original = balancer.on_after_optimizer_step

        def stop_inside(ctx):
            if (ctx.epoch, ctx.step_in_epoch) == STOP_AT:
                raise _Stopped
            original(ctx)

        balancer.on_after_optimizer_step = stop_inside
    splits = {s: ds.split(s) for s in ("train", "val", "test")}
    result = fit(model, balancer, splits, spec, task, cfg, CPU, on_epoch_end=on_epoch_end,
                 checkpoint=checkpoint)
    final["balancer"] = torch.load(io.BytesIO(final["balancer"]), weights_only=True)
    return result, final


def _without_timing(history):
    return [{k: v for k, v in r.items() if k not in TIMING_FIELDS["history"]} for r in history]


@pytest.mark.parametrize("method, ds_name", CASES)
def test_stop_resume_finish_equals_straight_through(method, ds_name, tmp_path):
    """A run stopped inside epoch 2 and resumed from the checkpoint of epoch 1 (in fresh objects) ends
    with the same test and validation metrics, history, final weights, final balancer state and
    best-validation weights as the same run trained straight through."""
    straight, straight_final = _fit(method, ds_name, None)
    checkpoint = RunCheckpoint(tmp_path / "ckpt", "0123456789ab", every=1)
    with pytest.raises(_Stopped):
        _fit(method, ds_name, checkpoint, stop=True)
    assert torch.load(checkpoint.path, weights_only=True)["epoch"] == STOP_AT[0] - 1
    resumed, resumed_final = _fit(method, ds_name, checkpoint)
    assert resumed.resumed_from_epoch == STOP_AT[0] and straight.resumed_from_epoch is None
    same = {
        "test": (straight.test, resumed.test),
        "val": (straight.val, resumed.val),
        "best_epoch": (straight.best_epoch, resumed.best_epoch),
        "history": (_without_timing(straight.history), _without_timing(resumed.history)),
        "steps": (straight.steps, resumed.steps),
        "final": (straight_final, resumed_final),
        "best weights": (straight.trainer.model.state_dict(), resumed.trainer.model.state_dict()),
    }
    for what, (a, b) in same.items():
        bad = _differences(a, b, what)
        assert not bad, f"{method} on {ds_name}: stopped, resumed and finished, the {what} differs: {bad[:6]}"


@pytest.mark.parametrize("method, ds_name", CASES)
def test_training_state_loads_with_weights_only(method, ds_name):
    """The training state holds tensors and plain Python values only, so checkpoints load with
    ``torch.load(weights_only=True)`` (no pickled objects, nothing executed on load)."""
    trainer, _ = _run_to_checkpoint(method, ds_name)
    state = trainer.balancer.training_state()
    loaded = torch.load(io.BytesIO(_serialised(state)), weights_only=True)
    bad = _differences(state, loaded, "training_state")
    assert not bad, f"{method}: the training state changes through torch.save / torch.load: {bad[:6]}"


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
    check_grad_edit_scope(method, ds_name)


def check_grad_edit_scope(method, ds_name, device=CPU, amp="none"):
    """The gradient-scope test on ``device`` with AMP mode ``amp``."""
    trainer, batches = _trainer(method, ds_name, device=device, amp=amp)
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
    scope = sorted(balancer.grad_edit_scope)
    assert not violations, f"{method} edited gradients outside {scope}: {violations[:5]}"
