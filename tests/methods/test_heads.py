"""Tests of the shared unimodal heads (mmbalance/methods/_heads.py)."""

from __future__ import annotations

import pytest
import torch

from mmbalance.errors import ConfigError, ShapeError
from mmbalance.methods._heads import UnimodalHeads
from mmbalance.models.features import feature_kind, pool_features

B = 3


def _features() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "vec": torch.randn(B, 5, generator=g),
        "seq": torch.randn(B, 4, 6, generator=g),
        "map": torch.randn(B, 7, 2, 2, generator=g),
    }


@pytest.mark.parametrize("task_name, k, expected", [("cls", 3, (B, 3)), ("reg", 1, (B, 1))])
def test_output_shapes_vector_sequence_map(task_name, k, expected):
    heads = UnimodalHeads(("vec", "seq", "map"), task_name, k, seed=1)
    out = heads(_features())
    assert heads.built
    assert {m: tuple(v.shape) for m, v in out.items()} == {m: expected for m in ("vec", "seq", "map")}


def test_segmentation_heads_upsample_to_target_size():
    feats = {"a": torch.randn(B, 7, 2, 2), "b": torch.randn(B, 5, 4, 4)}
    heads = UnimodalHeads(("a", "b"), "seg", 4, hidden=8, seed=1)
    out = heads(feats, out_size=(8, 8))
    assert tuple(out["a"].shape) == (B, 4, 8, 8) and tuple(out["b"].shape) == (B, 4, 8, 8)
    with pytest.raises(ShapeError, match="out_size"):
        heads(feats)
    with pytest.raises(ShapeError, match="map features"):
        UnimodalHeads(("a",), "seg", 4)({"a": torch.randn(B, 5)}, out_size=(8, 8))


def test_pooling_rules_by_hand():
    seq = torch.tensor([[[1.0, 2.0], [3.0, 6.0]]])
    assert torch.equal(pool_features(seq, "mean"), torch.tensor([[2.0, 4.0]]))
    assert torch.equal(pool_features(seq, "first"), torch.tensor([[1.0, 2.0]]))
    assert torch.equal(pool_features(seq, "last"), torch.tensor([[3.0, 6.0]]))
    fmap = torch.arange(8.0).reshape(1, 2, 2, 2)
    assert torch.equal(pool_features(fmap), torch.tensor([[1.5, 5.5]]))
    assert feature_kind(torch.zeros(2, 3)) == "vector"
    with pytest.raises(ShapeError, match="features\\['x'\\] has shape \\(2,\\)"):
        feature_kind(torch.zeros(2), "x")


def test_linear_head_is_a_plain_linear_map_of_the_pooled_feature():
    heads = UnimodalHeads(("seq",), "cls", 2, seed=3)
    f = torch.randn(B, 4, 6)
    out = heads({"seq": f})["seq"]
    lin = heads.heads["seq"].net
    torch.testing.assert_close(out, f.mean(1) @ lin.weight.T + lin.bias)


def test_building_draws_nothing_from_the_global_rng_and_is_seeded():
    state = torch.get_rng_state()
    a = UnimodalHeads(("vec", "seq"), "cls", 3, hidden=4, seed=5)
    a(_features())
    assert torch.equal(state, torch.get_rng_state())
    b = UnimodalHeads(("vec", "seq"), "cls", 3, hidden=4, seed=5)
    b(_features())
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert ka == kb
        if isinstance(va, torch.Tensor):
            assert torch.equal(va, vb)
    c = UnimodalHeads(("vec", "seq"), "cls", 3, hidden=4, seed=6)
    c(_features())
    assert not torch.equal(a.heads["vec"].net[0].weight, c.heads["vec"].net[0].weight)
    # different modalities get different initial weights even with equal widths
    d = UnimodalHeads(("x", "y"), "cls", 3, seed=5)
    d({"x": torch.zeros(B, 5), "y": torch.zeros(B, 5)})
    assert not torch.equal(d.heads["x"].net.weight, d.heads["y"].net.weight)


def test_state_dict_round_trip_builds_fresh_heads():
    trained = UnimodalHeads(("vec", "seq", "map"), "cls", 3, hidden=4, seed=1)
    feats = _features()
    expected = trained(feats)
    # runner snapshots clone them
    assert all(isinstance(v, torch.Tensor) for v in trained.state_dict().values())
    fresh = UnimodalHeads(("vec", "seq", "map"), "cls", 3, hidden=4, seed=99)
    assert not fresh.built
    fresh.load_state_dict(trained.state_dict())
    assert fresh.built
    got = fresh(feats)
    for m in expected:
        torch.testing.assert_close(got[m], expected[m], rtol=0, atol=0)
    other = UnimodalHeads(("vec", "seq", "map"), "cls", 3, hidden=4, seed=1)
    other({"vec": torch.zeros(B, 9), "seq": torch.zeros(B, 4, 6), "map": torch.zeros(B, 7, 2, 2)})
    with pytest.raises(ShapeError, match="layout"):
        other.load_state_dict(trained.state_dict())


def test_detach_controls_whether_the_head_loss_reaches_the_features():
    f = torch.randn(B, 5, requires_grad=True)
    out = UnimodalHeads(("a",), "reg", 1, detach=True)({"a": f})["a"]
    assert out.grad_fn is not None  # the head itself is trainable
    out.sum().backward()
    assert f.grad is None
    UnimodalHeads(("a",), "reg", 1, detach=False)({"a": f})["a"].sum().backward()
    assert f.grad is not None and f.grad.abs().sum() > 0


def test_width_change_and_bad_options_raise():
    heads = UnimodalHeads(("a",), "cls", 2)
    heads({"a": torch.randn(B, 5)})
    with pytest.raises(ShapeError, match="built for"):
        heads({"a": torch.randn(B, 6)})
    with pytest.raises(ShapeError, match="no modality 'b'"):
        UnimodalHeads(("b",), "cls", 2)({"a": torch.randn(B, 5)})
    with pytest.raises(ConfigError, match="sequence_pool"):
        UnimodalHeads(("a",), "cls", 2, sequence_pool="max")
    with pytest.raises(ConfigError, match="task_name"):
        UnimodalHeads(("a",), "det", 2)
    with pytest.raises(ConfigError, match="hidden"):
        UnimodalHeads(("a",), "cls", 2, hidden=0)


def test_own_step_through_a_disabled_scaler_updates_and_zeroes():
    heads = UnimodalHeads(("a",), "reg", 1, seed=0, optimizer_factory=torch.optim.SGD, lr=0.5)
    f = {"a": torch.randn(B, 5)}
    heads.step(torch.amp.GradScaler("cpu", enabled=False))  # before the heads are built: nothing
    assert heads.optimizer is None
    heads(f)
    before = heads.heads["a"].net.bias.detach().clone()
    heads(f)["a"].sum().backward()
    heads.step(torch.amp.GradScaler("cpu", enabled=False))
    # d(sum out)/d bias = B, so bias moves by -lr * B
    torch.testing.assert_close(heads.heads["a"].net.bias.detach(), before - 0.5 * B)
    assert heads.heads["a"].net.bias.grad is None
