"""The exact Balancer hook order of DESIGN.md, with a GradScaler and a clipping spy."""

from __future__ import annotations

import torch

import mmbalance.train as train_mod
from mmbalance.balancer import Balancer
from mmbalance.tasks import make_task
from mmbalance.train import TrainConfig, fit

STEP = [
    "forward_step",
    "loss_terms",
    "backward",
    "scaler.unscale_",
    "on_after_backward",
    "clip",
    "scaler.step",
    "optimizer.step",
    "on_after_optimizer_step",
    "scaler.update",
    "optimizer.zero_grad",
]


class Recording(Balancer):
    name = "recording"

    def __init__(self, log):
        super().__init__()
        self.__dict__["log"] = log

    def setup(self, model, task, optimizer_factory):
        super().setup(model, task, optimizer_factory)
        self.log.append("setup")

    def on_train_epoch_start(self, ctx):
        self.log.append("on_train_epoch_start")

    def forward_step(self, model, batch):
        self.log.append("forward_step")
        return super().forward_step(model, batch)

    def loss_terms(self, output, batch, task):
        self.log.append("loss_terms")
        return super().loss_terms(output, batch, task)

    def backward(self, terms, scaler):
        self.log.append("backward")
        super().backward(terms, scaler)

    def on_after_backward(self, ctx):
        # Gradients are already unscaled here: the scaler has recorded unscale_ for the optimizer.
        self.log.append("on_after_backward")

    def on_after_optimizer_step(self, ctx):
        self.log.append("on_after_optimizer_step")

    def on_validation_end(self, epoch, metrics):
        self.log.append("on_validation_end")

    def predict(self, output):
        self.log.append("predict")
        return output.prediction


class SpyScaler(torch.amp.GradScaler):
    def __init__(self, log):
        super().__init__("cpu", init_scale=1024.0, enabled=True)
        self.log = log

    def unscale_(self, optimizer):
        self.log.append("scaler.unscale_")
        return super().unscale_(optimizer)

    def step(self, optimizer, *args, **kwargs):
        self.log.append("scaler.step")
        return super().step(optimizer, *args, **kwargs)

    def update(self, new_scale=None):
        self.log.append("scaler.update")
        return super().update(new_scale)


def test_hook_order_with_scaler_and_clipping(tiny_problem, monkeypatch):
    model, splits, spec = tiny_problem
    log: list[str] = []
    real_clip = torch.nn.utils.clip_grad_norm_

    def clip_spy(params, max_norm, **kw):
        log.append("clip")
        return real_clip(params, max_norm, **kw)

    monkeypatch.setattr(train_mod.nn.utils, "clip_grad_norm_", clip_spy)
    real_init = train_mod.Trainer.__init__

    def init(self, *a, **k):
        real_init(self, *a, **k)
        self.scaler = SpyScaler(log)
        opt = self.optimizer
        real_step, real_zero = opt.step, opt.zero_grad

        def step(*args, **kwargs):
            log.append("optimizer.step")
            return real_step(*args, **kwargs)

        def zero_grad(*args, **kwargs):
            log.append("optimizer.zero_grad")
            return real_zero(*args, **kwargs)

        opt.step, opt.zero_grad = step, zero_grad

    monkeypatch.setattr(train_mod.Trainer, "__init__", init)
    cfg = TrainConfig(epochs=2, batch_size=24, clip_grad_norm=1.0, eval_modality_scores=False, cost_steps=0)
    task = make_task("cls", 3)
    fit(model, Recording(log), splits, spec, task, cfg, torch.device("cpu"))

    steps_per_epoch = 2  # 48 train samples / batch 24
    val_batches = 2
    epoch = (
        ["on_train_epoch_start"] + STEP * steps_per_epoch + ["predict"] * val_batches + ["on_validation_end"]
    )
    expected = ["setup"] + epoch * 2 + ["predict"] * 2  # test pass on the best-validation state
    assert log == expected
