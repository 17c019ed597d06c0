"""AUG: the residual loss, the assignment rule and schedule by hand; the classifier stacks (sums,
growth, state); the boosting loss against the official soft-label form; config errors; short fits."""

from __future__ import annotations

import io
import math

import pytest
import torch
import torch.nn.functional as F

from mmbalance.datasets import DATASETS
from mmbalance.errors import ConfigError, UnsupportedError
from mmbalance.methods import METHODS
from mmbalance.methods._boosting import BoostedClassifiers
from mmbalance.methods._heads import head_term
from mmbalance.methods.aug import (
    AUG,
    AUGConfig,
    assignment_interval,
    assigns_after,
    residual_loss,
    target_confidence,
    weak_modality,
)
from mmbalance.tasks import make_task
from mmbalance.train import TrainConfig, Trainer, make_optimizer_factory

from ..conftest import tiny_model, tiny_splits
from ._helpers import short_fit, start_epoch, tiny_trainer

CPU = torch.device("cpu")
CLS3 = make_task("cls", 3)


# -- the arithmetic by hand ------------------------------------------------------------------------
def test_residual_loss_by_hand_and_equal_to_the_official_soft_label_form():
    # weights 1 - η c = (1 - 0.5·0.5, 1 - 0.5·0.2) = (0.75, 0.9); mean(0.75·2, 0.9·1) = 1.2
    assert residual_loss(torch.tensor([2.0, 1.0]), torch.tensor([0.5, 0.2]), 0.5).item() == pytest.approx(1.2)
    # newest logits (ln 3, 0): softmax (0.75, 0.25), y = 0: CE = -ln 0.75 = 0.2876821; p_prev(y) = 0.6
    # official: CE(f, y) - 0.5·CE(f, y ⊙ p) = 0.2876821 - 0.5·0.6·0.2876821 = 0.7·0.2876821 = 0.2013775
    logits, y = torch.tensor([[math.log(3.0), 0.0]]), torch.tensor([0])
    ce = F.cross_entropy(logits, y, reduction="none")
    assert residual_loss(ce, torch.tensor([0.6]), 0.5).item() == pytest.approx(0.2013775, abs=1e-6)
    soft = torch.tensor([[0.6, 0.0]])  # y ⊙ softmax(F_prev) for one-hot y = class 0
    official = F.cross_entropy(logits, y) - 0.5 * F.cross_entropy(logits, soft)
    assert official.item() == pytest.approx(0.2013775, abs=1e-6)


def test_target_confidence_by_hand():
    logits = torch.tensor([[0.0, math.log(3.0)], [math.log(4.0), 0.0]])  # softmax (.25, .75), (.8, .2)
    torch.testing.assert_close(target_confidence(logits, torch.tensor([1, 1]), make_task("cls", 2)),
                               torch.tensor([0.75, 0.2]))


def test_weak_modality_two_modalities_by_hand():
    assert weak_modality([30.0, 20.0], 1.0, 0.01) == 1  # ratio 1.5 > 1.01: the second is weak
    assert weak_modality([20.0, 30.0], 1.0, 0.01) == 0  # ratio 0.667 < 0.99: the first
    assert weak_modality([100.0, 99.5], 1.0, 0.01) is None  # ratio 1.005 inside the dead zone
    assert weak_modality([99.5, 100.0], 1.0, 0.01) is None  # ratio 0.995
    assert weak_modality([30.0, 20.0], 2.0, 0.01) == 0  # λ = 2: ratio 1.5 < 1.99


def test_weak_modality_three_modalities_by_hand():
    # s = (1, 2, 4): ρ = (0.375, 1.25, 3.0); the first is weakest and below 0.99
    assert weak_modality([1.0, 2.0, 4.0], 1.0, 0.01) == 0
    # s = (4, 1, 2): ρ = ((4 + 2)/2, (1/4 + 1/2)/2, (1/2 + 2)/2) = (3, 0.375, 1.25)
    assert weak_modality([4.0, 1.0, 2.0], 1.0, 0.01) == 1
    assert weak_modality([1.0, 1.0, 1.0], 1.0, 0.01) is None
    assert weak_modality([1.0, 2.0, 4.0], 0.3, 0.01) is None  # 0.375 is not below 0.29


def test_assignment_schedule_by_hand():
    assert assignment_interval(200, None) == 20  # crema.json: epoch_dict 200, check = int(200 / 10)
    assert assignment_interval(25, None) == 2
    assert [assignment_interval(n, None) for n in (8, 10, 11)] == [1, 1, 1]
    assert assignment_interval(200, 7) == 7
    # interval 20: after epoch 0 and every 20th epoch (19, 39, ...)
    assert [e for e in range(60) if assigns_after(e, 20)] == [0, 19, 39, 59]
    assert all(assigns_after(e, 1) for e in range(5))


# -- the classifier stacks ------------------------------------------------------------------------
def _set(layer, weight, bias):
    with torch.no_grad():
        layer.weight.copy_(torch.tensor(weight))
        layer.bias.copy_(torch.tensor(bias))


