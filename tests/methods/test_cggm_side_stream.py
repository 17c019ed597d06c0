"""CGGM's ``side_stream``: on CUDA the heads run on a second stream with results identical to one
stream (``gpu``); off CUDA a warning and no effect; run ids unchanged while it is off."""

from __future__ import annotations

import functools
import warnings

import pytest
import torch

from mmbalance.datasets import DATASETS
from mmbalance.methods.cggm import CGGM, CGGMConfig
from mmbalance.models import MODELS
from mmbalance.resolve import RunSpec, resolve_run
from mmbalance.tasks import make_task
from mmbalance.train import TrainConfig, Trainer, batch_to_device, make_loader, seed_everything

STEPS = 6


@functools.cache
def _data(ds_name: str):
    ds = DATASETS.build(ds_name, n_train=STEPS * 16, n_val=16, n_test=16)
    spec = ds.spec
    return ds, spec, make_task(spec.task, spec.num_outputs, **dict(spec.task_options))


def _run(
    ds_name: str, side_stream: bool, device: torch.device, amp: str = "none", direction: str = "official"
) -> tuple[dict[str, torch.Tensor], dict[str, float], dict[str, float], list]:
    """``STEPS`` training steps of CGGM from seed 0; returns every state tensor after them, the loss
    terms' means, the diagnostics and the CUDA streams the heads ran on."""
    ds, spec, task = _data(ds_name)
    cfg = TrainConfig(batch_size=16, amp=amp, eval_modality_scores=False, cost_steps=0)
    seed_everything(0)
    model = MODELS.build(spec.default_model)(spec)
    balancer = CGGM(CGGMConfig(side_stream=side_stream, direction=direction, grad_cos_every=2))
    trainer = Trainer(model, balancer, task, cfg, device, steps_per_epoch=STEPS)
    streams = []
    if device.type == "cuda":
        balancer.heads.register_forward_pre_hook(lambda *_: streams.append(torch.cuda.current_stream(device)))
    loader = make_loader(ds.split("train"), cfg, device, train=True)
    for i, batch in zip(range(STEPS), loader, strict=False):
        trainer.train_step(batch_to_device(batch, device), 0, i)
    terms = trainer.pop_epoch_terms()
    state = {f"model.{k}": v for k, v in model.state_dict().items()}
    state.update({f"cggm.{k}": v for k, v in balancer.state_dict().items()})
    optimizers = [("main", trainer.optimizer), *(("heads", o) for o in balancer.auxiliary_optimizers())]
    for name, optimizer in optimizers:
        for index, values in optimizer.state_dict()["state"].items():
            state.update({f"{name}.{index}.{k}": v for k, v in values.items() if isinstance(v, torch.Tensor)})
    return state, terms, balancer.diagnostics(), streams


def _assert_identical(one, two):
    state, terms, diagnostics, _ = one
    state2, terms2, diagnostics2, _ = two
    assert state.keys() == state2.keys()
    different = [k for k in state if not torch.equal(state[k], state2[k])]
    assert not different, f"side_stream changed {different[:8]}"
    assert terms == terms2
    assert diagnostics == pytest.approx(diagnostics2, abs=0, rel=0, nan_ok=True)


def test_off_cuda_it_warns_and_changes_nothing():
    cpu = torch.device("cpu")
    with pytest.warns(UserWarning, match="side_stream=True has no effect on device 'cpu'"):
        on = _run("synthetic_cls3", True, cpu)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # off: no warning
        off = _run("synthetic_cls3", False, cpu)
    _assert_identical(on, off)


def test_run_ids_unchanged_while_off():
    default = resolve_run(RunSpec("cggm", "synthetic_cls2")).run_id
    assert resolve_run(RunSpec("cggm", "synthetic_cls2", overrides={"side_stream": False})).run_id == default
    assert resolve_run(RunSpec("cggm", "synthetic_cls2", overrides={"side_stream": True})).run_id != default


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("ds_name", ["synthetic_cls3", "synthetic_reg3", "synthetic_seg4"])
@pytest.mark.parametrize("amp", ["none", "bf16", "fp16"])
@pytest.mark.parametrize("direction", ["official", "paper"])
def test_two_streams_give_the_single_stream_results(ds_name, amp, direction):
    """Vector, sequence and map heads; fp32, bf16 and fp16 with its GradScaler; both direction modes:
    every weight, buffer, optimizer state, loss-term mean and diagnostic is bitwise the same, and the
    heads did run on a stream other than the main one."""
    device = torch.device("cuda")
    one = _run(ds_name, False, device, amp, direction)
    two = _run(ds_name, True, device, amp, direction)
    _assert_identical(one, two)
    main = torch.cuda.current_stream(device)
    assert one[3] and all(s == main for s in one[3])
    assert two[3] and all(s != main for s in two[3])
