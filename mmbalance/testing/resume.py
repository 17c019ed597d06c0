"""The resume contract checks: a checkpoint continues exactly like the uninterrupted run.

* :func:`check_state_round_trip`: a checkpoint inside an epoch (model, main optimizer, scaler,
  step counter, ``Balancer.training_state``) loaded into a fresh trainer built from other initial
  weights continues with the same gradients and ends in the same state.
* :func:`check_stop_resume_finish`: a ``fit`` stopped inside an epoch, resumed from its epoch
  checkpoint (:class:`mmbalance.checkpoint.RunCheckpoint`) and finished ends exactly like the same
  ``fit`` run straight through.
* :func:`check_weights_only_state`: the training state reads back through
  ``torch.load(weights_only=True)`` unchanged.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import torch

from mmbalance.checkpoint import TIMING_FIELDS, RunCheckpoint
from mmbalance.datasets import DATASETS
from mmbalance.models import MODELS
from mmbalance.tasks import make_task
from mmbalance.testing._compare import deserialised, differences, serialised
from mmbalance.testing._contract import contract_check, expect
from mmbalance.testing._setup import Subject, contract_trainer, run_steps, start_epoch
from mmbalance.train import FitResult, TrainConfig, Trainer, fit, seed_everything

__all__ = ["check_state_round_trip", "check_stop_resume_finish", "check_weights_only_state"]

RESUME_EPOCHS = 3  # the run's length: the checkpoint is inside epoch 1, the comparison reaches epoch 2
RESUME_EPOCH = 1  # the checkpoint is taken inside the second epoch, after one epoch boundary
RESUME_AFTER = 2  # steps of that epoch before the checkpoint; the step after it is compared
NEXT_STEP_SEED = 123  # both runs draw what follows the checkpoint from this global RNG state
FIT_EPOCHS = 3
STOP_AT = (2, 1)  # (epoch, step): the fit is stopped inside epoch 2, after the checkpoint of epoch 1


def _state(trainer: Trainer) -> dict[str, Any]:
    """What a resumed run restores: the model, the main optimizer, the scaler, the step counter and
    ``Balancer.training_state()`` (module state, every own optimizer's state, host state)."""
    return {
        "model": trainer.model.state_dict(),
        "optimizer": trainer.optimizer.state_dict(),
        "scaler": trainer.scaler.state_dict(),
        "global_step": trainer.global_step,
        "balancer": trainer.balancer.training_state(),
    }


def _load(trainer: Trainer, blob: bytes, map_location: Any) -> None:
    ckpt = deserialised(blob, weights_only=False, map_location=map_location)
    trainer.model.load_state_dict(ckpt["model"])
    trainer.optimizer.load_state_dict(ckpt["optimizer"])
    trainer.scaler.load_state_dict(ckpt["scaler"])
    trainer.global_step = ckpt["global_step"]
    trainer.balancer.load_training_state(ckpt["balancer"])


def _run_to_checkpoint(method: Subject, task: str, device: torch.device) -> tuple[Trainer, Any]:
    """Epoch 0 (two steps), the epoch boundary (``diagnostics``, ``on_train_epoch_start``), then
    ``RESUME_AFTER`` steps of epoch 1; returns the trainer and the batch of the next step."""
    trainer, batches = contract_trainer(method, task, epochs=RESUME_EPOCHS, device=device)
    run_steps(trainer, batches[:2])
    trainer.balancer.diagnostics()
    start_epoch(trainer, task, RESUME_EPOCH)
    run_steps(trainer, batches[:RESUME_AFTER], epoch=RESUME_EPOCH)
    return trainer, batches[RESUME_AFTER]


def _grads_of_step(trainer: Trainer, batch: Any, epoch: int, step_in_epoch: int) -> dict[str, Any]:
    """Run one step; return the gradient of every model and balancer parameter as the main
    optimizer sees it (after ``on_after_backward``)."""
    grads: dict[str, Any] = {}
    balancer = trainer.balancer
    original = balancer.on_after_backward

    def spy(ctx):
        original(ctx)
        for prefix, module in (("model.", ctx.model), ("balancer.", balancer)):
            for name, p in module.named_parameters():
                grads[prefix + name] = None if p.grad is None else p.grad.detach().clone()

    balancer.on_after_backward = spy
    try:
        trainer.train_step(batch, epoch, step_in_epoch)
        trainer.flush_terms()
    finally:
        del balancer.on_after_backward
    return grads


def _continue(trainer: Trainer, task: str, batch: Any) -> dict[str, dict[str, Any]]:
    """What follows the checkpoint, from a fixed global RNG state: the rest of the step's epoch (one
    step), the epoch boundary, and the first step of the next epoch (so state used only at epoch
    boundaries counts too). Returns the gradients of both steps."""
    seed_everything(NEXT_STEP_SEED)
    before = _grads_of_step(trainer, batch, RESUME_EPOCH, RESUME_AFTER)
    trainer.balancer.diagnostics()
    start_epoch(trainer, task, RESUME_EPOCH + 1)
    after = _grads_of_step(trainer, batch, RESUME_EPOCH + 1, 0)
    return {"next step": before, "first step of the next epoch": after}


@contract_check("state_round_trip")
def check_state_round_trip(method: Subject, task: str, *, device: torch.device,
                           map_location: Any = None) -> str | None:
    """Checkpoint inside epoch 1, load it (read with ``map_location``) into a fresh trainer built
    from other initial weights (whose ``on_train_epoch_start`` of epoch 1 saw those weights), and
    continue both runs into epoch 2: the gradients of every step and the whole state afterwards must
    be identical. A part of the state that the checkpoint misses (a Python counter, a lazily built
    part, an optimizer the balancer does not expose, a private generator, an epoch-level statistic)
    makes the resumed run diverge."""
    ran, batch = _run_to_checkpoint(method, task, device)
    blob = serialised(_state(ran))
    resumed, _ = contract_trainer(method, task, init_seed=1, epoch=RESUME_EPOCH, epochs=RESUME_EPOCHS,
                                  device=device)
    _load(resumed, blob, map_location)
    grads = _continue(ran, task, batch)
    grads_resumed = _continue(resumed, task, batch)
    expect(all(grads.values()), "the gradient spy saw no parameter")
    for when in grads:
        bad = differences(grads[when], grads_resumed[when], "grad")
        expect(not bad, f"after a resume, the {when} has different gradients: {bad[:6]}")
    bad = differences(_state(ran), _state(resumed), "state")
    expect(not bad, f"the state after the resumed steps differs: {bad[:6]}")
    return None


@contract_check("weights_only_state")
def check_weights_only_state(method: Subject, task: str, *, device: torch.device) -> str | None:
    """The training state inside an epoch holds tensors and plain Python values only, so checkpoints
    load with ``torch.load(weights_only=True)`` (no pickled objects, nothing executed on load)."""
    trainer, _ = _run_to_checkpoint(method, task, device)
    state = trainer.balancer.training_state()
    try:
        loaded = deserialised(serialised(state), weights_only=True)
    except Exception as exc:  # torch's UnpicklingError and whatever a foreign object raises
        raise AssertionError(f"torch.load(weights_only=True) cannot read the training state: {exc}") from exc
    bad = differences(state, loaded, "training_state")
    expect(not bad, f"the training state changes through torch.save / torch.load: {bad[:6]}")
    return None


class _Stopped(Exception):
    """Stands for a kill: the run ends between two steps, its objects are thrown away."""


def _fit(method: Subject, task: str, device: torch.device, checkpoint: RunCheckpoint | None,
         stop: bool = False) -> tuple[FitResult, dict[str, Any]]:
    """``fit`` of ``FIT_EPOCHS`` epochs of two steps, built as a matrix run is built (seeded first);
    returns the result and what the last epoch ended with (model weights, balancer state)."""
    ds = DATASETS.build(task, n_train=64, n_val=32, n_test=32)
    spec = ds.spec
    objective = make_task(spec.task, spec.num_outputs, **dict(spec.task_options))
    cfg = TrainConfig(epochs=FIT_EPOCHS, batch_size=16, max_train_batches=2, eval_modality_scores=False,
                      cost_steps=0)
    seed_everything(cfg.seed)
    model = MODELS.build(spec.default_model)(spec)
    balancer = method.build(task)
    final: dict[str, Any] = {}

    def on_epoch_end(record: dict[str, Any]) -> None:
        if record["epoch"] == FIT_EPOCHS - 1:
            final["model"] = {k: v.clone() for k, v in model.state_dict().items()}
            final["balancer"] = serialised(balancer.training_state())

    if stop:
        original = balancer.on_after_optimizer_step

        def stop_inside(ctx):
            if (ctx.epoch, ctx.step_in_epoch) == STOP_AT:
                raise _Stopped
            original(ctx)

        balancer.on_after_optimizer_step = stop_inside
    splits = {s: ds.split(s) for s in ("train", "val", "test")}
    result = fit(model, balancer, splits, spec, objective, cfg, device, on_epoch_end=on_epoch_end,
                 checkpoint=checkpoint)
    final["balancer"] = deserialised(final["balancer"], weights_only=True)
    return result, final


def _without_timing(history: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: v for k, v in r.items() if k not in TIMING_FIELDS["history"]} for r in history]


