"""Remix: the KL to uniform, the hardest-modality rule and the re-assembled schedule by hand; the
decoupling pass; remixed steps (batch replaced, other modalities zeroed); the neutral setting ==
joint; a resume inside a remixing epoch; config errors; short fits."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from mmbalance.balancer import EpochContext
from mmbalance.datasets import DATASETS
from mmbalance.errors import ConfigError, UnsupportedError
from mmbalance.methods import METHODS
from mmbalance.methods._heads import head_term
from mmbalance.methods.joint import Joint
from mmbalance.methods.remix import Remix, RemixConfig, hardest_modality, kl_to_uniform, remix_schedule
from mmbalance.tasks import make_task
from mmbalance.testing import check_state_round_trip
from mmbalance.train import TrainConfig, Trainer, batch_to_device, make_loader

from ..conftest import tiny_model, tiny_splits
from ._helpers import assert_same_parameters, short_fit, train_steps

CPU = torch.device("cpu")
CFG = TrainConfig(batch_size=16, eval_modality_scores=False, cost_steps=0)


# -- the arithmetic by hand ------------------------------------------------------------------------
def test_kl_to_uniform_by_hand():
    # uniform: 0; (0.75, 0.25): 0.75 log2(1.5) + 0.25 log2(0.5) = 0.4387219 - 0.25 = 0.1887219
    kl = kl_to_uniform(torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0]]))
    torch.testing.assert_close(kl, torch.tensor([0.0, 0.1887219]))
    # K = 1000, one class certain: p = (1, e^-60, ...) clipped to (1, 1e-9, ...), not renormalised:
    # log2(1000) + 999·1e-9·log2(1e-9·1000) = 9.9657843 - 999e-9·19.9315686 = 9.9657644 (unclipped:
    # 9.9657843, 2e-5 away)
    certain = torch.full((1, 1000), -30.0)
    certain[0, 0] = 30.0
    assert kl_to_uniform(certain).item() == pytest.approx(9.9657644, abs=5e-6)  # float32 sums
    # a (1, 2, 1, 2) map: pixels (0, 0) and (ln 3, 0): mean of 0 and 0.1887219
    pixels = torch.tensor([[0.0, math.log(3.0)], [0.0, 0.0]]).reshape(1, 2, 1, 2)
    torch.testing.assert_close(kl_to_uniform(pixels), torch.tensor([0.0943609]))


def test_hardest_modality_by_hand():
    # sample 0: a 0.1 < v 0.2 -> a; sample 1: v; sample 2: a tie goes to the later modality (video)
    kl = torch.tensor([[0.1, 0.5, 0.3], [0.2, 0.4, 0.3]])
    assert hardest_modality(kl).tolist() == [0, 1, 1]
    three = torch.tensor([[0.2, 0.1, 0.5], [0.2, 0.3, 0.5], [0.9, 0.3, 0.4]])
    assert hardest_modality(three).tolist() == [1, 0, 2]


def _sizes(schedule):
    return [(m, b.numel()) for m, b in schedule]


def test_remix_schedule_by_hand():
    g = torch.Generator().manual_seed(0)
    assignment = torch.tensor([0, 1, 1, 0, 1])
    schedule = remix_schedule(assignment, [1, 0], 2, g, max_batches=3)  # ceil(5 / 2) = 3: fits
    assert _sizes(schedule) == [(1, 2), (1, 1), (0, 2)]  # the second modality's subset first
    assert sorted(torch.cat([b for m, b in schedule if m == 1]).tolist()) == [1, 2, 4]
    assert sorted(torch.cat([b for m, b in schedule if m == 0]).tolist()) == [0, 3]
    # 3 + 3 samples in batches of 2: 2 + 2 batches > ceil(6 / 2) = 3, so the last subset's partial
    # batch joins its previous one
    six = torch.tensor([0, 0, 0, 1, 1, 1])
    assert _sizes(remix_schedule(six, [1, 0], 2, g, max_batches=3)) == [(1, 2), (1, 1), (0, 3)]
    assert _sizes(remix_schedule(six, [1, 0], 2, g, max_batches=None)) == [(1, 2), (1, 1), (0, 2), (0, 1)]
    # subsets smaller than a batch cannot merge: more batches than the runner's epoch
    assert _sizes(remix_schedule(torch.tensor([0, 1, 1]), [1, 0], 4, g, max_batches=1)) == [(1, 2), (0, 1)]
    # an empty subset has no batch
    assert _sizes(remix_schedule(torch.tensor([0, 0, 0]), [1, 0], 2, g, max_batches=2)) == [(0, 2), (0, 1)]
    # shuffled by the generator: the same seed, the same schedule
    a = remix_schedule(assignment, [1, 0], 2, torch.Generator().manual_seed(3), 3)
    b = remix_schedule(assignment, [1, 0], 2, torch.Generator().manual_seed(3), 3)
    assert all(x[0] == y[0] and torch.equal(x[1], y[1]) for x, y in zip(a, b, strict=True))


# -- the method on the tiny problem ----------------------------------------------------------------
def _trainer(cfg: RemixConfig, seed=0):
    splits, _ = tiny_splits()
    torch.manual_seed(seed)
    trainer = Trainer(tiny_model(seed=seed), Remix(cfg), make_task("cls", 3), CFG, CPU, steps_per_epoch=3)
    loader = make_loader(splits["train"], CFG, CPU, train=True)
    return trainer, splits, [batch_to_device(b, CPU) for b in loader]


def _epoch_start(trainer, splits, epoch):
    trainer.balancer.on_train_epoch_start(EpochContext(
        model=trainer.model, epoch=epoch, num_epochs=10, task=trainer.task, device=CPU,
        train_loader=make_loader(splits["train"], CFG, CPU, train=True),
        val_loader=make_loader(splits["val"], CFG, CPU, train=False),
        optimizer=trainer.optimizer, to_device=lambda b: batch_to_device(b, CPU),
    ))


def test_decoupling_assigns_every_sample_to_its_least_confident_modality():
    trainer, splits, batches = _trainer(RemixConfig(warmup=1))
    bal = trainer.balancer
    _epoch_start(trainer, splits, 0)
    for i, b in enumerate(batches):
        trainer.train_step(b, 0, i)
    state, flags = torch.get_rng_state(), [m.training for m in trainer.model.modules()]
    _epoch_start(trainer, splits, 1)
    assert torch.equal(state, torch.get_rng_state())
    assert flags == [m.training for m in trainer.model.modules()]
    data = splits["train"].tensors
    with torch.no_grad():  # independently: eval-mode heads on the whole training set
        trainer.model.eval()
        bal.heads.eval()
        features, _ = trainer.model.encode(data)
        kl = []
        for m in ("a", "b"):
            p = F.softmax(bal.heads(features)[m], dim=1).clamp(1e-9, 1.0)
            kl.append((p * torch.log2(p / (1.0 / 3))).sum(dim=1))
        trainer.model.train()
        bal.heads.train()
    expected = torch.where(kl[0] < kl[1], 0, 1)
    assert torch.equal(bal._assignment, expected)
    assert bal.assign_batches == 3
    shares = bal.diagnostics()
    assert shares["remix/share/a"] == pytest.approx((expected == 0).float().mean().item())


def test_remixed_steps_train_one_modality_on_its_subset():
    trainer, splits, batches = _trainer(RemixConfig(warmup=1, gamma=2.0))
    bal = trainer.balancer
    _epoch_start(trainer, splits, 1)
    schedule = bal._schedule()
    assert len(schedule) == 3  # 48 samples in batches of 16: the runner's three steps
    assert sorted(torch.cat([b for _, b in schedule]).tolist()) == list(range(48))  # each sample once
    seen = []
    original = trainer.model.forward

    def spy(batch, drop=()):
        seen.append((batch, tuple(drop)))
        return original(batch, drop)

    trainer.model.forward = spy
    data = splits["train"].tensors
    for i, b in enumerate(batches):
        output = bal.forward_step(trainer.model, b)
        terms = bal.loss_terms(output, b, trainer.task)
        index, indices = schedule[i]
        batch, drop = seen[-1]
        active = bal.modalities[index]
        assert drop == tuple(m for m in bal.modalities if m != active)
        assert torch.equal(batch["target"], data["target"][indices])  # the runner's batch is replaced
        other = next(m for m in bal.modalities if m != active)
        assert terms[head_term(other)].item() == 0.0
        head = bal.heads(output.features)[active]
        torch.testing.assert_close(terms[head_term(active)], 2.0 * F.cross_entropy(head, batch["target"]))
    del trainer.model.forward
    assert bal.diagnostics()["remix/left_out"] == 0.0
    # the zeroed modality's encoder receives no gradient
    trainer.optimizer.zero_grad(set_to_none=True)
    bal._position = 0
    trainer.train_step(batches[0], 1, 0)
    inactive = bal.modalities[1 - schedule[1][0]]
    assert all(p.grad is None for p in trainer.model.encoders[inactive].parameters())


def test_neutral_setting_alpha0_without_remixing_reproduces_joint_exactly():
    remix, splits, batches = _trainer(RemixConfig(alpha=0.0, warmup=100))
    joint = Trainer(tiny_model(seed=0), Joint(), make_task("cls", 3), CFG, CPU, steps_per_epoch=3)
    for epoch in range(2):
        _epoch_start(remix, splits, epoch)
        train_steps(batches, epoch, joint, remix)
    assert_same_parameters(joint.model, remix.model)
    assert remix.balancer.heads.built


@pytest.mark.parametrize("ds_name", ["synthetic_cls2", "synthetic_seg4"])
def test_resume_inside_a_remixing_epoch_continues_identically(ds_name):
    """The contract resume test, with remixing from epoch 1: the checkpoint lies inside a remixing
    epoch, the resumed trainer's own decoupling (other weights) is replaced by the saved one."""
    assert check_state_round_trip("remix", ds_name, options={"warmup": 1}) is None


