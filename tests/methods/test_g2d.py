"""G2D: logit distillation and SMP factors by hand; SMP pauses exactly the most confident teacher's
encoder inside the window; neutral setting == joint; config errors; short fits on every task."""

from __future__ import annotations

import math

import pytest
import torch

from mmbalance.errors import ConfigError, ShapeError
from mmbalance.methods import METHODS
from mmbalance.methods.g2d import G2D, G2DConfig, logit_distillation, smp_coefficients
from mmbalance.methods.ogm_ge import confidence_score
from mmbalance.train import TrainConfig

from ._helpers import assert_fits_like_joint, short_fit, tiny_trainer

CPU = torch.device("cpu")
LN3 = math.log(3.0)
# Student logits (0, 0): p = (1/2, 1/2). Teacher logits (0, ln 3): q = (1/4, 3/4).
# KL(q || p) = 1/4 ln(1/2) + 3/4 ln(3/2) = 0.1308120359.
KL_T1 = 0.25 * math.log(0.5) + 0.75 * math.log(1.5)
# T = 2: q = softmax(0, ln3 / 2) = (1, √3) / (1 + √3); KL = Σ q_k ln(2 q_k) = 0.0363407829; times T² = 4.
Q2 = (1 / (1 + math.sqrt(3)), math.sqrt(3) / (1 + math.sqrt(3)))
KL_T2 = sum(q * math.log(2 * q) for q in Q2)


def test_logit_distillation_by_hand():
    student = torch.zeros(2, 2)
    teacher = torch.tensor([[0.0, LN3], [0.0, 0.0]])  # sample 2: teacher == student, KL 0
    assert logit_distillation(student, teacher, 1.0, "cls").item() == pytest.approx(KL_T1 / 2, rel=1e-5)
    assert logit_distillation(student, teacher, 2.0, "cls").item() == pytest.approx(4 * KL_T2 / 2, rel=1e-5)
    # segmentation: the same two distributions as two pixels of one image, averaged over pixels
    seg_s, seg_t = student.T.reshape(1, 2, 1, 2), teacher.T.reshape(1, 2, 1, 2)
    assert logit_distillation(seg_s, seg_t, 1.0, "seg").item() == pytest.approx(KL_T1 / 2, rel=1e-5)
    # regression: MSE((1, 3), (0, 1)) = (1 + 4) / 2 = 2.5
    reg = logit_distillation(torch.tensor([[1.0], [3.0]]), torch.tensor([[0.0], [1.0]]), 5.0, "reg")
    assert reg.item() == pytest.approx(2.5)
    with pytest.raises(ShapeError, match=r"student prediction has shape \(2, 2\), its teacher's \(2, 3\)"):
        logit_distillation(student, torch.zeros(2, 3), 1.0, "cls")


def test_logit_distillation_gradient_reaches_the_student_only():
    student = torch.zeros(1, 2, requires_grad=True)
    teacher = torch.tensor([[0.0, LN3]], requires_grad=True)
    logit_distillation(student, teacher, 1.0, "cls").backward()
    # d KL / d s = p - q = (1/2 - 1/4, 1/2 - 3/4)
    torch.testing.assert_close(student.grad, torch.tensor([[0.25, -0.25]]))
    assert teacher.grad is None


def test_smp_coefficients_by_hand():
    # utils.py: score_teacher_a > score_teacher_v -> coeff_a = 0, coeff_v = 1, and vice versa
    torch.testing.assert_close(smp_coefficients(torch.tensor([30.0, 20.0])), torch.tensor([0.0, 1.0]))
    torch.testing.assert_close(smp_coefficients(torch.tensor([20.0, 30.0])), torch.tensor([1.0, 0.0]))
    for rule in ("suppress_strongest", "only_weakest"):  # the two rules agree for two modalities
        torch.testing.assert_close(smp_coefficients(torch.tensor([2.0, 7.0]), rule), torch.tensor([1.0, 0.0]))
        torch.testing.assert_close(smp_coefficients(torch.tensor([5.0, 5.0]), rule), torch.ones(2))  # tie
    # three modalities, scores (5, 9, 2): the most confident (9) pauses; or only the least (2) learns
    scores = torch.tensor([5.0, 9.0, 2.0])
    torch.testing.assert_close(smp_coefficients(scores), torch.tensor([1.0, 0.0, 1.0]))
    torch.testing.assert_close(smp_coefficients(scores, "only_weakest"), torch.tensor([0.0, 0.0, 1.0]))
    # ties for the deciding place pause nothing
    torch.testing.assert_close(smp_coefficients(torch.tensor([9.0, 9.0, 2.0])), torch.ones(3))
    torch.testing.assert_close(
        smp_coefficients(torch.tensor([9.0, 9.0, 2.0]), "only_weakest"), torch.tensor([0.0, 0.0, 1.0])
    )
    torch.testing.assert_close(smp_coefficients(torch.tensor([2.0, 9.0, 2.0]), "only_weakest"), torch.ones(3))
    with pytest.raises(ConfigError, match="M >= 2"):
        smp_coefficients(torch.tensor([1.0]))
    with pytest.raises(ConfigError, match="smp_rule"):
        smp_coefficients(torch.tensor([1.0, 2.0]), "strongest")


