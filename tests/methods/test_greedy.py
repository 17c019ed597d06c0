"""Greedy: conditional learning speed and d_BDR by hand, the curation state machine against a
transcription of Bias_Mitigation_Strong, training with the MMTM, and state round trips (the MMTM
block itself is tested in tests/models/test_mmtm.py)."""

from __future__ import annotations

import math
import random

import pytest
import torch

from mmbalance.errors import ConfigError
from mmbalance.methods import METHODS
from mmbalance.methods.greedy import (
    Greedy,
    GreedyConfig,
    bdr_difference,
    conditional_learning_speed,
    curation_update,
)

from ._helpers import tiny_trainer

CPU = torch.device("cpu")


def test_conditional_learning_speed_and_bdr_by_hand():
    params = [torch.tensor([1.0, 2.0]), torch.tensor([2.0])]  # Σ‖θ‖² = 5 + 4
    grads = [torch.tensor([1.0, 1.0]), torch.tensor([3.0])]  # Σ‖g‖² = 2 + 9
    assert conditional_learning_speed(grads, params).item() == pytest.approx(11 / 9)
    # log10(1 / 10) - log10(10 / 1) = -2
    assert bdr_difference(torch.tensor([1.0, 10.0]), torch.tensor([10.0, 1.0])).item() == pytest.approx(-2.0)


def test_speeds_of_float32_tensors_are_float64_exact():
    # theta = (1 + 2^-20, 3): sum of squares 1 + 2^-19 + 2^-40 + 9 = 10 + 2^-19 + 2^-40 (exact in
    # float64, not in float32); grads (0.5, 0.25 | 0.125): 0.25 + 0.0625 + 0.015625 = 0.328125
    params = [torch.tensor([1.0 + 2.0**-20], dtype=torch.float32), torch.tensor([3.0], dtype=torch.float32)]
    grads = [torch.tensor([0.5], dtype=torch.float32), torch.tensor([0.25, 0.125], dtype=torch.float32)]
    speed = conditional_learning_speed(grads, params)
    assert speed.dtype == torch.float64
    assert speed.item() == pytest.approx(0.328125 / (10 + 2.0**-19 + 2.0**-40), rel=1e-12, abs=0)
    # a group the loss did not reach: speed 0
    assert conditional_learning_speed([], params).item() == 0.0


def test_buffers_accumulate_the_float64_speeds_of_each_step():
    bal = Greedy(GreedyConfig(start_epoch=5))  # locked: measure every step
    trainer, batches = tiny_trainer(bal, batch_size=8)
    expected = torch.zeros(2, 2, dtype=torch.float64)  # rows: main, bypass
    original = bal.on_after_backward

    def spy(ctx):
        for i, (main, byp) in enumerate(zip(bal._main, bal._bypass_groups(), strict=True)):
            for row, group in ((0, main), (1, byp)):
                gn = sum(float((p.grad.double() ** 2).sum()) for p in group if p.grad is not None)
                wn = sum(float((p.detach().double() ** 2).sum()) for p in group)
                expected[row, i] += gn / wn
        original(ctx)

    bal.on_after_backward = spy
    for i, b in enumerate(batches[:3]):
        trainer.train_step(b, 0, i)
    assert bal.m_main.dtype == bal.m_bypass.dtype == bal.d_bdr.dtype == torch.float64
    torch.testing.assert_close(bal.m_main, expected[0], rtol=1e-12, atol=0)
    torch.testing.assert_close(bal.m_bypass, expected[1], rtol=1e-12, atol=0)
    d = math.log10(expected[1, 0] / expected[0, 0]) - math.log10(expected[1, 1] / expected[0, 1])
    assert bal.d_bdr.item() == pytest.approx(d, rel=1e-12, abs=0)


class OfficialStrong:
    """Transcription of Bias_Mitigation_Strong.on_backward_end (unlocked), d_BDR given per call."""

    def __init__(self, epsilon, window):
        self.epsilon, self.window = epsilon, window
        self.curation_mode, self.caring_modality, self.curation_step = False, 0, 0

    def step(self, d):
        if not self.curation_mode:
            if abs(d) > self.epsilon:
                self.curation_mode = True
                self.curation_step = 0
                self.caring_modality = 1 if math.copysign(1, d) == -1 else 0
            else:
                self.curation_mode = False
                self.caring_modality = 0
        else:
            self.curation_step += 1
            if self.curation_step == self.window:
                self.curation_mode = False


def test_curation_state_machine_matches_the_official_callback():
    rng = random.Random(0)
    official = OfficialStrong(epsilon=0.01, window=3)
    cur, car, stp = torch.tensor(False), torch.tensor(0), torch.tensor(0)
    entered = 0
    for _ in range(200):
        d = rng.choice([0.005, -0.004, 0.02, -0.3, 0.0])
        was = official.curation_mode
        official.step(d)
        cur, car, stp = curation_update(torch.tensor(d), cur, car, stp, 0.01, 3)
        entered += int(official.curation_mode and not was)
        assert (bool(cur), int(car)) == (official.curation_mode, official.caring_modality)
    assert entered > 10


def test_training_accumulates_speeds_and_round_trips_state():
    bal = Greedy(GreedyConfig(epsilon=0.0, window=2, start_epoch=1))
    trainer, batches = tiny_trainer(bal, batch_size=8)
    trainer.train_step(batches[0], 0, 0)  # locked: measure, never curate
    assert not bool(bal.curation) and (bal.m_main > 0).all() and (bal.m_bypass > 0).all()
    assert not any(b.requires_grad for b in bal.buffers())  # no autograd graph carried across steps
    bal._epoch = 1  # unlocked; epsilon 0 -> the next measurement enters curation
    trainer.train_step(batches[1], 1, 0)
    assert bool(bal.curation)
    frozen = bal.m_main.clone()
    trainer.train_step(batches[2], 1, 1)  # in curation: no accumulation
    assert torch.equal(bal.m_main, frozen)
    trainer.train_step(batches[3], 1, 2)  # second curation step: leaves
    assert not bool(bal.curation)
    output = trainer.model(batches[4])
    expected = trainer.model.fuse(
        dict(zip(("a", "b"), bal.mmtm((output.features["a"], output.features["b"])), strict=True))
    )
    bal.eval()
    torch.testing.assert_close(bal.predict(output), expected.prediction)
    fresh = Greedy(GreedyConfig())
    tiny_trainer(fresh, seed=1, batch_size=8)
    fresh.load_state_dict(bal.state_dict())
    for k, v in bal.state_dict().items():
        assert torch.equal(fresh.state_dict()[k], v), k
    assert set(bal.inference_state_dict()) == {f"mmtm.{k}" for k in bal.mmtm.state_dict()}


def test_random_variant_and_errors():
    bal = Greedy(GreedyConfig(variant="random", start_epoch=0))
    trainer, batches = tiny_trainer(bal, batch_size=8)
    for i, b in enumerate(batches):
        trainer.train_step(b, 0, i)
    assert float(bal.m_main.sum()) == 0.0  # the random variant measures nothing
    assert not METHODS.get("greedy").supports(modalities=3)
    with pytest.raises(ConfigError, match="variant"):
        METHODS.build("greedy", None, variant="strong")
    with pytest.raises(ConfigError, match="window"):
        METHODS.build("greedy", None, window=0)
