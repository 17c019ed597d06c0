"""MSLR: the dynamic-ratio arithmetic by hand, update scaling = per-modality LR, joint-neutral keep."""

from __future__ import annotations

import pytest
import torch

from mmbalance.errors import ConfigError, UnsupportedError
from mmbalance.methods import METHODS
from mmbalance.methods.joint import Joint
from mmbalance.methods.mslr import MSLR, MSLRConfig, dynamic_ratios
from mmbalance.tasks import make_task
from mmbalance.train import TrainConfig, Trainer, fit, make_loader, make_optimizer_factory

from ..conftest import tiny_model, tiny_splits
from ._helpers import assert_fits_like_joint

CPU = torch.device("cpu")
CFG = TrainConfig(epochs=2, batch_size=16, eval_modality_scores=False, cost_steps=0)


def test_dynamic_ratios_by_hand():
    history = [[0.5, 1.0], [0.7, 0.8]]  # means 0.6, 0.9
    assert dynamic_ratios([0.8, 0.45], history) == pytest.approx([0.8 / 0.6, 0.5])
    assert dynamic_ratios([0.3, 0.9], [[0.0, 0.9]]) == pytest.approx([1.0, 1.0])  # zero mean -> ratio 1
    with pytest.raises(ConfigError, match="at least one epoch"):
        dynamic_ratios([0.1], [])


def test_window_update_follows_the_agm_rule():
    balancer = MSLR(MSLRConfig(window=2, lr_scale={"a": 1.3, "b": 0.7}))
    balancer.setup(tiny_model(), make_task("cls", 3), make_optimizer_factory(CFG))
    balancer.update(torch.tensor([0.5, 0.4], dtype=torch.float64))
    balancer.update(torch.tensor([0.7, 0.6], dtype=torch.float64))
    assert balancer.coefficients.tolist() == pytest.approx([1.3, 0.7])  # window filling: c = c0
    balancer.update(torch.tensor([0.9, 0.25], dtype=torch.float64))  # means 0.6, 0.5
    assert balancer.coefficients.tolist() == pytest.approx([1.3 * 1.5, 0.7 * 0.5])
    assert balancer.score_history.flatten().tolist() == pytest.approx([0.7, 0.6, 0.9, 0.25])  # slid by one
    balancer.update(torch.tensor([0.8, 0.425], dtype=torch.float64))  # means 0.8, 0.425 -> ratio 1
    assert balancer.coefficients.tolist() == pytest.approx([1.3, 0.7])



def test_scores_window_and_coefficients_are_float64_by_hand():
    """The AGM code keeps the score memory and the coefficients as Python floats: window 2,
    c0 = (1.3, 0.7); scores (1/3, 0.1), (2/3, 0.3) fill the window (means 0.5, 0.2); scores
    (0.55, 0.25) give ratios (1.1, 1.25) and c = (1.3 · 1.1, 0.7 · 1.25) = (1.43, 0.875). None of these
    is a float32 number: float32 storage is off by ~1e-8 relative."""
    balancer = MSLR(MSLRConfig(window=2, lr_scale={"a": 1.3, "b": 0.7}))
    balancer.setup(tiny_model(), make_task("cls", 3), make_optimizer_factory(CFG))
    for scores in ([1 / 3, 0.1], [2 / 3, 0.3], [0.55, 0.25]):
        balancer.update(torch.tensor(scores, dtype=torch.float64))
    for got, want in zip(balancer.coefficients.tolist(), [1.43, 0.875], strict=True):
        assert got == pytest.approx(want, rel=1e-12, abs=0)
    history = balancer.score_history.flatten().tolist()
    for got, want in zip(history, [2 / 3, 0.3, 0.55, 0.25], strict=True):
        assert got == want  # stored exactly
    assert balancer.diagnostics()["coef/a"] == pytest.approx(1.43, rel=1e-12, abs=0)

def _steps(balancer, optimizer="adam", n=4):
    splits, _ = tiny_splits()
    cfg = TrainConfig(epochs=1, batch_size=16, optimizer=optimizer, eval_modality_scores=False, cost_steps=0)
    model = tiny_model()
    trainer = Trainer(model, balancer, make_task("cls", 3), cfg, CPU, steps_per_epoch=3)
    batches = list(make_loader(splits["train"], cfg, CPU, train=True))
    for i in range(n):
        trainer.train_step(batches[i % len(batches)], 0, i)
    return model


