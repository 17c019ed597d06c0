"""InfoReg: window signal, proximal coefficients and Fisher trace by hand; the proximal gradient inside
the window only; trace bookkeeping; neutral setting == joint; config errors; short fits."""

from __future__ import annotations

import math

import pytest
import torch

from mmbalance.balancer import EpochContext
from mmbalance.errors import ConfigError
from mmbalance.methods import METHODS
from mmbalance.methods.inforeg import (
    InfoReg,
    InfoRegConfig,
    fisher_trace,
    proximal_coefficients,
    window_signal,
)
from mmbalance.tasks import make_task
from mmbalance.train import TrainConfig

from ..conftest import tiny_model
from ._helpers import assert_fits_like_joint, short_fit, tiny_trainer

CPU = torch.device("cpu")


def test_window_signal_by_hand():
    assert window_signal([], 10) == 1.0  # epoch 0: main.py sets k = 1
    assert window_signal([2.0], 10) == 1.0  # records [0]*10 + [2]: new 0.2, old 0 -> k = 1
    # [0]*10 + [2, 4, 6]: new = 12/10 = 1.2, old = 6/10 = 0.6 -> k = 0.5
    assert window_signal([2.0, 4.0, 6.0], 10) == pytest.approx(0.5)
    # length 2: new = (4 + 6)/2 = 5, old = (2 + 4)/2 = 3 -> k = 0.4
    assert window_signal([2.0, 4.0, 6.0], 2) == pytest.approx(0.4)
    # a shrinking trace: new = (6 + 3)/2 = 4.5, old = (4 + 6)/2 = 5 -> k = -1/9
    assert window_signal([4.0, 6.0, 3.0], 2) == pytest.approx(-1 / 9)
    assert window_signal([0.0, 0.0], 10) == 0.0  # nothing learned: closed (main.py divides by zero)


def test_proximal_coefficients_by_hand():
    base = torch.tensor([0.95, 0.1])
    # s_a - s_v = 0.5 > 0: β_a = 0.95 exp(tanh(0.5)) = 0.95 * 1.587... ; β_v = 0
    beta = proximal_coefficients(torch.tensor([3.0, 2.5]), base)
    torch.testing.assert_close(beta, torch.tensor([0.95 * math.exp(math.tanh(0.5)), 0.0]))
    beta = proximal_coefficients(torch.tensor([2.5, 3.0]), base)  # visual more confident
    torch.testing.assert_close(beta, torch.tensor([0.0, 0.1 * math.exp(math.tanh(0.5))]))
    torch.testing.assert_close(proximal_coefficients(torch.tensor([2.0, 2.0]), base), torch.zeros(2))
    # three modalities: gap_m = s_m - mean of the others: 1 - 4 = -3, 2 - 3.5 = -1.5, 6 - 1.5 = 4.5
    beta = proximal_coefficients(torch.tensor([1.0, 2.0, 6.0]), torch.ones(3))
    torch.testing.assert_close(beta, torch.tensor([0.0, 0.0, math.exp(math.tanh(4.5))]))
    with pytest.raises(ConfigError, match="at least 2"):
        proximal_coefficients(torch.tensor([1.0]), torch.ones(1))


def test_fisher_trace_is_the_sum_of_per_layer_mean_squares():
    # mean(2²) over a 2x2 tensor = 4; mean(1², 3²) = 5 -> 9
    grads = [torch.full((2, 2), 2.0), torch.tensor([[1.0, 3.0]])]
    assert fisher_trace(grads).item() == pytest.approx(9.0)
    assert fisher_trace(grads, torch.tensor([4.0, 2.0], dtype=torch.float64)).item() == pytest.approx(9.0)
    assert fisher_trace([]).item() == 0.0


def _ctx(model, epoch):
    return EpochContext(model=model, epoch=epoch, num_epochs=3, train_loader=None, val_loader=None,
                        task=None, device=CPU, optimizer=None, to_device=None)


def _trainer(cfg):
    trainer, batches = tiny_trainer(InfoReg(cfg))
    return trainer, trainer.balancer, batches


