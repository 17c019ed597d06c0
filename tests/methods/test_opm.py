"""OPM: drop probabilities and rescaling by hand, the feature drop in a step, p_exe=0 == joint."""

from __future__ import annotations

import pytest
import torch

from mmbalance.errors import ConfigError
from mmbalance.methods import METHODS
from mmbalance.methods.ogm_ge import pairwise_ratios
from mmbalance.methods.opm import OPM, OPMConfig, drop_probabilities, keep_mask, rescale_factor

from ._helpers import assert_same_parameters, joint_and, short_fit, start_epoch, tiny_trainer, train_steps


def test_drop_probabilities_by_hand():
    # s = (20, 30): rho = (2/3, 1.5). Only the dominant modality (rho > 1) gets a drop probability:
    # q_v = 0.5 * (1 + 0.5 * tanh(0.5)) = 0.5 * (1 + 0.5 * 0.4621171573) = 0.6155292893, q_a = 0
    q = drop_probabilities(pairwise_ratios(torch.tensor([20.0, 30.0])), q_base=0.5, lam=0.5)
    torch.testing.assert_close(q, torch.tensor([0.0, 0.6155292893]))
    # three modalities s = (1, 2, 4): rho = (0.375, 1.25, 3)
    # q_1 = 0.5 * (1 + 0.5 * tanh(0.25)) = 0.5 * (1 + 0.5 * 0.2449186624) = 0.5612296656
    # q_2 = 0.5 * (1 + 0.5 * tanh(2)) = 0.5 * (1 + 0.5 * 0.9640275801) = 0.7410068950
    q3 = drop_probabilities(pairwise_ratios(torch.tensor([1.0, 2.0, 4.0])), q_base=0.5, lam=0.5)
    torch.testing.assert_close(q3, torch.tensor([0.0, 0.5612296656, 0.7410068950]))
    # clipped at 1: 0.8 * (1 + tanh(2)) = 1.5712 -> 1; a tie (rho = 1) drops nothing
    clipped = drop_probabilities(torch.tensor([3.0, 1.0]), 0.8, 1.0)
    torch.testing.assert_close(clipped, torch.tensor([1.0, 0.0]))


def test_rescale_factor_by_hand():
    # q = (0, 0.6), d = (4, 2): theta = (4*0 + 2*0.6) / 6 = 0.2 -> 1 / (1 - 0.2) = 1.25
    assert rescale_factor(torch.tensor([0.0, 0.6]), torch.tensor([4, 2])).item() == pytest.approx(1.25)
    # official Kinetics-Sounds widths (512, 512), q = (0, 0.5): theta = 0.25 -> 4/3
    assert rescale_factor(torch.tensor([0.0, 0.5]), torch.tensor([512, 512])).item() == pytest.approx(4 / 3)


def test_keep_mask_statistics():
    torch.manual_seed(0)
    keep, executed = keep_mask(torch.tensor([0.0, 0.25]), 20_000, p_exe=1.0)
    assert executed.item() and keep[:, 0].all()
    assert (~keep[:, 1]).float().mean().item() == pytest.approx(0.25, abs=0.01)
    keep, executed = keep_mask(torch.tensor([0.0, 1.0]), 50, p_exe=0.0)
    assert not executed.item() and keep.all()
    runs = torch.stack([keep_mask(torch.tensor([0.0, 0.5]), 4, p_exe=0.3)[1] for _ in range(4000)])
    assert runs.float().mean().item() == pytest.approx(0.3, abs=0.03)


def test_forward_step_drops_the_dominant_features_and_rescales_all():
    bal = OPM(OPMConfig(p_exe=1.0, warmup_epochs=0))
    trainer, batches = tiny_trainer(bal)
    start_epoch(trainer, 0)
    captured = {}
    fuse = trainer.model.fuse

    def spy(features, extras=None):
        captured["fused_in"] = {m: f.detach().clone() for m, f in features.items()}
        return fuse(features, extras)

    trainer.model.fuse = spy
    batch = batches[0]
    out = bal.forward_step(trainer.model, batch)
    raw = {m: trainer.model.encoders[m](batch[m]).detach() for m in ("a", "b")}
    for m in ("a", "b"):
        torch.testing.assert_close(out.features[m].detach(), raw[m])  # features keep the encoder outputs
    preds = out.extras["opm.unimodal"]
    target_probs = {m: torch.softmax(preds[m], 1)[torch.arange(16), batch["target"]] for m in ("a", "b")}
    scores = torch.stack([target_probs["a"].sum(), target_probs["b"].sum()])
    q = drop_probabilities(pairwise_ratios(scores), 0.5, 0.5)
    scale = rescale_factor(q, torch.tensor([8, 8]))  # both encoders output 8 features
    dominant, other = (0, 1) if q[0] > 0 else (1, 0)
    assert q[other] == 0 and q[dominant] > 0.5
    m_dom, m_other = ("a", "b")[dominant], ("a", "b")[other]
    torch.testing.assert_close(captured["fused_in"][m_other], raw[m_other] * scale)
    dropped = captured["fused_in"][m_dom].abs().sum(dim=1) == 0
    kept = ~dropped & (raw[m_dom].abs().sum(dim=1) > 0)
    assert dropped.any() and kept.any()
    torch.testing.assert_close(captured["fused_in"][m_dom][kept], raw[m_dom][kept] * scale)
    terms = bal.loss_terms(out, batch, trainer.task)
    assert set(terms) == {"task", "unimodal/a", "unimodal/b"}
    diag = bal.diagnostics()
    assert diag["executed"] == 1.0 and diag[f"dropped/{m_other}"] == 0.0
    assert diag[f"dropped/{m_dom}"] == pytest.approx(dropped.float().mean().item())


@pytest.mark.parametrize("config, epoch", [(OPMConfig(p_exe=0.0, warmup_epochs=0), 3), (OPMConfig(), 5)])
def test_no_drop_reproduces_joint_exactly(config, epoch):
    # p_exe = 0, or an epoch inside the warm-up (epochs 0-5 by default): the heads read detached
    # features and no random number is drawn, so the model's trajectory is joint's bit for bit.
    joint, opm, batches = joint_and(OPM(config))
    start_epoch(opm, epoch)
    train_steps(batches, epoch, joint, opm)
    assert_same_parameters(joint.model, opm.model)
    assert opm.balancer.heads.built and opm.balancer.diagnostics()["executed"] == 0.0


def test_config_errors():
    bad = (("q_base", 1.5), ("lam", -1.0), ("lam", float("inf")), ("p_exe", -0.1), ("warmup_epochs", -1),
           ("score", "acc"))
    for key, value in bad:
        with pytest.raises(ConfigError, match=key):
            METHODS.build("opm", None, **{key: value})
    with pytest.raises(ConfigError, match="unknown config key"):
        METHODS.build("opm", None, alpha=1.0)


@pytest.mark.parametrize("dataset", ["synthetic_cls2", "synthetic_cls3", "synthetic_reg3", "synthetic_seg4"])
def test_fit_on_each_synthetic_task(dataset):
    result = short_fit("opm", dataset, samples=64, warmup_epochs=1, p_exe=1.0)
    first, second = (h["diagnostics"] for h in result.history)
    assert first["executed"] == 0.0 and second["executed"] == 1.0  # warm-up epoch 0, drops in epoch 1
