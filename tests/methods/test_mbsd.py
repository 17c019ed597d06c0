"""MBSD: the pair terms by hand (2 and 3 modalities), the gradient through the weight, joint outside the
window, config errors, short runs on every declared synthetic task."""

from __future__ import annotations

import math

import pytest
import torch

from mmbalance.errors import ConfigError
from mmbalance.methods import METHODS
from mmbalance.methods.mbsd import MBSD, MBSDConfig, mbsd_losses, pair_distillation, rs_space_for

from ._helpers import assert_same_parameters, joint_and, short_fit, train_steps

CPU = torch.device("cpu")
LN3, LN4 = math.log(3.0), math.log(4.0)
# position 0: p_a = (1/4, 3/4), p_b = (1/2, 1/2), y = 1
# position 1: p_a = (0.8, 0.2), p_b = (0.75, 0.25), y = 1
Z_A = torch.tensor([[0.0, LN3], [LN4, 0.0]])
Z_B = torch.tensor([[0.0, 0.0], [LN3, 0.0]])
Y = torch.tensor([1, 1])


def test_pair_terms_by_hand():
    w_rs, w_kl, w = pair_distillation(Z_A, Z_B, Y, "logits")
    # position 0: a predicts y -> w = |0.75 - 0.5| = 0.25; strong 0.75, weak 0.5
    #   KL = 0.5 (ln 0.5 - 0.75) = 0.5 (-0.69314718 - 0.75) = -0.72157359
    #   RS (logits) = ((0 - 0)^2 + (ln 3 - 0)^2) / 2 = 1.20694896 / 2 = 0.60347448
    # position 1: both predict class 0 != y -> w = 0
    torch.testing.assert_close(w, torch.tensor([0.25, 0.0]))
    torch.testing.assert_close(w_rs, torch.tensor([0.25 * 0.60347448, 0.0]))
    torch.testing.assert_close(w_kl, torch.tensor([0.25 * -0.72157359, 0.0]))
    w_rs, _, _ = pair_distillation(Z_A, Z_B, Y, "probs")
    # RS (probs) = ((1/4 - 1/2)^2 + (3/4 - 1/2)^2) / 2 = 1/16 -> w RS = 0.015625
    torch.testing.assert_close(w_rs, torch.tensor([0.015625, 0.0]))


def test_two_modalities_are_batch_means_of_the_one_pair():
    rs, kl, w = mbsd_losses([Z_A, Z_B], Y, "logits")
    # (0.25 * 0.60347448 + 0) / 2 = 0.07543431; (0.25 * -0.72157359 + 0) / 2 = -0.09019670
    torch.testing.assert_close(rs, torch.tensor(0.07543431))
    torch.testing.assert_close(kl, torch.tensor(-0.09019670))
    torch.testing.assert_close(w, torch.tensor(0.125))


def test_three_modalities_average_the_three_pairs():
    # c = b: pairs (a, b) and (a, c) as above, (b, c) has w = |0.5 - 0.5| = 0 at position 0 and no hit at 1
    rs, kl, _ = mbsd_losses([Z_A, Z_B, Z_B.clone()], Y, rs_space_for(3, "auto"))
    # probs space (the 3-modal branch): pair (a, b) mean = 0.015625 / 2 = 0.0078125
    torch.testing.assert_close(rs, torch.tensor((0.0078125 + 0.0078125 + 0.0) / 3))
    torch.testing.assert_close(kl, torch.tensor((-0.09019670 - 0.09019670 + 0.0) / 3))
    assert rs_space_for(2, "auto") == "logits" and rs_space_for(3, "auto") == "probs"
    assert rs_space_for(2, "probs") == "probs"


def test_gradient_flows_through_the_weight_as_in_the_official_code():
    z_b = Z_B.clone().requires_grad_(True)
    rs, _, _ = mbsd_losses([Z_A, z_b], Y, "logits")
    rs.backward()
    # loss = (1/2) w RS at position 0, w = p_a(y) - p_b(y)
    # d p_b(y) / d z_b = p_b(y) (e_y - p_b) = (-0.25, 0.25); d RS / d z_b = -(z_a - z_b) = (0, -ln 3)
    # d/dz_b = 1/2 [-(-0.25, 0.25) * 0.60347448 + 0.25 * (0, -1.09861229)]
    #        = 1/2 [(0.15086862, -0.15086862) + (0, -0.27465307)] = (0.07543431, -0.21276085)
    torch.testing.assert_close(z_b.grad[0], torch.tensor([0.07543431, -0.21276085]))
    assert torch.equal(z_b.grad[1], torch.zeros(2))  # w = 0 there


def test_segmentation_maps_are_per_pixel_terms():
    # the two positions as the two pixels of one 1x2 map
    maps = [z.t().reshape(1, 2, 1, 2) for z in (Z_A, Z_B)]
    rs, kl, _ = mbsd_losses(maps, Y.reshape(1, 1, 2), "logits")
    torch.testing.assert_close(rs, torch.tensor(0.07543431))
    torch.testing.assert_close(kl, torch.tensor(-0.09019670))


def test_errors():
    with pytest.raises(ConfigError, match="at least 2"):
        mbsd_losses([Z_A], Y, "logits")
    with pytest.raises(ConfigError, match="rs_space"):
        METHODS.build("mbsd", None, rs_space="features")
    with pytest.raises(ConfigError, match="modulation_ends"):
        METHODS.build("mbsd", None, modulation_starts=3, modulation_ends=1)
    with pytest.raises(ConfigError, match="head_lr"):
        METHODS.build("mbsd", None, head_lr=0.0)


def test_outside_the_window_it_trains_exactly_as_joint_while_the_heads_learn():
    joint, mbsd, batches = joint_and(MBSD(MBSDConfig(modulation_starts=4, modulation_ends=6)))
    train_steps(batches, 0, joint, mbsd)  # epoch 0 is outside the window
    assert_same_parameters(joint.model, mbsd.model)
    assert mbsd.balancer.heads.optimizer.state  # the heads took optimizer steps
    assert mbsd.balancer.diagnostics() == {}


def test_inside_the_window_the_terms_reach_the_encoders():
    joint, mbsd, batches = joint_and(MBSD())
    train_steps(batches[:1], 0, joint, mbsd)
    encoder = [(pj, pm) for pj, pm in zip(joint.model.encoders.parameters(), mbsd.model.encoders.parameters(),
                                          strict=True)]
    assert any(not torch.equal(pj, pm) for pj, pm in encoder)
    assert set(mbsd.balancer.diagnostics()) == {"weight", "rs", "kl"}


@pytest.mark.parametrize("dataset", ["synthetic_cls2", "synthetic_cls3", "synthetic_seg4"])
def test_short_run_on_each_declared_synthetic_task(dataset):
    result = short_fit("mbsd", dataset)
    assert {"mbsd/rs", "mbsd/kl"} <= set(result.history[0]["terms"])


def test_regression_is_not_declared():
    assert not MBSD.supports(task="reg")
