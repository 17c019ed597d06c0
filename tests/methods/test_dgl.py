"""DGL: the gradient routing by hand (fusion/head from L_mm only, encoders from α·L_m only), terms,
config errors, and a short fit on every synthetic task."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mmbalance.errors import ConfigError
from mmbalance.methods import METHODS
from mmbalance.methods.dgl import DGL, DGLConfig
from mmbalance.models.base import Head, MultimodalModel
from mmbalance.tasks import make_task

from ..conftest import ConcatFusion
from ._helpers import short_fit


def scalar_model(w_a=2.0, w_b=-1.0, v=(0.5, 1.0), c=0.25):
    """z_a = w_a x_a, z_b = w_b x_b (no bias); fusion concat(z_a, z_b); ŷ = v_a z_a + v_b z_b + c."""
    enc = {"a": nn.Linear(1, 1, bias=False), "b": nn.Linear(1, 1, bias=False)}
    head = Head(nn.Identity(), nn.Linear(2, 1))
    with torch.no_grad():
        enc["a"].weight.fill_(w_a)
        enc["b"].weight.fill_(w_b)
        head.out_layer.weight.copy_(torch.tensor([list(v)]))
        head.out_layer.bias.fill_(c)
    return MultimodalModel(enc, ConcatFusion(), head)


def test_gradient_routing_by_hand():
    model, task = scalar_model(), make_task("reg", 1, loss="mse")
    bal = DGL(DGLConfig(alpha=2.0))
    bal.setup(model, task, lambda params, **kw: torch.optim.SGD(params, lr=0.1))
    batch = {"a": torch.tensor([[1.0]]), "b": torch.tensor([[2.0]]), "target": torch.tensor([1.0])}
    terms = bal.loss_terms(bal.forward_step(model, batch), batch, task)
    # z = (2, -2); ŷ = 0.5*2 + 1*(-2) + 0.25 = -0.75; L_mm = (-1.75)^2 = 3.0625
    # ŷ_a = 0.5*2 + 0.25 = 1.25, L_a = 0.0625; ŷ_b = -2 + 0.25 = -1.75, L_b = 7.5625; α = 2
    torch.testing.assert_close(terms["task"], torch.tensor(3.0625))
    torch.testing.assert_close(terms["unimodal/a"], torch.tensor(2 * 0.0625))
    torch.testing.assert_close(terms["unimodal/b"], torch.tensor(2 * 7.5625))
    sum(terms.values()).backward()
    # head from L_mm only: dv_a = 2(ŷ - y) z_a = 2(-1.75)(2) = -7, dv_b = 2(-1.75)(-2) = 7, dc = -3.5
    torch.testing.assert_close(model.head.out_layer.weight.grad, torch.tensor([[-7.0, 7.0]]))
    torch.testing.assert_close(model.head.out_layer.bias.grad, torch.tensor([-3.5]))
    # encoders from α L_m only: dw_a = α 2(ŷ_a - y) v_a x_a = 2*2*0.25*0.5*1 = 0.5
    # dw_b = α 2(ŷ_b - y) v_b x_b = 2*2*(-2.75)*1*2 = -22  (joint would give 2(-1.75)*0.5 = -1.75 for w_a)
    torch.testing.assert_close(model.encoders["a"].weight.grad, torch.tensor([[0.5]]))
    torch.testing.assert_close(model.encoders["b"].weight.grad, torch.tensor([[-22.0]]))


def test_the_fused_prediction_is_the_models_own_but_stops_at_the_fusion():
    model, task = scalar_model(), make_task("reg", 1, loss="mse")
    bal = DGL()
    bal.setup(model, task, lambda params, **kw: None)
    batch = {"a": torch.tensor([[1.0], [3.0]]), "b": torch.tensor([[2.0], [0.5]]), "target": torch.zeros(2)}
    out = bal.forward_step(model, batch)
    torch.testing.assert_close(out.prediction, model(batch).prediction)
    out.prediction.sum().backward()
    assert model.head.out_layer.weight.grad is not None
    assert all(p.grad is None for p in model.encoders.parameters())
    assert out.features["a"].requires_grad  # the unimodal passes still reach the encoders


def test_config_errors():
    with pytest.raises(ConfigError, match="alpha"):
        METHODS.build("dgl", None, alpha=0.0)
    with pytest.raises(ConfigError, match="alpha"):
        METHODS.build("dgl", None, alpha=float("inf"))
    with pytest.raises(ConfigError, match="unknown config key"):
        METHODS.build("dgl", None, gamma=1.0)
    assert METHODS.build("dgl", "cremad").config.alpha == 5.0


@pytest.mark.parametrize("ds_name", ["synthetic_cls2", "synthetic_cls3", "synthetic_reg3", "synthetic_seg4"])
def test_short_fit_on_every_synthetic_task(ds_name):
    result = short_fit(DGL(), ds_name, batch_size=32)
    modalities = result.trainer.balancer.modalities
    assert set(result.history[-1]["diagnostics"]) == {f"unimodal_loss/{m}" for m in modalities}