def test_smp_pauses_the_most_confident_teachers_encoder_inside_the_window_only():
    bal = G2D(G2DConfig(modulation_starts=1, modulation_ends=1))
    trainer, batches = tiny_trainer(bal)
    captured = {}
    original = bal.on_after_backward

    def spy(ctx):
        grads = lambda: {n: p.grad.clone() for n, p in ctx.model.named_parameters()}  # noqa: E731
        before = grads()
        original(ctx)
        captured[ctx.epoch] = (before, grads(), bal._scores.clone())

    bal.on_after_backward = spy
    trainer.train_step(batches[0], 0, 0)  # epoch 0: outside [1, 1]
    trainer.train_step(batches[1], 1, 0)  # epoch 1: inside
    before, after, _ = captured[0]
    assert all(torch.equal(before[n], after[n]) for n in before)
    before, after, scores = captured[1]
    strongest = bal.modalities[int(scores.argmax())]
    assert scores.min() < scores.max()
    for n in before:
        if n.startswith(f"encoders.{strongest}."):
            assert before[n].abs().sum() > 0 and torch.equal(after[n], torch.zeros_like(after[n]))
        else:
            assert torch.equal(before[n], after[n])
    diag = bal.diagnostics()
    # coeff: 1 at the step outside the window, 0 or 1 inside (mean over the two steps)
    assert diag[f"coeff/{strongest}"] == 0.5
    assert {k for k in diag if k.startswith("coeff/")} == {f"coeff/{m}" for m in bal.modalities}


def test_loss_terms_distil_the_fused_prediction_toward_every_teacher():
    bal = G2D(G2DConfig(logit_weight=0.5, feature_weight=2.0, temperature=3.0))
    trainer, batches = tiny_trainer(bal)
    batch = batches[0]
    output = bal.forward_step(trainer.model, batch)
    terms = bal.loss_terms(output, batch, trainer.task)
    features, predictions = bal._teacher_outputs(batch)
    expected_logit = sum(logit_distillation(output.prediction, predictions[m], 3.0, "cls") for m in "ab")
    torch.testing.assert_close(terms["logit_kd"], 0.5 * expected_logit)
    expected_feature = sum(((output.features[m] - features[m]) ** 2).mean() for m in "ab")
    torch.testing.assert_close(terms["feature_kd"], 2.0 * expected_feature)
    scores = torch.stack([confidence_score(predictions[m], batch["target"], trainer.task) for m in "ab"])
    torch.testing.assert_close(bal._scores, scores)
    terms["feature_kd"].backward()  # reaches the encoders, never the frozen teachers
    assert all(p.grad is not None for p in trainer.model.encoders.parameters())
    assert all(p.grad is None for p in bal.teachers.parameters())


def test_neutral_setting_reproduces_joint_exactly():
    """No distillation and no SMP: the teacher stage (forked RNG, private loader) changes nothing."""
    cfg = TrainConfig(epochs=2, batch_size=16, eval_modality_scores=False, cost_steps=0)
    balancer = G2D(G2DConfig(logit_weight=0.0, feature_weight=0.0, smp=False, teacher_epochs=2))
    assert_fits_like_joint(balancer, cfg)
    assert bool(balancer.teachers_trained) and balancer.extra_steps() == 2 * 2 * 3


def test_config_errors():
    for key, value, match in [
        ("logit_weight", -1.0, "logit_weight must be a finite number >= 0"),
        ("feature_weight", math.inf, "feature_weight must be a finite number >= 0"),
        ("temperature", 0.0, "temperature must be a finite number > 0"),
        ("smp_rule", "weakest", "smp_rule must be one of"),
        ("teacher_epochs", -1, "teacher_epochs must be None or an integer >= 0"),
        ("teacher_batches", 0, "teacher_batches must be None or an integer >= 1"),
        ("teacher_lr", -1e-3, "teacher_lr must be None or a finite number > 0"),
        ("head_hidden", 0, "head_hidden must be None or an integer >= 1"),
        ("modulation_ends", -1, "modulation_ends must be an integer >= modulation_starts"),
    ]:
        with pytest.raises(ConfigError, match=match):
            METHODS.build("g2d", None, **{key: value})


@pytest.mark.parametrize("dataset", ["synthetic_cls2", "synthetic_cls3", "synthetic_reg3", "synthetic_seg4"])
def test_short_fit_on_every_declared_task(dataset):
    result = short_fit("g2d", dataset, samples=64, teacher_epochs=1, teacher_batches=2)
    diag = result.history[-1]["diagnostics"]
    assert diag["teachers_trained"] == 1.0
    assert all(0.0 <= diag[f"coeff/{m}"] <= 1.0 for m in result.trainer.balancer.modalities)