def test_config_and_setup_errors():
    for bad in ({"alpha": -1.0}, {"gamma": float("nan")}, {"warmup": -1}, {"head_hidden": 0}):
        with pytest.raises(ConfigError, match=next(iter(bad))):
            METHODS.build("remix", None, **bad)
    with pytest.raises(UnsupportedError, match="not task 'reg'"):
        Trainer(tiny_model(classes=1), Remix(), make_task("reg", 1), CFG, CPU)
    with pytest.raises(UnsupportedError):
        Remix().check_supported(DATASETS.build("synthetic_reg3").spec)
    trainer, _, batches = _trainer(RemixConfig(warmup=0))
    trainer.balancer._epoch = 0
    with pytest.raises(ConfigError, match="before its on_train_epoch_start"):
        trainer.train_step(batches[0], 0, 0)


@pytest.mark.parametrize("ds_name", ["synthetic_cls2", "synthetic_cls3", "synthetic_seg4"])
def test_short_fit_on_every_declared_synthetic_task(ds_name):
    result = short_fit(Remix(RemixConfig(warmup=1)), ds_name, epochs=3, batch_size=32)
    diag = result.history[-1]["diagnostics"]
    assert sum(diag[f"remix/share/{m}"] for m in result.trainer.balancer.modalities) == pytest.approx(1.0)
    assert diag["remix/assign_batches"] > 0