@contract_check("stop_resume_finish")
def check_stop_resume_finish(method: Subject, task: str, *, device: torch.device) -> str | None:
    """A ``fit`` stopped inside epoch 2 and resumed, in fresh objects, from its checkpoint of epoch
    1 ends with the same test and validation metrics, history, final weights, final balancer state
    and best-validation weights as the same run trained straight through."""
    straight, straight_final = _fit(method, task, device, None)
    with tempfile.TemporaryDirectory(prefix="mmbalance-contract-") as tmp:
        checkpoint = RunCheckpoint(Path(tmp) / "ckpt", "0123456789ab", every=1)
        try:
            _fit(method, task, device, checkpoint, stop=True)
        except _Stopped:
            pass
        else:
            raise AssertionError(f"the fit never reached step {STOP_AT[1]} of epoch {STOP_AT[0]}")
        saved = torch.load(checkpoint.path, weights_only=True)["epoch"]
        expect(saved == STOP_AT[0] - 1, f"the checkpoint holds epoch {saved}, expected {STOP_AT[0] - 1}")
        resumed, resumed_final = _fit(method, task, device, checkpoint)
    expect(resumed.resumed_from_epoch == STOP_AT[0] and straight.resumed_from_epoch is None,
           f"resumed from epoch {resumed.resumed_from_epoch}, expected {STOP_AT[0]}")
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
        bad = differences(a, b, what)
        expect(not bad, f"stopped, resumed and finished, the {what} differs: {bad[:6]}")
    return None
