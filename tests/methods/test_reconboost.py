"""ReconBoost: the reconcilement loss by hand; stages, membership, extra steps and the ensemble."""

from __future__ import annotations

import math

import pytest
import torch

from mmbalance.balancer import EpochContext
from mmbalance.errors import ConfigError, ShapeError
from mmbalance.methods import METHODS
from mmbalance.methods.reconboost import (
    ReconBoost,
    ReconBoostConfig,
    boosting_loss,
    consolidation_loss,
    stage_modality,
)
from mmbalance.tasks import make_task
from mmbalance.train import TrainConfig, Trainer, make_loader

from ..conftest import tiny_model, tiny_splits

CPU = torch.device("cpu")
T = torch.tensor


def test_boosting_loss_by_hand():
    cls = make_task("cls", 2)
    # learner p = softmax(0, ln 3) = (.25, .75), y = 1: log p_y = ln .75; others q = softmax(ln 4, 0)_1 = .2
    # official: -w1 * mean_k(y log p) + w2 * mean_k(y q log p) = (-5 ln .75 + 1 * .2 ln .75) / 2
    pred, others, y = T([[0.0, math.log(3.0)]]), T([[math.log(4.0), 0.0]]), T([1])
    expected = (-5 * math.log(0.75) + 0.2 * math.log(0.75)) / 2
    assert boosting_loss(pred, others, y, cls, 5.0, 1.0).item() == pytest.approx(expected)
    # float64 outputs stay float64: the same value to 1e-12 (a float32 cast is off by ~1e-8)
    pred64 = torch.tensor([[0.0, math.log(3.0)]], dtype=torch.float64)
    others64 = torch.tensor([[math.log(4.0), 0.0]], dtype=torch.float64)
    loss64 = boosting_loss(pred64, others64, y, cls, 5.0, 1.0)
    assert loss64.dtype == torch.float64 and loss64.item() == pytest.approx(expected, rel=1e-12, abs=0)
    # empty ensemble (stage 0, official constant c0): q = 1 -> (w2 - w1) log p_y / K
    expected = (1.0 - 5.0) * math.log(0.75) / 2
    assert boosting_loss(pred, None, y, cls, 5.0, 1.0).item() == pytest.approx(expected)
    # a sample the others already classify confidently weighs less than one they get wrong
    right = boosting_loss(pred, T([[0.0, 10.0]]), y, cls, 5.0, 1.0)
    wrong = boosting_loss(pred, T([[10.0, 0.0]]), y, cls, 5.0, 1.0)
    assert right.item() < wrong.item()
    # regression (adaptation): (w1 - w2 exp(-|F - y|)) |f - y| with K = 1
    reg = make_task("reg", 1)
    value = boosting_loss(T([[0.5]]), T([[2.0]]), T([0.0]), reg, 1.0, 0.25).item()
    assert value == pytest.approx((1.0 - 0.25 * math.exp(-2.0)) * 0.5)


def test_consolidation_loss_and_round_robin():
    a, b = T([[0.0, 0.0]]), T([[math.log(3.0), 0.0]])  # softmax (.5, .5) vs (.75, .25)
    assert consolidation_loss(a, b, "cls").item() == pytest.approx(0.25**2)
    assert [stage_modality(s, ("x", "y", "z")) for s in range(5)] == ["x", "y", "z", "x", "y"]


def _setup(config: ReconBoostConfig, seed: int = 0):
    splits, _ = tiny_splits()
    task = make_task("cls", 3)
    cfg = TrainConfig(batch_size=16, seed=seed, cost_steps=0, eval_modality_scores=False)
    torch.manual_seed(seed)
    balancer = ReconBoost(config)
    trainer = Trainer(tiny_model(seed=seed), balancer, task, cfg, CPU, steps_per_epoch=3)
    train = make_loader(splits["train"], cfg, CPU, train=True)
    val = make_loader(splits["val"], cfg, CPU, train=False)

    def ctx(epoch):
        return EpochContext(trainer.model, epoch, 8, train, val, task, CPU, trainer.optimizer, lambda b: b)

    return trainer, balancer, ctx, list(train)


def test_stages_add_members_count_extra_steps_and_leave_other_encoders_alone():
    config = ReconBoostConfig(boost_epochs=2, correct_epochs=2, head_hidden=None)
    trainer, balancer, ctx, batches = _setup(config)
    model = trainer.model
    b_before = [p.detach().clone() for p in model.modality_parameters("b")]
    balancer.on_train_epoch_start(ctx(0))  # stage 0: boost modality "a" (3 batches x 2 passes)
    assert balancer.extra_steps() == 6 and balancer._members == ["a"]
    for p, q in zip(model.modality_parameters("b"), b_before, strict=True):
        assert torch.equal(p, q)  # boosting one learner never touches another encoder
    for i, batch in enumerate(batches):
        trainer.train_step(batch, 0, i)  # rectification of the one-member ensemble
    balancer.on_train_epoch_start(ctx(1))  # mid-stage: nothing to do
    assert balancer.extra_steps() == 6
    balancer.on_train_epoch_start(ctx(2))  # stage 1: boost "b", which joins
    assert balancer.extra_steps() == 12 and balancer._members == ["a", "b"]
    assert balancer.in_ensemble.tolist() == [True, True] and int(balancer.stages_done) == 2
    rho_before = balancer.rho.detach().clone()
    trainer.train_step(batches[0], 2, 0)
    assert not torch.equal(balancer.rho.detach(), rho_before)  # ρ is learnt in rectification
    trainer.flush_terms()


