"""UMT: the distillation loss by hand, isolated teacher stage (joint-neutral at λ = 0), frozen teachers."""

from __future__ import annotations

import pytest
import torch

from mmbalance.balancer import EpochContext
from mmbalance.errors import ConfigError, ShapeError
from mmbalance.methods import METHODS
from mmbalance.methods.umt import UMT, UMTConfig, distillation_loss
from mmbalance.tasks import make_task
from mmbalance.train import TrainConfig, Trainer, batch_to_device, make_loader

from ..conftest import tiny_model, tiny_splits
from ._helpers import assert_fits_like_joint

CPU = torch.device("cpu")
CFG = TrainConfig(epochs=2, batch_size=16, eval_modality_scores=False, cost_steps=0)


def test_distillation_loss_by_hand():
    student = {"a": torch.tensor([[1.0, 2.0]]), "b": torch.zeros(1, 3)}
    teacher = {"a": torch.zeros(1, 2), "b": torch.ones(1, 3)}
    # a: (1 + 4) / 2 = 2.5; b: (1 + 1 + 1) / 3 = 1
    assert float(distillation_loss(student, teacher)) == pytest.approx(3.5)
    with pytest.raises(ShapeError, match="features\\['a'\\] has shape \\(1, 2\\), its teacher's \\(1, 3\\)"):
        distillation_loss({"a": torch.zeros(1, 2)}, {"a": torch.zeros(1, 3)})

    # float64 features stay float64 (BalanceBenchmark's MSE in the model's dtype): a = (1/3, 0.1)
    # against zeros: (1/9 + 1/100) / 2 = 109/1800; a float32 cast is off by ~1e-8
    third = {"a": torch.tensor([[1 / 3, 0.1]], dtype=torch.float64)}
    value = distillation_loss(third, {"a": torch.zeros(1, 2, dtype=torch.float64)})
    assert value.dtype == torch.float64
    assert value.item() == pytest.approx(109 / 1800, rel=1e-12, abs=0)

def test_zero_scaling_with_trained_teachers_reproduces_joint_exactly():
    """The teacher stage runs on a forked RNG and a private loader: it leaves the main run untouched."""
    balancer = UMT(UMTConfig(scaling=0.0, teacher_epochs=2))
    assert_fits_like_joint(balancer, CFG)
    assert bool(balancer.teachers_trained) and balancer.extra_steps() == 2 * 2 * 3


def test_teachers_train_then_stay_frozen_in_eval_mode():
    splits, _ = tiny_splits()
    model = tiny_model()
    balancer = UMT(UMTConfig(teacher_epochs=2))
    trainer = Trainer(model, balancer, make_task("cls", 3), CFG, CPU, steps_per_epoch=3)
    initial = {m: [p.clone() for p in balancer.teachers[m].parameters()] for m in ("a", "b")}
    loader = make_loader(splits["train"], CFG, CPU, train=True)
    ctx = EpochContext(
        model=model, epoch=0, num_epochs=2, train_loader=loader,
        val_loader=make_loader(splits["val"], CFG, CPU, train=False), task=trainer.task, device=CPU,
        optimizer=trainer.optimizer, to_device=lambda b: batch_to_device(b, CPU),
    )
    balancer.on_train_epoch_start(ctx)
    trained = {m: [p.clone() for p in balancer.teachers[m].parameters()] for m in ("a", "b")}
    for m in ("a", "b"):
        assert any(not torch.equal(p, q) for p, q in zip(initial[m], trained[m], strict=True))
        assert all(not p.requires_grad for p in balancer.teachers[m].parameters())
    assert all(v > 0 for v in balancer.diagnostics().values())
    balancer.train()
    assert not balancer.teachers.training  # frozen targets even while the balancer trains
    batch = batch_to_device(next(iter(loader)), CPU)
    trainer.train_step(batch, 0, 0)
    for m in ("a", "b"):
        teacher = balancer.teachers[m].parameters()
        assert all(torch.equal(p, q) for p, q in zip(teacher, trained[m], strict=True))
        assert all(p.grad is None for p in balancer.teachers[m].parameters())
    balancer.on_train_epoch_start(ctx)  # teachers are trained once per run
    assert balancer.extra_steps() == 2 * 2 * 3


def test_distillation_gradient_reaches_the_student_encoders():
    splits, _ = tiny_splits()
    model = tiny_model()
    balancer = UMT(UMTConfig(scaling=10.0))
    trainer = Trainer(model, balancer, make_task("cls", 3), CFG, CPU, steps_per_epoch=3)
    for p in balancer.teachers.parameters():  # a teacher different from the student's initial weights
        p.data.add_(0.5)
    batch = batch_to_device(next(iter(make_loader(splits["train"], CFG, CPU, train=True))), CPU)
    output = balancer.forward_step(model, batch)
    terms = balancer.loss_terms(output, batch, trainer.task)
    assert float(terms["distill"].detach()) > 0
    terms["distill"].backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.encoders.parameters())
    assert all(p.grad is None for p in model.head.parameters())


def test_config_errors():
    with pytest.raises(ConfigError, match="scaling must be a finite number >= 0"):
        METHODS.build("umt", None, scaling=-1.0)
    with pytest.raises(ConfigError, match="teacher_epochs must be None or an integer >= 0"):
        METHODS.build("umt", None, teacher_epochs=-2)
