"""MLA: projection and fusion weights by hand; one step against a literal sequential reference."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from mmbalance.errors import ConfigError, ShapeError, UnsupportedError
from mmbalance.methods import METHODS
from mmbalance.methods.mla import (
    MLA,
    MLAConfig,
    batch_entropy_weights,
    entropy_weights,
    fuse_logits,
    project_gradient_,
)

from ..conftest import tiny_model, tiny_splits
from ._helpers import tiny_trainer

CPU = torch.device("cpu")
T = torch.tensor


def test_projection_by_hand():
    # P = I, r = (1, 0), alpha = 0.1: k = (1, 0); P <- I - diag(1, 0) / 1.1 = diag(1/11, 1)
    # |P|_F = sqrt(1/121 + 1); grad (2, 3) @ P^T = (2/11, 3) / |P|_F: the component along r shrinks 11x
    projector = torch.eye(2)
    grad = T([[2.0, 3.0]])
    project_gradient_(projector, grad, T([1.0, 0.0]), alpha=0.1)
    norm = math.sqrt(1 / 121 + 1)
    torch.testing.assert_close(projector, torch.diag(T([1 / 11, 1.0])) / norm)
    torch.testing.assert_close(grad, T([[2 / 11, 3.0]]) / norm)
    # a 1x1 conv weight gradient (K, d, 1, 1) is projected the same way
    conv_grad = T([[2.0, 3.0]]).reshape(1, 2, 1, 1)
    project_gradient_(torch.eye(2), conv_grad, T([1.0, 0.0]), alpha=0.1)
    torch.testing.assert_close(conv_grad.reshape(1, 2), T([[2 / 11, 3.0]]) / norm)


def test_entropy_fusion_weights_by_hand():
    # f_a = (0, 0): H = ln 2; f_b = (ln 3, 0): p = (.75, .25), H = -(.75 ln .75 + .25 ln .25)
    fa, fb = T([[0.0, 0.0]]), T([[math.log(3.0), 0.0]])
    h_a, h_b = math.log(2.0), -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    gate_b = math.exp(h_a - h_b)  # the more certain modality gets exp(max H - H_b) > 1
    w = entropy_weights({"a": fa, "b": fb})
    assert w["a"].item() == pytest.approx(1 / (1 + gate_b))
    assert w["b"].item() == pytest.approx(gate_b / (1 + gate_b))
    torch.testing.assert_close(fuse_logits({"a": fa, "b": fb}, w), w["a"] * fa + w["b"] * fb)
    # float64 logits keep float64 weights and fusion (to 1e-12; a float32 cast is off by ~1e-8)
    logits64 = {
        "a": torch.zeros(1, 2, dtype=torch.float64),
        "b": torch.tensor([[math.log(3.0), 0.0]], dtype=torch.float64),
    }
    w64 = entropy_weights(logits64)
    assert w64["b"].dtype == torch.float64
    assert w64["b"].item() == pytest.approx(gate_b / (1 + gate_b), rel=1e-12, abs=0)
    fused = fuse_logits(logits64, w64)
    expected = (gate_b / (1 + gate_b)) * math.log(3.0)
    assert fused.dtype == torch.float64 and fused[0, 0].item() == pytest.approx(expected, rel=1e-12, abs=0)
    # the released code: softmax over the batch (dim 0), entropy summed over the whole tensor
    ba, bb = torch.zeros(2, 2), T([[math.log(3.0), 0.0], [0.0, 0.0]])
    hb_a, hb_b = 2 * math.log(2.0), h_b + math.log(2.0)
    wb = batch_entropy_weights({"a": ba, "b": bb})
    g = math.exp(hb_a - hb_b)
    assert wb["a"].dim() == 0 and wb["b"].item() == pytest.approx(g / (1 + g))
    # per-pixel weights for segmentation logits
    maps = {"a": torch.zeros(2, 4, 3, 3), "b": torch.ones(2, 4, 3, 3)}
    assert entropy_weights(maps)["a"].shape == (2, 1, 3, 3)


def _trainer(config: MLAConfig, seed: int = 0):
    trainer, batches = tiny_trainer(MLA(config), seed, optimizer="sgd", lr=0.1)
    return trainer, batches[0], trainer.task


@pytest.mark.parametrize("projection", [True, False])
def test_one_step_matches_the_sequential_official_loop(projection):
    trainer, batch, task = _trainer(MLAConfig(projection=projection))
    model, balancer = trainer.model, trainer.balancer
    # reference, built before the step: same weights, the literal loop of main.py (gs_flag)
    with torch.no_grad():
        balancer.head({"shared": model.encode(batch)[0]["a"]})  # build the shared head
    ref_model, ref_head = copy.deepcopy(model), copy.deepcopy(balancer.head)
    layer = ref_head.heads["shared"].net
    head_opt = torch.optim.SGD(ref_head.parameters(), lr=0.1, momentum=0.9)
    enc_opt = torch.optim.SGD([p for p in ref_model.parameters()], lr=0.1, momentum=0.9)
    projector, updates = torch.eye(8), 0
    features, _ = ref_model.encode(batch)
    for m in ("a", "b"):
        loss = task.loss(ref_head({"shared": features[m]})["shared"], batch["target"])
        loss.backward()
        if projection and updates > 0:
            project_gradient_(projector, layer.weight.grad, features[m].detach().mean(dim=0), alpha=0.1)
        head_opt.step()
        head_opt.zero_grad(set_to_none=True)
        updates += 1
    enc_opt.step()

    trainer.train_step(batch, 0, 0)
    for p, q in zip(model.parameters(), ref_model.parameters(), strict=True):
        torch.testing.assert_close(p, q)
    for p, q in zip(balancer.head.parameters(), ref_head.parameters(), strict=True):
        torch.testing.assert_close(p, q)
    assert int(balancer.head_updates) == 2
    assert all(p.grad is None for p in model.shared_parameters())  # no joint loss: fusion and head untouched


def test_fp16_scaler_unequal_widths_and_config_errors():
    trainer, batch, task = _trainer(MLAConfig())
    trainer.scaler = torch.amp.GradScaler("cpu", enabled=True)
    with pytest.raises(UnsupportedError, match="fp16"):
        trainer.train_step(batch, 0, 0)
    splits, _ = tiny_splits()
    balancer = MLA()
    model = tiny_model(hidden=8)
    model.encoders["b"] = torch.nn.Sequential(torch.nn.Linear(3, 5), torch.nn.ReLU())
    balancer.setup(model, task, lambda p, lr=None, **kw: torch.optim.SGD(p, lr=0.1))
    with pytest.raises(ShapeError, match="same kind and width"):
        balancer.forward_step(model, {k: v[:4] for k, v in splits["train"].tensors.items()})
    with pytest.raises(ConfigError, match="fusion"):
        METHODS.build("mla", None, fusion="mean")
    with pytest.raises(ConfigError, match="exactly the modalities"):
        fixed = MLA(MLAConfig(fusion="fixed", fusion_weights={"a": 1.0}))
        fixed.setup(tiny_model(), task, lambda p, **kw: None)
    assert not MLA.supports(task="reg")


def test_host_state_carries_the_projection_batch_position():
    trainer, batch, _ = _trainer(MLAConfig())
    trainer.train_step(batch, 0, 0)  # steps_per_epoch = 3: the next batch is number 1 of 3
    state = trainer.balancer.training_state()
    assert state["host"] == {"batch_index": 1, "batches_per_epoch": 3}
    fresh, _, _ = _trainer(MLAConfig(), seed=1)
    fresh.balancer.load_training_state(state)
    assert (fresh.balancer._batch_index, fresh.balancer._batches_per_epoch) == (1, 3)
    assert fresh.balancer._updates == 2  # the host mirror of head_updates follows the load
