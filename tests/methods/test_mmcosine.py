"""MMCosine: cosine logits by hand, the summed cosine classifier in a step, norm invariance.

No neutral setting exists: the cosine classifier replaces the model's fusion head, so no value of
``scaling`` reproduces ``joint``.
"""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from mmbalance.errors import ConfigError, UnsupportedError
from mmbalance.methods import METHODS
from mmbalance.methods.mmcosine import MMCosine, MMCosineConfig, cosine_logits
from mmbalance.tasks import make_task
from mmbalance.train import TrainConfig, fit

from ..conftest import tiny_model, tiny_splits
from ._helpers import short_fit, tiny_trainer

CPU = torch.device("cpu")


def test_cosine_logits_by_hand():
    # z = (3, 4) -> (0.6, 0.8); class weights (1, 0), (0, 2), (1, 1) -> (1, 0), (0, 1), (1, 1)/sqrt(2)
    # cosines 0.6, 0.8, (0.6 + 0.8)/sqrt(2) = 0.9899494937; times s = 10
    feature = torch.tensor([[3.0, 4.0], [0.0, 0.0]])
    weight = torch.tensor([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]])
    logits = cosine_logits(feature, weight, 10.0)
    expected = torch.tensor([[6.0, 8.0, 9.899494937], [0.0, 0.0, 0.0]])  # a zero feature gives 0
    torch.testing.assert_close(logits, expected)


def _trainer(**cfg):
    bal = MMCosine(MMCosineConfig(**cfg))
    trainer, batches = tiny_trainer(bal)
    return trainer, bal, batches[0]


def test_the_prediction_is_the_sum_of_scaled_cosines_and_the_only_loss():
    trainer, bal, batch = _trainer(scaling=15.0)
    out = bal.forward_step(trainer.model, batch)
    z = {m: trainer.model.encoders[m](batch[m]) for m in ("a", "b")}
    w = {m: bal.heads.heads[m].net.weight for m in ("a", "b")}
    expected = sum(15.0 * F.normalize(z[m], dim=1) @ F.normalize(w[m], dim=1).t() for m in ("a", "b"))
    torch.testing.assert_close(out.prediction, expected)
    terms = bal.loss_terms(out, batch, trainer.task)
    assert set(terms) == {"task"}
    torch.testing.assert_close(terms["task"], F.cross_entropy(expected, batch["target"]))
    torch.testing.assert_close(bal.predict(out), expected)
    # no logit can exceed s per modality
    assert out.prediction.abs().max().item() <= 2 * 15.0 + 1e-4


def test_a_step_trains_encoders_and_class_weights_not_the_unused_head():
    trainer, bal, batch = _trainer()
    trainer.train_step(batch, 0, 0)  # builds the weights lazily
    head_before = [p.detach().clone() for p in trainer.model.head.parameters()]
    enc_before = [p.detach().clone() for p in trainer.model.encoders.parameters()]
    w_before = bal.heads.heads["a"].net.weight.detach().clone()
    trainer.train_step(batch, 0, 1)
    head_after, enc_after = trainer.model.head.parameters(), trainer.model.encoders.parameters()
    assert all(torch.equal(a, p) for a, p in zip(head_before, head_after, strict=True))
    assert any(not torch.equal(a, p) for a, p in zip(enc_before, enc_after, strict=True))
    assert not torch.equal(w_before, bal.heads.heads["a"].net.weight)
    assert set(bal.diagnostics()) == {"target_logit/a", "target_logit/b"}


def test_logits_do_not_depend_on_feature_norms():
    # the balancing property: scaling one modality's features leaves every logit unchanged
    trainer, bal, batch = _trainer()
    out = bal.forward_step(trainer.model, batch)
    louder = replace(out, features={"a": out.features["a"] * 50.0, "b": out.features["b"]})
    torch.testing.assert_close(bal.predict(louder), bal.predict(out))


def test_inference_state_holds_the_class_weights():
    trainer, bal, batch = _trainer()
    bal.forward_step(trainer.model, batch)
    state = bal.inference_state_dict()
    assert torch.equal(state["heads.heads.a.net.weight"], bal.heads.heads["a"].net.weight)


def test_config_errors_and_classification_only():
    for value in (0.0, -1.0, math.inf):
        with pytest.raises(ConfigError, match="scaling"):
            METHODS.build("mmcosine", None, scaling=value)
    with pytest.raises(ConfigError, match="sequence_pool"):
        METHODS.build("mmcosine", None, sequence_pool="max")
    cls = METHODS.get("mmcosine")
    assert not cls.supports(task="reg") and not cls.supports(task="seg")
    splits, spec = tiny_splits()
    with pytest.raises(UnsupportedError, match="mmcosine"):
        fit(tiny_model(), MMCosine(), splits, replace(spec, task="reg", num_outputs=1), make_task("reg", 1),
            TrainConfig(epochs=1, batch_size=16, cost_steps=0), CPU)


@pytest.mark.parametrize("dataset", ["synthetic_cls2", "synthetic_cls3"])
def test_fit_on_each_synthetic_task(dataset):
    result = short_fit("mmcosine", dataset, samples=64)
    modalities = result.trainer.model.modalities
    assert set(result.history[0]["diagnostics"]) == {f"target_logit/{m}" for m in modalities}
