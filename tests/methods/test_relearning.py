"""Diagnosing & Re-learning: min-max scaling, purity, k-means and the soft re-initialisation by hand;
k-means against scikit-learn; the diagnosis on train vs val features; lambda=0 == joint; resume."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from mmbalance.balancer import EpochContext
from mmbalance.datasets.base import DatasetSpec, TensorDictDataset
from mmbalance.errors import ConfigError, UnsupportedError
from mmbalance.methods import METHODS
from mmbalance.methods._kmeans import kmeans, minmax_scale, purity
from mmbalance.methods.relearning import (
    Relearning,
    RelearningConfig,
    reinit_due,
    reinit_strength,
    soft_reinit_,
)
from mmbalance.models.base import Head, MultimodalModel
from mmbalance.tasks import make_task
from mmbalance.testing import check_state_round_trip
from mmbalance.train import TrainConfig, batch_to_device, fit, make_loader, make_optimizer_factory

from ..conftest import ConcatFusion, tiny_model, tiny_splits
from ._helpers import assert_fits_like_joint, short_fit

CPU = torch.device("cpu")


# -- the arithmetic by hand ---------------------------------------------------------------------------
def test_minmax_scale_by_hand():
    # column 0: min 0, max 4 -> (x - 0) / 4 * 2 - 1 = -1, 0, 1; column 1 constant: range taken as 1 -> -1
    x = torch.tensor([[0.0, 5.0], [2.0, 5.0], [4.0, 5.0]])
    torch.testing.assert_close(minmax_scale(x), torch.tensor([[-1.0, -1.0], [0.0, -1.0], [1.0, -1.0]]))


def test_purity_by_hand():
    # cluster 0 holds labels {0, 1}: majority 1 sample; cluster 1 holds {1, 1, 0}: majority 2 -> 3 / 5
    assert purity(torch.tensor([0, 1, 1, 1, 0]), torch.tensor([0, 0, 1, 1, 1])) == pytest.approx(0.6)
    # label and cluster ids need not be contiguous (purity_score re-maps the labels)
    assert purity(torch.tensor([7, 3, 3, 3, 7]), torch.tensor([5, 5, 2, 2, 2])) == pytest.approx(0.6)
    assert purity(torch.tensor([0, 1, 2]), torch.tensor([4, 4, 4])) == pytest.approx(1 / 3)


def test_kmeans_by_hand():
    # two pairs on a line: centres 0.05 and 10.05, inertia 4 * 0.05^2 = 0.01
    x = torch.tensor([[0.0], [0.1], [10.0], [10.1]], dtype=torch.float64)
    labels, inertia = kmeans(x, 2, torch.Generator().manual_seed(0))
    assert labels[0] == labels[1] != labels[2] == labels[3]
    assert inertia.item() == pytest.approx(0.01)
    with pytest.raises(ConfigError, match="N >= 5"):
        kmeans(x, 5, torch.Generator().manual_seed(0))


def test_reinit_rule_and_strength_by_hand():
    # ours.py: (epoch % reinit_epoch == 0) & (epoch > 0), 0-based
    assert [e for e in range(61) if reinit_due(e, 20)] == [20, 40, 60]
    # purity 0.9 (train) vs 0.6 (val), lambda 3: alpha = tanh(3 * 0.3) = tanh(0.9) = 0.7162978702
    assert reinit_strength(0.9, 0.6, 3.0) == pytest.approx(0.7162978702)
    assert reinit_strength(0.6, 0.9, 3.0) == pytest.approx(0.7162978702)  # |gap|
    # theta = (2, -4), theta_init = (0, 1), alpha = 0.25: 0.25 * init + 0.75 * theta = (1.5, -2.75)
    theta = nn.Parameter(torch.tensor([2.0, -4.0]))
    soft_reinit_([theta], [torch.tensor([0.0, 1.0])], 0.25)
    torch.testing.assert_close(theta.detach(), torch.tensor([1.5, -2.75]))


def test_kmeans_matches_scikit_learn_on_separated_blobs():
    sklearn_cluster = pytest.importorskip("sklearn.cluster")
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(5, 8, generator=g) * 10
    y = torch.arange(200) % 5
    x = centres[y] + torch.randn(200, 8, generator=g)
    ours, inertia = kmeans(x, 5, torch.Generator().manual_seed(0), n_init=3)
    ref = sklearn_cluster.KMeans(n_clusters=5, random_state=0, n_init=3).fit(x.numpy())
    assert purity(y, ours) == 1.0 == purity(y, torch.as_tensor(ref.labels_))
    assert inertia.item() == pytest.approx(float(ref.inertia_), rel=1e-5)


def test_kmeans_ends_at_a_lloyd_fixed_point():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(300, 4, generator=g, dtype=torch.float64)
    labels, inertia = kmeans(x, 4, torch.Generator().manual_seed(0))
    centres = torch.stack([x[labels == k].mean(0) for k in range(4)])
    assert torch.equal(torch.cdist(x, centres).argmin(1), labels)  # every point at its nearest centre
    assert inertia.item() == pytest.approx(((x - centres[labels]) ** 2).sum().item())


# -- the diagnosis and the re-initialisation --------------------------------------------------------
def _identity_model():
    # encoders Linear(2, 2) = identity (features = inputs), so the clustered features are known
    encoders = {m: nn.Linear(2, 2) for m in ("a", "b")}
    with torch.no_grad():
        for enc in encoders.values():
            enc.weight.copy_(torch.eye(2))
            enc.bias.zero_()
    return MultimodalModel(encoders, ConcatFusion(), Head(nn.Identity(), nn.Linear(4, 3)))


def _separated(n, g, constant_b=False):
    # three classes 10 apart, noise 0.1; modality b of the validation set carries nothing (constant)
    y = torch.arange(n) % 3
    centres = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    a = centres[y] + 0.1 * torch.randn(n, 2, generator=g)
    b = torch.ones(n, 2) if constant_b else centres[y] + 0.1 * torch.randn(n, 2, generator=g)
    return TensorDictDataset({"a": a, "b": b, "target": y})


def test_diagnosis_pulls_back_only_the_encoder_whose_val_purity_drops():
    g = torch.Generator().manual_seed(0)
    train, val = _separated(48, g), _separated(48, g, constant_b=True)
    model, task = _identity_model(), make_task("cls", 3)
    bal = Relearning(RelearningConfig(move_lambda=3.0, reinit_epoch=2))
    bal.setup(model, task, make_optimizer_factory(TrainConfig()))
    with torch.no_grad():  # "training" since the start: a's encoder x3, b's x2 (still separable)
        model.encoders["a"].weight.mul_(3.0)
        model.encoders["b"].weight.mul_(2.0)
    cfg = TrainConfig(batch_size=16)
    rng = torch.get_rng_state()
    for epoch in (1, 2, 3):  # only the start of epoch 3 follows a due epoch (2)
        bal.on_train_epoch_start(EpochContext(
            model=model, epoch=epoch, num_epochs=4, train_loader=make_loader(train, cfg, CPU, train=True),
            val_loader=make_loader(val, cfg, CPU, train=False), task=task, device=CPU,
            optimizer=None, to_device=lambda b: batch_to_device(b, CPU)))
    assert torch.equal(rng, torch.get_rng_state())  # the diagnosis draws nothing from the main stream
    stats = bal.diagnostics()
    # a: purity 1 on train and val -> alpha 0, unchanged; b: 1 on train, 1/3 on the constant val set
    # (one cluster holds all 16 + 16 + 16) -> alpha = tanh(3 * 2/3) = tanh(2) = 0.9640275801
    assert stats["purity_train/a"] == stats["purity_val/a"] == stats["purity_train/b"] == 1.0
    assert stats["purity_val/b"] == pytest.approx(1 / 3)
    assert stats["alpha/a"] == 0.0 and stats["alpha/b"] == pytest.approx(0.9640275801)
    assert stats["reinits"] == 1.0
    torch.testing.assert_close(model.encoders["a"].weight, 3.0 * torch.eye(2))
    # b: alpha * I + (1 - alpha) * 2I = (2 - alpha) I
    torch.testing.assert_close(model.encoders["b"].weight, (2.0 - 0.9640275801) * torch.eye(2))
    assert model.training  # eval mode only inside the diagnosis


def test_reinit_num_caps_the_diagnoses_across_a_saved_state():
    bal = Relearning(RelearningConfig(reinit_epoch=1, reinit_num=2))
    model = tiny_model()
    bal.setup(model, make_task("cls", 3), make_optimizer_factory(TrainConfig()))
    bal.load_host_state({"diagnoses": 2})  # both allowed re-initialisations already done
    before = [p.detach().clone() for p in model.parameters()]
    bal.on_train_epoch_start(EpochContext(
        model=model, epoch=5, num_epochs=9, train_loader=None, val_loader=None, task=bal.task, device=CPU,
        optimizer=None, to_device=lambda b: b))  # would fail on the missing loaders if it diagnosed
    assert bal.host_state() == {"diagnoses": 3}
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


def test_lambda0_reproduces_joint_exactly():
    # diagnoses after epochs 1 and 2 run (eval mode, isolated RNG) but alpha = tanh(0) = 0
    cfg = TrainConfig(epochs=4, batch_size=16, eval_modality_scores=False, cost_steps=0)
    neutral = Relearning(RelearningConfig(move_lambda=0.0, reinit_epoch=1, reinit_num=2))
    result = assert_fits_like_joint(neutral, cfg)
    diagnosed = [h["diagnostics"] for h in result.history]
    assert [d["reinits"] for d in diagnosed] == [0.0, 0.0, 1.0, 2.0]
    assert "purity_val/a" in diagnosed[2] and diagnosed[2]["alpha/a"] == 0.0


def test_resume_restores_the_initial_weights():
    # a re-initialisation right after the resumed step (epoch 2 starts after the due epoch 1): the
    # resumed trainer was built from other initial weights, so it must take them from the state
    assert check_state_round_trip("relearning", "synthetic_cls2", options={"reinit_epoch": 1}) is None


def test_config_errors_and_unsupported_task():
    bad = (("move_lambda", -1.0), ("move_lambda", math.inf), ("reinit_epoch", 0), ("reinit_num", -1),
           ("n_init", 0), ("sequence_pool", "max"))
    for key, value in bad:
        with pytest.raises(ConfigError, match=key):
            METHODS.build("relearning", None, **{key: value})
    assert not METHODS.get("relearning").supports(task="seg")
    with pytest.raises(UnsupportedError, match="relearning"):
        spec = DatasetSpec(task="seg", modalities={"a": (4,), "b": (3,)}, num_outputs=3)
        splits, _ = tiny_splits()
        fit(tiny_model(), Relearning(), splits, spec, make_task("cls", 3), TrainConfig(cost_steps=0), CPU)


@pytest.mark.parametrize("dataset", ["synthetic_cls2", "synthetic_cls3", "synthetic_reg3"])
def test_fit_on_each_synthetic_task(dataset):
    result = short_fit("relearning", dataset, samples=64, epochs=3, reinit_epoch=1)
    stats = result.history[2]["diagnostics"]  # epoch 2 starts with the diagnosis of epoch 1
    assert stats["reinits"] == 1.0
    for m in result.trainer.model.modalities:
        assert 0.0 < stats[f"purity_train/{m}"] <= 1.0 and 0.0 < stats[f"purity_val/{m}"] <= 1.0
        assert stats[f"alpha/{m}"] == pytest.approx(reinit_strength(
            stats[f"purity_train/{m}"], stats[f"purity_val/{m}"], 3.0))