def test_predict_is_rho_times_the_sum_of_member_learners():
    trainer, balancer, ctx, batches = _setup(ReconBoostConfig(boost_epochs=1, correct_epochs=1))
    balancer.on_train_epoch_start(ctx(0))
    balancer.on_train_epoch_start(ctx(1))
    model = trainer.model.eval()
    with torch.no_grad():
        features, _ = model.encode(batches[0])
        head = balancer.heads.heads["shared"]
        expected = balancer.rho * (head(features["a"]) + head(features["b"]))
        torch.testing.assert_close(balancer.predict(model.fuse(features)), expected)
    # a fresh balancer loaded from the state predicts the same (membership and ρ are state)
    fresh = ReconBoost(ReconBoostConfig(boost_epochs=1, correct_epochs=1))
    fresh.setup(tiny_model(), make_task("cls", 3), lambda p, lr=None, **kw: torch.optim.SGD(p, lr=0.1))
    fresh.load_state_dict(balancer.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(fresh.predict(model.fuse(features)), expected)


def test_consolidation_with_gradient_changes_the_boosting_step():
    results, logged = [], []
    for grad in (False, True):
        config = ReconBoostConfig(boost_epochs=1, correct_epochs=1, consolidation_grad=grad, boost_batches=1)
        trainer, balancer, ctx, _ = _setup(config)
        balancer.on_train_epoch_start(ctx(0))
        balancer.on_train_epoch_start(ctx(1))  # stage 1 has a previous learner
        results.append([p.detach().clone() for p in trainer.model.modality_parameters("b")])
        logged.append(balancer.diagnostics()["boost_loss"])
    assert any(not torch.equal(p, q) for p, q in zip(*results, strict=True))
    # the logged stage loss is the reconcilement loss alone (official `stage_loss`), here of the
    # same first batch on the same weights with and without the consolidation term
    assert logged[0] == logged[1]


def test_errors():
    with pytest.raises(ConfigError, match="weight2"):
        METHODS.build("reconboost", None, weight2=6.0)
    with pytest.raises(ConfigError, match="correct_epochs"):
        METHODS.build("reconboost", None, correct_epochs=0)
    trainer, balancer, ctx, batches = _setup(ReconBoostConfig())
    with pytest.raises(ConfigError, match="ensemble is empty"):
        trainer.train_step(batches[0], 0, 0)
    # a shared head needs equal feature widths
    model = tiny_model()
    model.encoders["b"] = torch.nn.Sequential(torch.nn.Linear(3, 5), torch.nn.ReLU())
    trainer.model = model
    other = ReconBoost(ReconBoostConfig(boost_epochs=1))
    other.setup(model, make_task("cls", 3), lambda p, lr=None, **kw: torch.optim.SGD(p, lr=0.1))
    bad = ctx(0)
    bad = EpochContext(
        model, 0, 1, bad.train_loader, bad.val_loader, bad.task, CPU, bad.optimizer, bad.to_device
    )
    with pytest.raises(ShapeError, match="shared_head=False"):
        other.on_train_epoch_start(bad)


def test_training_state_resumes_inside_a_stage():
    """A fresh balancer that loads a mid-stage state gets the stage's rectification optimizer (the
    heads are built from the state first), so the saved optimizer state has a home."""
    trainer, balancer, ctx, batches = _setup(ReconBoostConfig(boost_epochs=1, correct_epochs=2))
    balancer.on_train_epoch_start(ctx(0))
    trainer.train_step(batches[0], 0, 0)
    state = balancer.training_state()
    _, fresh, _, _ = _setup(ReconBoostConfig(boost_epochs=1, correct_epochs=2), seed=1)
    assert fresh.rectify_optimizer is None  # no stage has started in this balancer
    fresh.load_training_state(state)
    assert fresh._members == ["a"]
    saved, loaded = state["optimizers"][0], fresh.rectify_optimizer.state_dict()
    assert saved["param_groups"] == loaded["param_groups"]
    for key, value in saved["state"].items():
        for name, tensor in value.items():
            assert torch.equal(torch.as_tensor(tensor), torch.as_tensor(loaded["state"][key][name])), name
