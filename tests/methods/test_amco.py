"""AMCo: mask schedule, class mask and dependency shares by hand; the masked step; the window.

No neutral setting exists: the late-fusion classifier (unimodal heads, sum, K x K layer) replaces
the model's fusion head, so no setting reproduces ``joint``.
"""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from mmbalance.errors import ConfigError, UnsupportedError
from mmbalance.methods import METHODS
from mmbalance.methods.amco import AMCo, AMCoConfig, class_mask, dependency_shares, mask_ratio
from mmbalance.tasks import make_task
from mmbalance.train import TrainConfig, fit

from ..conftest import tiny_model, tiny_splits
from ._helpers import short_fit, start_epoch, tiny_trainer

CPU = torch.device("cpu")


def test_mask_ratio_schedule_by_hand():
    # l_t = batch * epoch * 0.1, p_t = sin(pi/2 * min(0.3, l_t) / 0.3)
    assert mask_ratio(5, 0, eps=0.3, l_step=0.1) == 0.0  # epoch 0: l_t stays 0
    assert mask_ratio(1, 1, 0.3, 0.1) == pytest.approx(0.5)  # l = 0.1: sin(pi/6) = 0.5
    assert mask_ratio(2, 1, 0.3, 0.1) == pytest.approx(0.8660254038)  # l = 0.2: sin(pi/3)
    assert mask_ratio(1, 2, 0.3, 0.1) == pytest.approx(0.8660254038)  # l = 0.2 again
    assert mask_ratio(3, 1, 0.3, 0.1) == pytest.approx(1.0)  # l = 0.3 = eps: sin(pi/2)
    assert mask_ratio(40, 7, 0.3, 0.1) == pytest.approx(1.0)  # capped at eps


def test_class_mask_zeroes_floor_ratio_times_k_classes():
    torch.manual_seed(0)
    # K = 8: ratio 0.5 -> 4 zeros; 0.8660 -> floor(6.93) = 6 zeros; 0 -> none; 1 -> all
    for ratio, zeros in ((0.5, 4), (0.8660254038, 6), (0.0, 0), (1.0, 8)):
        mask = class_mask(8, ratio, CPU)
        assert mask.shape == (8,) and int((mask == 0).sum()) == zeros and set(mask.tolist()) <= {0.0, 1.0}
    draws = torch.stack([class_mask(8, 0.5, CPU) for _ in range(2000)])
    assert draws.mean(dim=0).sub(0.5).abs().max().item() < 0.05  # every class equally likely masked


def test_dependency_shares_by_hand():
    # sample 1: u_a = (0, 0), u_v = (ln 2, ln 2): softmax of (0, 0, ln2, ln2) = (1, 1, 2, 2) / 6 -> (1/3, 2/3)
    # sample 2: u_a = (ln 3, ln 3), u_v = (0, 0): (3, 3, 1, 1) / 8 -> (3/4, 1/4)
    # batch means: a = (1/3 + 3/4) / 2 = 13/24, v = (2/3 + 1/4) / 2 = 11/24
    u_a = torch.tensor([[0.0, 0.0], [math.log(3), math.log(3)]])
    u_v = torch.tensor([[math.log(2), math.log(2)], [0.0, 0.0]])
    torch.testing.assert_close(dependency_shares([u_a, u_v]), torch.tensor([13 / 24, 11 / 24]))


def _trainer(**cfg):
    bal = AMCo(AMCoConfig(**cfg))
    trainer, batches = tiny_trainer(bal)
    return trainer, bal, batches


