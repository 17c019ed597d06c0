"""The training loop: deferred finiteness check, determinism, model selection, schedules, config."""

from __future__ import annotations

import math

import pytest
import torch

from mmbalance.balancer import Balancer
from mmbalance.errors import ConfigError, NonFiniteLossError, ShapeError
from mmbalance.methods.joint import Joint
from mmbalance.registry import resolve_dataclass
from mmbalance.tasks import make_task
from mmbalance.train import TrainConfig, cosine_lr_lambda, fit, make_optimizer_factory, resolve_device

from .conftest import tiny_model, tiny_splits

CPU = torch.device("cpu")


class NanAtStep(Balancer):
    name = "nan_at_step"

    def __init__(self, at: int):
        super().__init__()
        self.at, self.calls = at, 0

    def loss_terms(self, output, batch, task):
        terms = super().loss_terms(output, batch, task)
        bad = torch.tensor(float("nan") if self.calls == self.at else 0.0)
        self.calls += 1
        terms["penalty"] = bad
        return terms


def _cfg(**kw):
    base = dict(epochs=2, batch_size=16, eval_modality_scores=False, cost_steps=0)
    base.update(kw)
    return TrainConfig(**base)


def test_nan_loss_raises_naming_term_and_step():
    splits, spec = tiny_splits()
    with pytest.raises(NonFiniteLossError, match=r"loss term 'penalty' is nan at step 4 \(epoch 1\)"):
        fit(tiny_model(), NanAtStep(4), splits, spec, make_task("cls", 3), _cfg(), CPU)


def test_nan_detected_within_check_interval():
    splits, spec = tiny_splits()
    bal = NanAtStep(1)
    with pytest.raises(NonFiniteLossError, match="step 1 "):
        fit(tiny_model(), bal, splits, spec, make_task("cls", 3), _cfg(finite_check_every=2), CPU)
    assert bal.calls == 2  # stopped at the first read after the bad step, not at the epoch end


def test_seeded_runs_are_identical():
    splits, spec = tiny_splits()
    results = []
    for _ in range(2):
        torch.manual_seed(0)
        r = fit(tiny_model(seed=1), Joint(), splits, spec, make_task("cls", 3), _cfg(seed=3), CPU)
        results.append((r.test, [h["train_loss"] for h in r.history]))
    assert results[0] == results[1]


def test_test_metrics_come_from_best_validation_epoch():
    splits, spec = tiny_splits()
    r = fit(tiny_model(), Joint(), splits, spec, make_task("cls", 3), _cfg(epochs=4, lr=5e-2), CPU)
    vals = [h["val"]["acc"] for h in r.history]
    assert r.best_epoch == vals.index(max(vals))
    assert r.val == r.history[r.best_epoch]["val"]
    assert set(r.test) >= {"acc", "f1_macro", "f1_weighted", "loss"}


def test_history_records_terms_lr_and_loader_wait():
    splits, spec = tiny_splits()
    r = fit(tiny_model(), Joint(), splits, spec, make_task("cls", 3), _cfg(eval_modality_scores=True), CPU)
    h = r.history[0]
    assert set(h) >= {
        "epoch", "terms", "train_loss", "lr", "epoch_time_s", "loader_wait_s", "val", "diagnostics"
    }
    assert math.isfinite(h["terms"]["task"]) and h["steps"] == 3
    assert {"score/a", "score/b"} <= set(h["val"])


def test_wrong_shapes_from_dataset_raise():
    splits, spec = tiny_splits(dims=(("a", 5), ("b", 3)))
    _, good_spec = tiny_splits()
    with pytest.raises(ShapeError, match=r"modality 'a' has per-sample shape \(5,\), expected \(4,\)"):
        fit(tiny_model(), Joint(), splits, good_spec, make_task("cls", 3), _cfg(), CPU)


def test_cosine_schedule_warmup_and_end():
    cfg = TrainConfig(
        epochs=10, lr=1e-2, scheduler="cosine", warmup_epochs=2, warmup_start_lr=4e-4, final_lr=1e-3
    )
    fn = cosine_lr_lambda(cfg, steps_per_epoch=5)
    assert fn(0) * cfg.lr == pytest.approx(4e-4)
    assert fn(10) * cfg.lr == pytest.approx(1e-2)
    assert fn(50) * cfg.lr == pytest.approx(1e-3)
    assert fn(30) * cfg.lr == pytest.approx(1e-3 + 0.5 * (1e-2 - 1e-3))


def test_optimizer_factory_kinds():
    p = [torch.nn.Parameter(torch.zeros(2))]
    assert isinstance(make_optimizer_factory(TrainConfig(optimizer="adamw"))(p), torch.optim.AdamW)
    sgd = make_optimizer_factory(TrainConfig(optimizer="sgd", momentum=0.5))(p, lr=0.1)
    assert isinstance(sgd, torch.optim.SGD) and sgd.param_groups[0]["momentum"] == 0.5


@pytest.mark.parametrize(
    "values, message",
    [
        ({"epochs": 0}, "epochs must be an integer >= 1, got 0"),
        ({"optimizer": "rmsprop"}, "optimizer must be one of"),
        ({"lr": -1.0}, "lr must be > 0"),
        ({"amp": "fp8"}, "amp must be one of"),
        ({"clip_grad_norm": 0.0}, "clip_grad_norm must be None or > 0"),
    ],
)
def test_train_config_rejects_out_of_range(values, message):
    with pytest.raises(ConfigError, match=message):
        resolve_dataclass(TrainConfig, values, owner="training")


def test_resolve_device():
    assert resolve_device("cpu").type == "cpu"
    with pytest.raises(ConfigError, match="device must be"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="is_available"):
            resolve_device("cuda")
        assert resolve_device("auto").type == "cpu"


def _attention_flags():
    b = torch.backends.cuda
    return b.flash_sdp_enabled(), b.mem_efficient_sdp_enabled(), b.cudnn_sdp_enabled(), b.math_sdp_enabled()


def test_deterministic_attention_is_the_math_kernel_on_cuda_only():
    """The fused attention kernels keep a non-deterministic backward under warn-only deterministic
    mode: a deterministic CUDA run uses the math kernel; CPU runs (and their results) are untouched."""
    from mmbalance.runtime import deterministic_attention
    from mmbalance.train import Trainer

    before = _attention_flags()
    b = torch.backends.cuda
    try:
        Trainer(tiny_model(), Joint(), make_task("cls", 3), TrainConfig(), torch.device("cpu"))
        deterministic_attention(torch.device("cpu"))
        assert _attention_flags() == before
        deterministic_attention(torch.device("cuda"))  # process-wide flags: no GPU needed to set them
        assert _attention_flags() == (False, False, False, True)
    finally:
        b.enable_flash_sdp(before[0])
        b.enable_mem_efficient_sdp(before[1])
        b.enable_cudnn_sdp(before[2])
        b.enable_math_sdp(before[3])
