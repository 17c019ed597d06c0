"""Parameter-shared unimodal predictions (ARL, DGL): zero-padded passes by hand, constant parameters,
BatchNorm running statistics left untouched."""

from __future__ import annotations

import torch
from torch import nn

from mmbalance.methods._shared_unimodal import frozen_running_stats, shared_unimodal_predictions
from mmbalance.models.base import Head, MultimodalModel

from ..conftest import ConcatFusion


def _linear_concat_model():
    # encoders are identities on a (B, 2) and b (B, 1); fusion = concat(a, b); head = Linear(3, 2)
    head = Head(nn.Identity(), nn.Linear(3, 2))
    with torch.no_grad():
        head.out_layer.weight.copy_(torch.tensor([[1.0, 0.0, 2.0], [0.0, 1.0, -1.0]]))
        head.out_layer.bias.copy_(torch.tensor([0.5, -0.5]))
    return MultimodalModel({"a": nn.Identity(), "b": nn.Identity()}, ConcatFusion(), head)


def test_zero_padded_predictions_by_hand():
    model = _linear_concat_model()
    features = {"a": torch.tensor([[1.0, 2.0]]), "b": torch.tensor([[3.0]])}
    out = shared_unimodal_predictions(model, features)
    # a alone: W[:, :2] @ (1, 2) + b = (1, 2) + (0.5, -0.5) = (1.5, 1.5)
    torch.testing.assert_close(out["a"], torch.tensor([[1.5, 1.5]]))
    # b alone: W[:, 2] * 3 + b = (6, -3) + (0.5, -0.5) = (6.5, -3.5)
    torch.testing.assert_close(out["b"], torch.tensor([[6.5, -3.5]]))


def test_detached_parameters_pass_gradients_to_the_features_only():
    model = _linear_concat_model()
    a = torch.tensor([[1.0, 2.0]], requires_grad=True)
    b = torch.tensor([[3.0]], requires_grad=True)
    out = shared_unimodal_predictions(model, {"a": a, "b": b}, detach_params=True)
    (out["a"].sum() + out["b"].sum()).backward()
    assert model.head.out_layer.weight.grad is None and model.head.out_layer.bias.grad is None
    # d(sum of a's prediction)/da = column sums of W[:, :2] = (1, 1); for b: 2 - 1 = 1
    torch.testing.assert_close(a.grad, torch.tensor([[1.0, 1.0]]))
    torch.testing.assert_close(b.grad, torch.tensor([[1.0]]))
    out = shared_unimodal_predictions(model, {"a": a, "b": b})
    out["a"].sum().backward()
    # without detaching, the head learns from the pass: d/dW[0] = (1, 2, 0) (b's slot is zero)
    torch.testing.assert_close(model.head.out_layer.weight.grad[0], torch.tensor([1.0, 2.0, 0.0]))


def test_batch_norm_normalises_the_batch_but_keeps_its_running_statistics():
    torch.manual_seed(0)
    bn = nn.BatchNorm1d(3).train()
    bn.running_mean.fill_(0.25)
    x = torch.randn(8, 3)
    reference = nn.BatchNorm1d(3).train()(x)  # batch statistics, fresh affine (1, 0)
    with frozen_running_stats(bn):
        y = bn(x)
    torch.testing.assert_close(y, reference)
    assert torch.equal(bn.running_mean, torch.full((3,), 0.25))
    assert torch.equal(bn.running_var, torch.ones(3)) and int(bn.num_batches_tracked) == 0
    assert bn.momentum == 0.1
    bn(x)  # outside the block the statistics move again
    assert not torch.equal(bn.running_mean, torch.full((3,), 0.25))