def test_the_dependent_modality_is_masked_and_every_modality_has_its_loss():
    trainer, bal, batches = _trainer()
    start_epoch(trainer, 1)
    bal._batch = 3  # l_t = 3 * 1 * 0.1 = 0.3 = eps: p_t = 1, every class masked
    bal.dependent = torch.tensor([True, False])  # "a" was dependent on the previous batch
    batch = batches[0]
    out = bal.forward_step(trainer.model, batch)
    raw = bal.heads({m: trainer.model.encoders[m](batch[m]) for m in ("a", "b")})
    logits = out.extras["amco.logits"]
    assert torch.equal(logits["a"], torch.zeros_like(logits["a"]))
    torch.testing.assert_close(logits["b"], raw["b"])
    torch.testing.assert_close(out.prediction, bal.fusion_layer(raw["b"]))  # only "b" reaches the fusion
    terms = bal.loss_terms(out, batch, trainer.task)
    assert set(terms) == {"task", "unimodal/a", "unimodal/b"}
    # cross-entropy of all-zero logits over K = 3 classes: log 3
    torch.testing.assert_close(terms["unimodal/a"], torch.tensor(math.log(3.0)))
    torch.testing.assert_close(terms["unimodal/b"], F.cross_entropy(raw["b"], batch["target"]))
    shares = dependency_shares([logits["a"].detach(), logits["b"].detach()])
    assert bal.dependent.tolist() == (shares > 0.5).tolist()
    assert bal.diagnostics()["masked/a"] == 1.0


def test_outside_the_window_no_mask_and_only_the_fused_loss():
    trainer, bal, batches = _trainer(modulation_starts=2)
    start_epoch(trainer, 1)
    bal.dependent = torch.tensor([True, True])
    bal._batch = 10
    out = bal.forward_step(trainer.model, batches[0])
    raw = bal.heads({m: trainer.model.encoders[m](batches[0][m]) for m in ("a", "b")})
    torch.testing.assert_close(out.prediction, bal.fusion_layer(raw["a"] + raw["b"]))
    assert set(bal.loss_terms(out, batches[0], trainer.task)) == {"task"}
    start_epoch(trainer, 2)
    assert bal.dependent.tolist() == [False, False] and bal._batch == 0  # reset per epoch


def test_steps_train_heads_fusion_layer_and_encoders_and_predict_is_unmasked():
    trainer, bal, batches = _trainer()
    start_epoch(trainer, 1)
    trainer.train_step(batches[0], 1, 0)
    before = [p.detach().clone() for p in list(bal.fusion_layer.parameters()) + list(bal.heads.parameters())]
    enc = [p.detach().clone() for p in trainer.model.encoders.parameters()]
    trainer.train_step(batches[1], 1, 1)
    after = list(bal.fusion_layer.parameters()) + list(bal.heads.parameters())
    assert all(not torch.equal(a, p) for a, p in zip(before, after, strict=True))
    assert any(not torch.equal(a, p) for a, p in zip(enc, trainer.model.encoders.parameters(), strict=True))
    assert len(bal.auxiliary_optimizers()) == 2
    bal.dependent = torch.tensor([True, True])
    out = trainer.model(batches[2])
    raw = bal.heads(out.features)
    torch.testing.assert_close(bal.predict(out), bal.fusion_layer(raw["a"] + raw["b"]))


def test_config_errors_and_classification_only():
    bad = (("sigma", 1.5), ("eps", 0.0), ("eps", math.inf), ("l_step", -0.1), ("modulation_ends", -1))
    for key, value in bad:
        with pytest.raises(ConfigError, match=key):
            METHODS.build("amco", None, **{key: value})
    cls = METHODS.get("amco")
    assert not cls.supports(task="reg") and not cls.supports(task="seg")
    splits, spec = tiny_splits()
    with pytest.raises(UnsupportedError, match="amco"):
        fit(tiny_model(), AMCo(), splits, replace(spec, task="seg"), make_task("seg", 4),
            TrainConfig(epochs=1, batch_size=16, cost_steps=0), CPU)


@pytest.mark.parametrize("dataset", ["synthetic_cls2", "synthetic_cls3"])
def test_fit_on_each_synthetic_task(dataset):
    result = short_fit("amco", dataset, samples=64)
    modalities = result.trainer.model.modalities
    expected = {f"{k}/{m}" for k in ("masked", "share") for m in modalities}
    assert set(result.history[1]["diagnostics"]) == expected