def test_stack_outputs_are_sums_of_classifiers_by_hand():
    stacks = BoostedClassifiers(("a",), "cls", 2, hidden=2)
    z = {"a": torch.tensor([[1.0, 2.0]])}
    stacks(z)
    stacks.add("a")
    stacks.add("a")
    shared, (l0, l1, l2) = stacks.output["shared"], stacks.stacks["a"]
    _set(shared, [[1.0, 0.0], [0.0, 1.0]], [0.5, 0.0])
    _set(l0, [[1.0, 0.0], [0.0, 1.0]], [0.0, 0.0])  # relu(1, 2) = (1, 2) -> o0 = (1.5, 2)
    _set(l1, [[0.0, 1.0], [1.0, 0.0]], [-1.0, 0.0])  # relu(2 - 1, 1) = (1, 1) -> o1 = (1.5, 1)
    _set(l2, [[-1.0, 0.0], [0.0, -1.0]], [0.0, 0.0])  # relu(-1, -2) = (0, 0) -> o2 = (0.5, 0)
    out = stacks(z)["a"]
    torch.testing.assert_close(out.previous, torch.tensor([[3.0, 3.0]]))
    torch.testing.assert_close(out.newest, torch.tensor([[0.5, 0.0]]))
    torch.testing.assert_close(out.total, torch.tensor([[3.5, 3.0]]))
    single = BoostedClassifiers(("a",), "cls", 2, hidden=2)(z)["a"]
    assert single.previous is None and single.newest is None


def test_building_and_adding_draw_nothing_from_the_global_rng():
    state = torch.get_rng_state()
    stacks = BoostedClassifiers(("a", "b"), "cls", 3, hidden=4, seed=5)
    stacks({"a": torch.ones(2, 3), "b": torch.ones(2, 5)})
    stacks.add("b")
    assert torch.equal(state, torch.get_rng_state())
    again = BoostedClassifiers(("a", "b"), "cls", 3, hidden=4, seed=5)
    again({"a": torch.ones(2, 3), "b": torch.ones(2, 5)})
    again.add("b")
    for p, q in zip(stacks.parameters(), again.parameters(), strict=True):
        assert torch.equal(p, q)
    assert stacks.stacks["b"][1].bias.abs().sum() == 0  # official weight_init: zero bias


def _grown(train_added=True, additions=("b", "a", "b")):
    factory = make_optimizer_factory(TrainConfig())
    stacks = BoostedClassifiers(("a", "b"), "cls", 3, hidden=4, seed=1, optimizer_factory=factory,
                                train_added=train_added)
    features = {"a": torch.randn(4, 3), "b": torch.randn(4, 5)}
    stacks(features)
    for m in additions:
        stacks.add(m)
    sum(o.total.sum() for o in stacks(features).values()).backward()
    stacks.optimizer.step()
    return stacks, features


def test_saved_stacks_rebuild_in_a_fresh_module_and_shrink_to_a_smaller_state():
    stacks, features = _grown()
    assert stacks.counts() == {"a": 2, "b": 3} and len(stacks.optimizer.param_groups) == 4
    blob = io.BytesIO()
    torch.save({"module": stacks.state_dict(), "optimizer": stacks.optimizer.state_dict()}, blob)
    saved = torch.load(io.BytesIO(blob.getvalue()), weights_only=True)
    fresh = BoostedClassifiers(("a", "b"), "cls", 3, hidden=4, seed=9,
                               optimizer_factory=make_optimizer_factory(TrainConfig()))
    fresh.load_state_dict(saved["module"])
    fresh.optimizer.load_state_dict(saved["optimizer"])
    assert fresh.additions == [1, 0, 1] and fresh.seed == 1
    for m in ("a", "b"):
        torch.testing.assert_close(fresh(features)[m].total, stacks(features)[m].total)
    # a snapshot taken after the first addition: the later classifiers and their groups go
    small, _ = _grown(additions=("b",))
    stacks.load_state_dict(small.state_dict())
    assert stacks.counts() == {"a": 1, "b": 2} and len(stacks.optimizer.param_groups) == 2
    assert set(stacks.optimizer.state) <= set(stacks.parameters())
    # a diverging history: remove back to the common prefix, then add the saved ones
    other, _ = _grown(additions=("a", "a"))
    stacks.load_state_dict(other.state_dict())
    assert stacks.additions == [0, 0] and stacks.counts() == {"a": 3, "b": 1}


def test_added_classifiers_keep_their_weights_with_train_added_false():
    stacks, _ = _grown(train_added=False)
    assert len(stacks.optimizer.param_groups) == 1
    added = stacks.stacks["b"][1]
    assert not added.weight.requires_grad
    fresh = BoostedClassifiers(("a", "b"), "cls", 3, hidden=4, seed=1, train_added=False)
    fresh({"a": torch.zeros(1, 3), "b": torch.zeros(1, 5)})
    fresh.add("b")
    assert torch.equal(fresh.stacks["b"][1].weight, added.weight)  # still the initial draw