@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
def test_update_scaling_equals_a_per_modality_learning_rate(optimizer):
    """apply='lr' gives exactly the run of an optimizer whose encoder-a group has lr * c_a."""
    c = 0.25
    got = _steps(MSLR(MSLRConfig(strategy="keep", lr_scale={"a": c})), optimizer)
    splits, _ = tiny_splits()
    model = tiny_model()
    task = make_task("cls", 3)
    enc_a = list(model.encoders["a"].parameters())
    rest = [p for p in model.parameters() if all(p is not q for q in enc_a)]
    kw = {"momentum": 0.9} if optimizer == "sgd" else {}
    opt_cls = torch.optim.Adam if optimizer == "adam" else torch.optim.SGD
    opt = opt_cls([{"params": enc_a, "lr": 1e-3 * c}, {"params": rest, "lr": 1e-3}], **kw)
    batches = list(make_loader(splits["train"], CFG, CPU, train=True))
    for i in range(4):
        opt.zero_grad()
        b = batches[i % len(batches)]
        task.loss(model(b).prediction, b["target"]).backward()
        opt.step()
    for p, q in zip(got.parameters(), model.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-7)


def test_gradient_scaling_is_nearly_a_no_op_under_adam():
    """Why apply='lr' is the default: Adam normalises a constant gradient scale away."""
    start = [p.detach().clone() for p in tiny_model().encoders["a"].parameters()]
    runs = {
        "plain": _steps(Joint()),
        "grad": _steps(MSLR(MSLRConfig(strategy="keep", apply="grad", lr_scale={"a": 0.25}))),
        "lr": _steps(MSLR(MSLRConfig(strategy="keep", apply="lr", lr_scale={"a": 0.25}))),
    }
    delta = {k: torch.cat([(p - s).flatten()
                           for p, s in zip(m.encoders["a"].parameters(), start, strict=True)])
             for k, m in runs.items()}
    scale = delta["plain"].abs().max()
    assert (delta["grad"] - delta["plain"]).abs().max() < 0.05 * scale  # same update up to Adam's eps
    assert (delta["lr"] - 0.25 * delta["plain"]).abs().max() < 0.01 * scale  # a quarter of the update


def test_keep_with_unit_scales_reproduces_joint_exactly():
    assert_fits_like_joint(MSLR(MSLRConfig(strategy="keep")), CFG)
    keep, dynamic = MSLR(MSLRConfig(strategy="keep")), MSLR(MSLRConfig())
    for balancer in (keep, dynamic):
        balancer.setup(tiny_model(), make_task("cls", 3), make_optimizer_factory(CFG))
    assert keep.heads is None and dynamic.heads is not None  # fixed rates need no score heads


def test_dynamic_fit_scores_validation_each_epoch():
    splits, spec = tiny_splits()
    balancer = MSLR(MSLRConfig(window=1))
    cfg = TrainConfig(epochs=3, batch_size=16, eval_modality_scores=False, cost_steps=0)
    result = fit(tiny_model(), balancer, splits, spec, make_task("cls", 3), cfg, CPU)
    # epochs 1 and 2 start by scoring the previous epoch; the second one sets the coefficients
    coefs = [h["diagnostics"]["coef/a"] for h in result.history]
    assert coefs[0] == coefs[1] == 1.0 and coefs[2] != 1.0
    assert 0.0 <= result.history[-1]["diagnostics"]["val_score/b"] <= 1.0


def test_config_and_setup_errors():
    with pytest.raises(ConfigError, match="strategy must be one of"):
        METHODS.build("mslr", None, strategy="smooth")
    with pytest.raises(ConfigError, match="lr_scale\\['a'\\] must be a finite number >= 0"):
        METHODS.build("mslr", None, lr_scale={"a": -1})
    factory = make_optimizer_factory(CFG)
    with pytest.raises(ConfigError, match="unknown modalities \\['audio'\\]"):
        MSLR(MSLRConfig(lr_scale={"audio": 2.0})).setup(tiny_model(), make_task("cls", 3), factory)
    with pytest.raises(UnsupportedError, match="neg_mae"):
        MSLR().setup(tiny_model(classes=1), make_task("reg", 1, score="neg_mae"), factory)
