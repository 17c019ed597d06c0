"""``unimodal``: only the named modality's encoder learns, and its predictions ignore the others."""

from __future__ import annotations

import pytest
import torch

from mmbalance.errors import ConfigError
from mmbalance.methods import METHODS
from mmbalance.tasks import make_task
from mmbalance.train import TrainConfig, Trainer

from ..conftest import tiny_model, tiny_splits

CPU = torch.device("cpu")


def _trainer(modality="a"):
    model = tiny_model()
    balancer = METHODS.build("unimodal", None, modality=modality)
    return Trainer(model, balancer, make_task("cls", 3), TrainConfig(lr=1e-2), CPU)


def test_only_the_named_encoder_is_updated():
    splits, _ = tiny_splits()
    trainer = _trainer("a")
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    batch = splits["train"].__getitems__(list(range(16)))
    for i in range(3):
        trainer.train_step(batch, 0, i)
    after = trainer.model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert any(k.startswith("encoders.a.") for k in changed)
    assert not any(k.startswith("encoders.b.") for k in changed)
    assert any(k.startswith("head.") for k in changed)


def test_prediction_ignores_other_modalities():
    splits, _ = tiny_splits()
    trainer = _trainer("a")
    batch = splits["test"].__getitems__(list(range(8)))
    other = dict(batch, b=torch.randn_like(batch["b"]) * 100)
    model, balancer = trainer.model.eval(), trainer.balancer
    with torch.no_grad():
        p1 = balancer.predict(model(batch))
        p2 = balancer.predict(model(other))
    assert torch.equal(p1, p2)


def test_modality_is_required_and_checked():
    with pytest.raises(ConfigError, match="modality must be the name of one of the dataset.s modalities"):
        METHODS.build("unimodal")
    with pytest.raises(ConfigError, match=r"modality must be one of \('a', 'b'\), got 'c'"):
        _trainer("c")