# -- the method -----------------------------------------------------------------------------------
def test_loss_terms_are_the_official_boosting_loss():
    trainer, batches = tiny_trainer(AUG())
    bal = trainer.balancer
    trainer.train_step(batches[0], 0, 0)
    bal.classifiers.add("b")
    batch = batches[1]
    output = bal.forward_step(trainer.model, batch)
    terms = bal.loss_terms(output, batch, CLS3)
    y = batch["target"]
    a, b = output.extras["aug.outputs"]["a"], output.extras["aug.outputs"]["b"]
    torch.testing.assert_close(terms[head_term("a")], F.cross_entropy(a.total, y))
    soft = F.one_hot(y, 3) * F.softmax(b.previous.detach(), dim=1)  # kl = y * o_fea.detach().softmax(1)
    official = (F.cross_entropy(b.total, y) + F.cross_entropy(b.previous, y) + F.cross_entropy(b.newest, y)
                - 0.5 * F.cross_entropy(b.newest, soft))
    torch.testing.assert_close(terms[head_term("b")], official)
    # the prediction is the merged ensemble: 1/2 each by default
    torch.testing.assert_close(output.prediction, 0.5 * a.total + 0.5 * b.total)


def test_the_weak_modality_receives_a_classifier_at_assignment_epochs_only():
    trainer, batches = tiny_trainer(AUG())
    bal = trainer.balancer
    trainer.train_step(batches[0], 0, 0)
    with torch.no_grad():
        bal.score_sums.copy_(torch.tensor([30.0, 20.0], dtype=torch.float64))  # ratio 1.5: b is weak
    start_epoch(trainer, 1, 30)  # after epoch 0: always
    assert bal.classifiers.counts() == {"a": 1, "b": 2} and bal.score_sums.abs().sum() == 0
    bal.score_sums.copy_(torch.tensor([10.0, 40.0], dtype=torch.float64))  # a is weak
    start_epoch(trainer, 2, 30)  # 30 epochs: interval 3; after epoch 1 none
    assert bal.classifiers.counts() == {"a": 1, "b": 2}
    bal.score_sums.copy_(torch.tensor([10.0, 40.0], dtype=torch.float64))
    start_epoch(trainer, 3, 30)  # after epoch 2: (2 + 1) % 3 == 0
    assert bal.classifiers.counts() == {"a": 2, "b": 2}
    assert bal.diagnostics()["classifiers/a"] == 2.0


def test_the_best_validation_state_restores_its_own_classifiers():
    result = short_fit(AUG(), "synthetic_cls2", epochs=4, batch_size=32)
    bal = result.trainer.balancer
    best = result.history[result.best_epoch]["diagnostics"]
    assert bal.classifiers.counts() == {m: int(best[f"classifiers/{m}"]) for m in bal.modalities}
    grown = result.history[-1]["diagnostics"]
    assert sum(grown[f"classifiers/{m}"] for m in bal.modalities) > 2  # classifiers were added


@pytest.mark.parametrize("ds_name", ["synthetic_cls2", "synthetic_cls3", "synthetic_seg4"])
def test_short_fit_on_every_declared_synthetic_task(ds_name):
    result = short_fit(AUG(), ds_name, epochs=3, batch_size=32)
    counts = result.trainer.balancer.classifiers.counts()
    assert set(counts) == set(result.trainer.balancer.modalities) and all(n >= 1 for n in counts.values())


def test_config_and_setup_errors():
    for bad in ({"lam": 0.0}, {"margin": -0.1}, {"eta": 1.5}, {"assign_every": 0},
                {"merge_weights": {"a": -1.0}}, {"classifier_hidden": 0}, {"head_lr": 0.0}):
        with pytest.raises(ConfigError, match=next(iter(bad))):
            METHODS.build("aug", None, **bad)
    splits, _ = tiny_splits()
    cfg = TrainConfig(batch_size=16, eval_modality_scores=False, cost_steps=0)
    with pytest.raises(ConfigError, match="merge_weights must name every modality"):
        Trainer(tiny_model(), AUG(AUGConfig(merge_weights={"a": 1.0})), CLS3, cfg, CPU)
    with pytest.raises(UnsupportedError, match="not task 'reg'"):
        Trainer(tiny_model(classes=1), AUG(), make_task("reg", 1), cfg, CPU)
    assert not AUG.supports(task="reg") and AUG.supports(task="seg", modalities=4)
    with pytest.raises(UnsupportedError):
        AUG().check_supported(DATASETS.build("synthetic_reg3").spec)


def test_merge_weights_are_normalised():
    trainer, batches = tiny_trainer(AUG(AUGConfig(merge_weights={"a": 2.0, "b": 3.0})))
    output = trainer.balancer.forward_step(trainer.model, batches[0])
    outs = output.extras["aug.outputs"]
    torch.testing.assert_close(output.prediction, 0.4 * outs["a"].total + 0.6 * outs["b"].total)
