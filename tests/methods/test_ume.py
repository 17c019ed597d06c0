"""UME: the ensemble rule by hand, unimodal models trained exactly as if alone, ensemble at test."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from mmbalance.errors import ConfigError, UnsupportedError
from mmbalance.methods import METHODS
from mmbalance.methods.ume import UME, UMEConfig, ensemble_predictions
from mmbalance.tasks import make_task
from mmbalance.train import TrainConfig, Trainer, batch_to_device, fit, make_loader, make_optimizer_factory

from ..conftest import tiny_model, tiny_splits

CPU = torch.device("cpu")
CFG = TrainConfig(epochs=2, batch_size=16, eval_modality_scores=False, cost_steps=0)


def test_ensemble_rules_by_hand():
    z = {"a": torch.tensor([[0.0, 0.0]]), "b": torch.tensor([[math.log(3.0), 0.0]])}
    assert torch.allclose(ensemble_predictions(z, "logits"), torch.tensor([[math.log(3.0) / 2, 0.0]]))
    # softmax: a (0.5, 0.5), b (0.75, 0.25); mean (0.625, 0.375); log of it
    assert torch.allclose(ensemble_predictions(z, "probs"), torch.log(torch.tensor([[0.625, 0.375]])))
    # float64 logits stay float64: log(0.625), log(0.375) to 1e-12 (a float32 cast is off by ~1e-8)
    z64 = {
        "a": torch.zeros(1, 2, dtype=torch.float64),
        "b": torch.tensor([[math.log(3.0), 0.0]], dtype=torch.float64),
    }
    probs = ensemble_predictions(z64, "probs")
    assert probs.dtype == torch.float64
    expected = torch.tensor([[math.log(0.625), math.log(0.375)]], dtype=torch.float64)
    torch.testing.assert_close(probs, expected, rtol=1e-12, atol=0)


def test_each_unimodal_model_trains_exactly_as_if_alone():
    """Modality a's encoder and its fusion + head copy, trained alone on (x_a, zeros for b), reach the
    very same weights as inside UME's summed loss."""
    splits, _ = tiny_splits()
    model = tiny_model()
    balancer = UME()
    trainer = Trainer(model, balancer, make_task("cls", 3), CFG, CPU, steps_per_epoch=3)
    batches = [batch_to_device(b, CPU) for b in make_loader(splits["train"], CFG, CPU, train=True)]
    encoder, branch = copy.deepcopy(model.encoders["a"]), copy.deepcopy(balancer.heads.branches["a"])
    fusion_before = [p.clone() for p in list(model.fusion.parameters()) + list(model.head.parameters())]
    for i, b in enumerate(batches):
        trainer.train_step(b, 0, i)
    factory = make_optimizer_factory(CFG)
    opt_e, opt_h = factory(list(encoder.parameters())), factory(list(branch.parameters()))
    for b in batches:
        opt_e.zero_grad()
        opt_h.zero_grad()
        f = encoder(b["a"])
        logits = branch["head"](branch["fusion"]({"a": f, "b": torch.zeros(f.shape[0], 8)}))[0]
        make_task("cls", 3).loss(logits, b["target"]).backward()
        opt_e.step()
        opt_h.step()
    for p, q in zip(list(model.encoders["a"].parameters()) + list(balancer.heads.branches["a"].parameters()),
                    list(encoder.parameters()) + list(branch.parameters()), strict=True):
        assert torch.equal(p, q)
    after = list(model.fusion.parameters()) + list(model.head.parameters())
    assert all(torch.equal(p, q) for p, q in zip(after, fusion_before, strict=True))  # unused by UME


@pytest.mark.parametrize("head", ["model", "linear"])
def test_prediction_is_the_unimodal_ensemble_not_the_fusion_head(head):
    splits, spec = tiny_splits()
    model = tiny_model()
    balancer = UME(UMEConfig(head=head))
    result = fit(model, balancer, splits, spec, make_task("cls", 3), CFG, CPU)
    assert 0.0 <= result.test["acc"] <= 1.0
    batch = batch_to_device(next(iter(make_loader(splits["test"], CFG, CPU, train=False))), CPU)
    with torch.no_grad():
        out = model(batch)
        before = balancer.predict(out)
        model.head.out_layer.weight.add_(1.0)
        after = balancer.predict(model(batch))
        unimodal = balancer.heads(out.features)
    assert torch.equal(before, after)
    assert torch.allclose(before, (unimodal["a"] + unimodal["b"]) / 2)
    prefix = "heads.branches.a.head" if head == "model" else "heads.heads.a.net"
    assert any(k.startswith(prefix) for k in balancer.inference_state_dict())


def test_config_and_setup_errors():
    with pytest.raises(ConfigError, match="ensemble must be one of"):
        METHODS.build("ume", None, ensemble="vote")
    with pytest.raises(ConfigError, match="head must be one of"):
        METHODS.build("ume", None, head="mlp")
    with pytest.raises(UnsupportedError, match="regression needs ensemble='logits'"):
        probs = UME(UMEConfig(ensemble="probs"))
        probs.setup(tiny_model(classes=1), make_task("reg", 1), make_optimizer_factory(CFG))
