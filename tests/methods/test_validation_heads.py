"""The shared base of MSES and MSLR (mmbalance/methods/_validation_heads.py), and heads that a
configuration switches off (``HeadedBalancer.uses_heads``)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

import mmbalance.methods._validation_heads as validation_heads_module
from mmbalance.balancer import EpochContext
from mmbalance.methods._config import HeadConfig
from mmbalance.methods._validation_heads import ValidationHeadsBalancer
from mmbalance.train import TrainConfig

from ._helpers import tiny_epoch

CPU = torch.device("cpu")
CFG = TrainConfig(epochs=2, batch_size=16, eval_modality_scores=False, cost_steps=0)


@dataclass(frozen=True)
class _Config(HeadConfig):
    heads: bool = True


class _Recorder(ValidationHeadsBalancer):
    """Records every validation it is handed; keeps one buffer read through the host cache."""

    Config = _Config

    def setup(self, model, task, optimizer_factory):
        super().setup(model, task, optimizer_factory)
        self.register_buffer("value", torch.zeros(2, dtype=torch.float64))
        self.calls = []

    def uses_heads(self):
        return self.config.heads

    def on_unimodal_validation(self, ctx, epoch, stats):
        self.calls.append((ctx.epoch, epoch, stats))
        self.value.fill_(float(epoch + 1))


def _setup(heads=True):
    return tiny_epoch(_Recorder(_Config(heads=heads)), CFG, num_epochs=3)


def test_validation_of_the_finished_epoch_from_epoch_one_under_a_forked_rng(monkeypatch):
    trainer, ctx, batches = _setup()
    balancer = trainer.balancer
    balancer.on_train_epoch_start(ctx)  # epoch 0: nothing finished yet
    assert balancer.calls == []
    ctx_1 = EpochContext(**{**ctx.__dict__, "epoch": 1})
    balancer.on_train_epoch_start(ctx_1)  # heads not built yet (no step): nothing to validate
    assert balancer.calls == []
    trainer.train_step(batches[0], 0, 0)
    rng = torch.get_rng_state()
    balancer.on_train_epoch_start(ctx_1)
    assert torch.equal(rng, torch.get_rng_state())
    (seen_epoch, finished, stats), = balancer.calls
    assert (seen_epoch, finished) == (1, 0) and set(stats) == {"a", "b"}
    loss, score = stats["a"]
    assert loss > 0 and 0.0 <= score <= 1.0


def test_host_cache_is_read_once_and_dropped_on_epoch_start_and_state_load(monkeypatch):
    trainer, ctx, batches = _setup()
    balancer = trainer.balancer
    trainer.train_step(batches[0], 0, 0)
    assert balancer.host_values("value") == [0.0, 0.0]
    balancer.value.fill_(5.0)
    assert balancer.host_values("value") == [0.0, 0.0]  # cached: no device read per step
    balancer.on_train_epoch_start(ctx)  # epoch 0: no validation, but the cache is re-read
    assert balancer.host_values("value") == [5.0, 5.0]
    scripted = {"a": (1.0, 1.0), "b": (1.0, 1.0)}
    monkeypatch.setattr(validation_heads_module, "unimodal_validation", lambda *a, **k: scripted)
    balancer.on_train_epoch_start(EpochContext(**{**ctx.__dict__, "epoch": 3}))
    assert balancer.host_values("value") == [3.0, 3.0]  # set by the hook for epoch 2, then re-read
    state = {k: v.clone() for k, v in balancer.state_dict().items()}
    state["value"] = torch.full((2,), 7.0, dtype=torch.float64)
    balancer.load_state_dict(state)
    assert balancer.host_values("value") == [7.0, 7.0]


def test_a_configuration_without_heads_adds_no_term_and_validates_nothing():
    trainer, ctx, batches = _setup(heads=False)
    balancer = trainer.balancer
    assert balancer.heads is None
    output = trainer.model(batches[0])
    assert list(balancer.loss_terms(output, batches[0], trainer.task)) == ["task"]
    trainer.train_step(batches[0], 0, 0)  # on_after_optimizer_step steps nothing
    balancer.on_train_epoch_start(EpochContext(**{**ctx.__dict__, "epoch": 1}))
    assert balancer.calls == [] and balancer.auxiliary_optimizers() == []
