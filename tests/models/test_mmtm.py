"""MMTM block: gates of each feature kind, the running-average gate under curation, lazy build from a
private generator, state round trip into an unbuilt block."""

from __future__ import annotations

import pytest
import torch

from mmbalance.errors import ConfigError, ShapeError
from mmbalance.models.mmtm import MMTM


@pytest.mark.parametrize(
    "shapes",
    [((3, 4), (3, 6)), ((3, 5, 4), (3, 2, 6)), ((3, 4, 2, 2), (3, 6, 3, 3)), ((3, 4), (3, 6, 2, 2))],
)
def test_mmtm_gates_each_feature_kind(shapes):
    state = torch.get_rng_state()
    mmtm = MMTM(ratio=4, seed=0)
    feats = tuple(torch.randn(s) for s in shapes)
    torch.set_rng_state(state)
    out = mmtm(feats)
    assert torch.equal(torch.get_rng_state(), state)  # built from a private generator
    for f, o in zip(feats, out, strict=True):
        assert o.shape == f.shape
        gate = o / f
        assert ((gate > 0) & (gate < 1)).all()
    assert mmtm.core.fc_squeeze.out_features == int(2 * (4 + 6) / 4)


def test_curation_replaces_the_cared_for_gate_by_its_running_average():
    mmtm = MMTM(ratio=2, seed=0)
    feats = (torch.randn(8, 4), torch.randn(8, 6))
    means = []
    for _ in range(3):
        out = mmtm(feats)
        means.append((out[0] / feats[0]).mean(0))
    torch.testing.assert_close(mmtm.running_gate_0, torch.stack(means).mean(0))
    assert mmtm.gate_steps.item() == 3
    out = mmtm(feats, curation=torch.tensor(True), caring=torch.tensor(0))
    expected_running = (3 * torch.stack(means).mean(0) + means[0]) / 4  # this step's gate enters first
    torch.testing.assert_close(out[0], feats[0] * expected_running)
    plain = mmtm(feats, curation=torch.tensor(False), caring=torch.tensor(0))
    torch.testing.assert_close(out[1], plain[1])  # the other modality keeps its live gate
    mmtm.eval()
    steps = mmtm.gate_steps.item()
    evaluated = mmtm(feats, curation=torch.tensor(True), caring=torch.tensor(0))
    assert mmtm.gate_steps.item() == steps  # no running-average update at eval
    torch.testing.assert_close(evaluated[1], plain[1])


def test_unbuilt_block_loads_a_trained_state_and_rejects_other_layouts():
    mmtm = MMTM(ratio=2, seed=0)
    feats = (torch.randn(8, 4, 3, 3), torch.randn(8, 5, 6))  # a map and a sequence
    for _ in range(2):
        mmtm(feats)
    fresh = MMTM(ratio=2, seed=1)
    fresh.load_state_dict(mmtm.state_dict())
    assert fresh.built and fresh.running_gate_1.shape == (6,)
    for k, v in mmtm.state_dict().items():
        assert torch.equal(fresh.state_dict()[k], v), k
    mmtm.eval()
    fresh.eval()
    for a, b in zip(mmtm(feats), fresh(feats), strict=True):
        assert torch.equal(a, b)
    with pytest.raises(ShapeError, match="built for features"):
        fresh((torch.randn(8, 4), torch.randn(8, 6)))
    with pytest.raises(ShapeError, match="features"):
        MMTM(ratio=2, seed=0)((torch.randn(8), torch.randn(8, 6)))
    with pytest.raises(ConfigError, match="ratio"):
        MMTM(ratio=0, seed=0)
    with pytest.raises(ConfigError, match="hidden width"):
        MMTM(ratio=100, seed=0)((torch.randn(2, 4), torch.randn(2, 6)))


def test_a_float64_model_gets_a_float64_block():
    mmtm = MMTM(ratio=2, seed=0)
    feats = (torch.randn(4, 4, dtype=torch.float64), torch.randn(4, 6, dtype=torch.float64))
    out = mmtm(feats)
    assert {p.dtype for p in mmtm.parameters()} == {torch.float64}
    assert mmtm.running_gate_0.dtype == out[0].dtype == out[1].dtype == torch.float64
    z = torch.relu(mmtm.core.fc_squeeze(torch.cat(feats, dim=1)))  # the gates, recomputed in float64
    torch.testing.assert_close(
        out[1], feats[1] * torch.sigmoid(mmtm.core.fc_excite[1](z)), rtol=1e-12, atol=0
    )