def test_proximal_pull_toward_the_epoch_start_weights_and_trace_bookkeeping():
    trainer, bal, batches = _trainer(InfoRegConfig(beta_by_modality={"b": 0.5}))
    seen = []
    original = bal.on_after_backward

    def spy(ctx):
        before = {m: [p.grad.clone() for p in bal._params[m]] for m in bal.modalities}
        original(ctx)
        after = {m: [p.grad.clone() for p in bal._params[m]] for m in bal.modalities}
        seen.append((before, after, bal._scores.clone(), {m: [p.detach().clone() for p in bal._params[m]]
                                                          for m in bal.modalities}))

    bal.on_after_backward = spy
    bal.on_train_epoch_start(_ctx(trainer.model, 0))
    start = {m: [s.clone() for s in bal._snapshot[m]] for m in bal.modalities}
    # θ^prev: one flat copy per encoder, counted in the memory overhead and saved (a resumed run
    # pulls toward the same weights)
    encoder_bytes = sum(p.numel() * p.element_size() for p in trainer.model.encoders.parameters())
    prev = [b for n, b in bal.named_buffers() if n.startswith("prev_")]
    assert sum(b.numel() * b.element_size() for b in prev) == encoder_bytes
    assert sum(k.startswith("prev_") for k in bal.state_dict()) == len(bal.modalities)
    for i, b in enumerate(batches[:2]):
        trainer.train_step(b, 0, i)
    before, after, scores, params = seen[1]  # second step: θ has moved away from θ^prev
    beta = proximal_coefficients(scores, torch.tensor([0.95, 0.5]))
    assert int((beta > 0).sum()) == 1
    for i, m in enumerate(bal.modalities):
        for g0, g1, p, p0 in zip(before[m], after[m], params[m], start[m], strict=True):
            torch.testing.assert_close(g1, g0 + beta[i] * (p - p0))
    # the epoch's trace: Σ over steps and weight matrices of mean(g²), after the proximal term
    expected = [sum(fisher_trace([g for g in step[1][m] if g.dim() >= 2]).item() for step in seen)
                for m in bal.modalities]
    bal.on_train_epoch_start(_ctx(trainer.model, 1))
    assert bal.host_state()["traces"] == [pytest.approx(expected)]
    assert bal._k == 1.0 and bal._window  # [0]*10 + [t]: k = 1


def test_no_edit_outside_the_window():
    trainer, bal, batches = _trainer(InfoRegConfig())
    bal.load_host_state({"traces": [[1.0, 1.0]] * 12, "window": True, "k": 1.0})  # flat trace: k = 0 <= 0.05
    bal.on_train_epoch_start(_ctx(trainer.model, 12))
    assert bal._k == 0.0 and not bal._window
    grads = []
    original = bal.on_after_backward

    def spy(ctx):
        before = [p.grad.clone() for p in trainer.model.encoders.parameters()]
        original(ctx)
        grads.append((before, [p.grad.clone() for p in trainer.model.encoders.parameters()]))

    bal.on_after_backward = spy
    trainer.train_step(batches[0], 12, 0)
    trainer.train_step(batches[1], 12, 1)
    for before, after in grads:
        assert all(torch.equal(x, y) for x, y in zip(before, after, strict=True))
    assert bal.diagnostics()["window"] == 0.0


def test_window_reads_one_modalitys_trace_when_asked():
    trainer, bal, _ = _trainer(InfoRegConfig(window_trace="b", window_length=2))
    # a: growing, b: flat -> b's k = 0 (closed); the encoders' sum would be open
    bal.load_host_state({"traces": [[1.0, 3.0], [2.0, 3.0], [4.0, 3.0]], "window": True, "k": 1.0})
    bal.on_train_epoch_start(_ctx(trainer.model, 3))
    assert bal._k == 0.0 and not bal._window


def test_neutral_setting_reproduces_joint_exactly():
    cfg = TrainConfig(epochs=2, batch_size=16, eval_modality_scores=False, cost_steps=0)
    assert_fits_like_joint(InfoReg(InfoRegConfig(beta=0.0, unimodal_grad=False)), cfg)


def test_config_and_setup_errors():
    for key, value in (("beta", -0.1), ("window_length", 0), ("window_threshold", float("nan"))):
        with pytest.raises(ConfigError, match=key):
            METHODS.build("inforeg", None, **{key: value})
    with pytest.raises(ConfigError, match="beta_by_modality"):
        METHODS.build("inforeg", None, beta_by_modality={"a": -1.0})
    model, task = tiny_model(), make_task("cls", 3)
    with pytest.raises(ConfigError, match="unknown modalities"):
        InfoReg(InfoRegConfig(beta_by_modality={"x": 0.9})).setup(model, task, lambda params, **kw: None)
    with pytest.raises(ConfigError, match="window_trace"):
        InfoReg(InfoRegConfig(window_trace="audio")).setup(model, task, lambda params, **kw: None)
    assert METHODS.build("inforeg", "cremad").config.window_trace == "audio"
    assert METHODS.build("inforeg", "synthetic").config.window_length == 2


@pytest.mark.parametrize("ds_name", ["synthetic_cls2", "synthetic_cls3", "synthetic_reg3", "synthetic_seg4"])
def test_short_fit_on_every_synthetic_task(ds_name):
    bal = InfoReg()
    result = short_fit(bal, ds_name, batch_size=32)
    assert len(bal.host_state()["traces"]) == 1 and all(t > 0 for t in bal.host_state()["traces"][0])
    assert result.history[-1]["diagnostics"]["window"] == 1.0
