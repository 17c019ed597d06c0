"""MRD: drop rates by hand (p/M and p - p^M/M), at least one modality kept, masked fusion, p=0 == joint."""

from __future__ import annotations

import pytest
import torch

from mmbalance.errors import ConfigError
from mmbalance.methods import METHODS
from mmbalance.methods.mrd import MRD, MRDConfig, modality_keep_mask

from ._helpers import assert_same_parameters, joint_and, tiny_trainer, train_steps

CPU = torch.device("cpu")
N = 200_000


@pytest.mark.parametrize(
    "mode, p, m, expected",
    [
        ("one", 0.5, 2, 0.25),  # p / M
        ("one", 0.9, 3, 0.3),
        ("independent", 0.5, 2, 0.375),  # p - p^M / M = 0.5 - 0.25 / 2
        ("independent", 0.8, 3, 0.8 - 0.512 / 3),
    ],
)
def test_drop_rates_match_the_hand_computed_probabilities(mode, p, m, expected):
    keep = modality_keep_mask(N, m, p, mode, generator=torch.Generator().manual_seed(0))
    assert keep.shape == (N, m) and keep.dtype == torch.bool
    assert keep.any(dim=1).all()  # never every modality of a sample
    rates = (~keep).float().mean(dim=0)
    torch.testing.assert_close(rates, torch.full((m,), expected), atol=0.005, rtol=0)
    if mode == "one":
        assert ((~keep).sum(dim=1) <= 1).all()


def test_extremes_and_bad_input():
    assert modality_keep_mask(64, 2, 0.0, "independent").all()
    full = modality_keep_mask(64, 3, 1.0, "independent")  # every row keeps exactly the restored one
    assert (full.sum(dim=1) == 1).all()
    with pytest.raises(ConfigError, match="at least 2"):
        modality_keep_mask(4, 1, 0.5, "one")
    with pytest.raises(ConfigError, match="p must be in"):
        METHODS.build("mrd", None, p=1.5)
    with pytest.raises(ConfigError, match="mode"):
        METHODS.build("mrd", None, mode="all")


def test_forward_zeroes_exactly_the_dropped_features_per_sample():
    trainer, batches = tiny_trainer(MRD(MRDConfig(p=1.0, mode="one")))
    model, bal = trainer.model, trainer.balancer
    batch = batches[0]
    torch.manual_seed(3)
    out = bal.forward_step(model, batch)
    torch.manual_seed(3)
    keep = modality_keep_mask(16, 2, 1.0, "one")
    features, extras = model.encode(batch)
    expected = model.fuse(
        {m: torch.where(keep[:, i, None], f, 0.0) for i, (m, f) in enumerate(features.items())}, extras
    )
    torch.testing.assert_close(out.prediction, expected.prediction)
    assert torch.equal(out.features["a"], features["a"])  # features stay un-dropped
    out.prediction.sum().backward()
    enc_a = model.encoders["a"][0].weight.grad
    assert enc_a is not None  # samples keeping 'a' still train its encoder


def test_p0_reproduces_joint_exactly_and_diagnostics_count_drops():
    joint, mrd, batches = joint_and(MRD(MRDConfig(p=0.0)))
    train_steps(batches, 0, joint, mrd)
    assert_same_parameters(joint.model, mrd.model)
    dropping, batches = tiny_trainer(MRD(MRDConfig(p=1.0, mode="one")))
    train_steps(batches, 0, dropping)
    diag = dropping.balancer.diagnostics()
    assert set(diag) == {"dropped/a", "dropped/b"}
    assert diag["dropped/a"] + diag["dropped/b"] == pytest.approx(1.0)  # exactly one per sample
