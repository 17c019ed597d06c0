"""Deterministic cost signals: operator counts by hand, and the extra work a change adds, exactly."""

from __future__ import annotations

import pytest
import torch

from mmbalance.measure import persistent_state_bytes
from mmbalance.methods import METHODS
from mmbalance.methods.joint import Joint
from mmbalance.signals import OpCounter, count_signals, state_bytes
from mmbalance.tasks import make_task
from mmbalance.train import TrainConfig, Trainer, batch_to_device, make_loader

CPU = torch.device("cpu")


def test_op_counter_by_hand():
    a, b = torch.ones(3), torch.ones(3)
    with OpCounter() as ops:
        c = torch.add(a, b)  # aten.add
        c.mul_(2)  # aten.mul_
        torch.add(c, a)  # aten.add
    assert ops.total == 3 and dict(ops.by_name) == {"aten.add": 2, "aten.mul_": 1}


@pytest.fixture
def probe():
    """A joint-equivalent test-only method whose step can be given extra work on purpose."""

    @METHODS.register("signal_probe")
    class SignalProbe(Joint):
        paper = "test probe"
        extra = ""  # "", "op", "clone", "param_loop", "sync"

        def on_after_backward(self, ctx):
            if self.extra == "op":
                torch.mul(ctx.terms["task"], 1.0)  # one aten.mul
            elif self.extra == "clone":
                ctx.terms["task"].clone()  # one aten.clone
            elif self.extra == "param_loop":
                for p in ctx.model.parameters():  # one aten.mul_ per parameter tensor
                    p.grad.mul_(1.0)
            elif self.extra == "sync":
                ctx.terms["task"].item()  # one host-device synchronisation on CUDA

    yield SignalProbe
    METHODS.unregister("signal_probe")


def _signals(tiny_problem, device=CPU, steps=2):
    model, splits, spec = tiny_problem
    cfg = TrainConfig(batch_size=16, eval_modality_scores=False)
    task = make_task(spec.task, spec.num_outputs)
    trainer = Trainer(model, METHODS.build("signal_probe"), task, cfg, device, 3)
    batches = [batch_to_device(b, device) for b in make_loader(splits["train"], cfg, device, train=True)]
    trainer.train_step(batches[0], 0, 0)  # warm-up: optimizer state exists before counting
    return count_signals(trainer, batches, steps=steps, epoch=3, device=device, first_step=1), trainer


@pytest.mark.parametrize(
    "extra, op, per_step",
    [("op", "aten.mul", 1), ("clone", "aten.clone", 1), ("param_loop", "aten.mul_", 8)],
)
def test_extra_work_shows_up_exactly(tiny_problem, probe, extra, op, per_step):
    plain, _ = _signals(tiny_problem)
    probe.extra = extra
    changed, _ = _signals(tiny_problem)
    # tiny_model has 8 parameter tensors (4 Linear layers: weight + bias), 2 counted steps
    assert changed["aten_ops"] - plain["aten_ops"] == 2 * per_step
    assert changed["aten_ops_by_name"][op] - plain["aten_ops_by_name"].get(op, 0) == 2 * per_step
    assert changed["flops"] == plain["flops"] and changed["state_bytes"] == plain["state_bytes"]


def test_signals_are_reproducible_and_count_the_state(tiny_problem, probe):
    first, trainer = _signals(tiny_problem)
    again, _ = _signals(tiny_problem)
    assert first == again
    assert set(first) == {"flops", "aten_ops", "state_bytes", "aten_ops_by_name"}  # no CUDA signals on CPU
    assert first["aten_ops"] == sum(first["aten_ops_by_name"].values())
    # tiny_model: Linear(4, 8), Linear(3, 8), Linear(16, 8), Linear(8, 3) = 40 + 32 + 136 + 27 = 235 floats;
    # parameters + gradients + Adam's two moments = 4 x 235 floats, + a float32 step per tensor (8)
    assert first["state_bytes"] == 4 * (4 * 235) + 4 * 8 == state_bytes(trainer)
    # joint's balancer adds nothing to the model and its optimizer
    assert state_bytes(trainer) == persistent_state_bytes(trainer.model, [trainer.optimizer])
    # one step of forward + backward: 2 * (16 x (4x8 + 3x8 + 16x8 + 8x3)) multiply-adds forward, x 3 with
    # backward (input and weight gradients; the first layers need no input gradient: -2 * 16 x (4x8 + 3x8))
    forward = 2 * 16 * (32 + 24 + 128 + 24)
    assert first["flops"] == 2 * (3 * forward - 2 * 16 * (32 + 24))


def test_bad_arguments(tiny_problem, probe):
    with pytest.raises(ValueError, match="steps must be an integer >= 1"):
        _signals(tiny_problem, steps=0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_signals_count_syncs_and_peak_memory(tiny_problem, probe):
    cuda = torch.device("cuda")
    plain, _ = _signals(tiny_problem, device=cuda)
    probe.extra = "sync"
    changed, _ = _signals(tiny_problem, device=cuda)
    assert plain["peak_allocated_bytes"] > 0
    assert changed["syncs"] - plain["syncs"] == 2  # one .item() per counted step
