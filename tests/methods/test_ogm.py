"""Journal OGM: coefficients by hand (Eq. 10 and the plus variant), the warm-up, the plus step."""

from __future__ import annotations

import pytest
import torch

from mmbalance.errors import ConfigError
from mmbalance.methods import METHODS
from mmbalance.methods.ogm import OGM, OGMConfig, plus_coefficients
from mmbalance.methods.ogm_ge import pairwise_ratios

from ._helpers import assert_same_parameters, joint_and, short_fit, tiny_trainer, train_steps


def test_journal_coefficients_by_hand():
    # s = (16, 20): rho_v = 20/16 = 1.25, rho_a = 0.8. alpha = 0.8 (train_ogm.sh):
    # k_v = 1 - tanh(0.8 * 1.25) = 1 - tanh(1) = 1 - 0.7615941560 = 0.2384058440, k_a = 1
    ratios = pairwise_ratios(torch.tensor([16.0, 20.0]))
    torch.testing.assert_close(OGM().coefficients(ratios), torch.tensor([1.0, 0.2384058440]))
    # plus (--use_OGM_plus): the slower modality's gradient x 4, the dominant one untouched
    torch.testing.assert_close(OGM(OGMConfig(plus=True)).coefficients(ratios), torch.tensor([4.0, 1.0]))


def test_plus_coefficients_by_hand():
    # three modalities s = (1, 2, 4): rho = (0.375, 1.25, 3): only the first is slower than the others
    ratios = pairwise_ratios(torch.tensor([1.0, 2.0, 4.0]))
    assert plus_coefficients(ratios, 4.0).tolist() == [4.0, 1.0, 1.0]
    assert plus_coefficients(torch.tensor([1.0, 1.0]), 4.0).tolist() == [1.0, 1.0]  # a tie boosts nothing
    assert plus_coefficients(torch.tensor([0.5, 2.0]), 2.5).tolist() == [2.5, 1.0]


def _record_edits(bal):
    """Per epoch: each encoder's gradients before and after the hook, and the step's ratios."""
    edits = {}
    hook = bal.on_after_backward

    def recording(ctx):
        grads = {m: [p.grad.clone() for p in ctx.model.modality_parameters(m)] for m in bal.modalities}
        hook(ctx)
        edits[ctx.epoch] = [
            (m, g0, p.grad)
            for m in bal.modalities
            for g0, p in zip(grads[m], ctx.model.modality_parameters(m), strict=True)
        ]
        edits[ctx.epoch, "ratios"] = pairwise_ratios(bal._scores)

    bal.on_after_backward = recording
    return edits


def test_warm_up_epochs_are_never_modulated():
    bal = OGM(OGMConfig(ge=False))  # window [6, 60]: main.py's warm_up = epoch <= 5
    trainer, batches = tiny_trainer(bal)
    edits = _record_edits(bal)
    trainer.train_step(batches[0], 5, 0)
    trainer.train_step(batches[1], 6, 0)
    assert all(torch.equal(g0, g1) for _, g0, g1 in edits[5])
    ratios = edits[6, "ratios"]
    assert sum(r > 1 for r in ratios.tolist()) == 1
    # Eq. 10 for the modality with rho > 1, the other untouched
    named = zip(bal.modalities, ratios, strict=True)
    factor = {m: (1 - torch.tanh(0.8 * r) if r > 1 else torch.tensor(1.0)) for m, r in named}
    for m, g0, g1 in edits[6]:
        torch.testing.assert_close(g1, g0 * factor[m])


def test_plus_boosts_the_slower_modality_in_a_step():
    bal = OGM(OGMConfig(ge=False, plus=True, modulation_starts=0))
    trainer, batches = tiny_trainer(bal)
    edits = _record_edits(bal)
    trainer.train_step(batches[0], 0, 0)
    ratios = edits[0, "ratios"]
    assert min(ratios.tolist()) < 1
    factor = {m: 4.0 if r < 1 else 1.0 for m, r in zip(bal.modalities, ratios.tolist(), strict=True)}
    for m, g0, g1 in edits[0]:
        torch.testing.assert_close(g1, g0 * factor[m])


def test_warm_up_reproduces_joint_exactly():
    # default window starts at epoch 6: epochs before it leave the model's gradients untouched (GE noise
    # included) and the heads read detached features, so the trajectory is joint's bit for bit
    joint, ogm, batches = joint_and(OGM())
    train_steps(batches, 2, joint, ogm)
    assert_same_parameters(joint.model, ogm.model)


def test_defaults_and_config_errors():
    cfg = METHODS.build("ogm", None).config
    journal = (cfg.alpha, cfg.ge, cfg.modulation_starts, cfg.modulation_ends, cfg.plus)
    assert journal == (0.8, True, 6, 60, False)
    with pytest.raises(ConfigError, match="plus_coeff"):
        METHODS.build("ogm", None, plus_coeff=0.0)
    with pytest.raises(ConfigError, match="alpha"):
        METHODS.build("ogm", None, alpha=-0.1)
    with pytest.raises(ConfigError, match="modulation_ends"):
        METHODS.build("ogm", None, modulation_ends=3)  # < modulation_starts (6)
    with pytest.raises(ConfigError, match="plus"):
        METHODS.build("ogm", None, plus="yes")
    assert METHODS.build("ogm", "synthetic").config.modulation_starts == 1


@pytest.mark.parametrize("dataset", ["synthetic_cls2", "synthetic_cls3", "synthetic_reg3", "synthetic_seg4"])
def test_fit_on_each_synthetic_task(dataset):
    result = short_fit("ogm", dataset, samples=64, modulation_starts=1)
    assert set(result.history[1]["diagnostics"]) >= {"coeff/" + m for m in result.trainer.model.modalities}
