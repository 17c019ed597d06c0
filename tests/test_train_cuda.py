"""The training loop on CUDA (``gpu``): AMP loss scaling with methods that step their own optimizers,
pinned-memory loaders, methods that move data between host and device, and whole-run determinism
(cuDNN, cuBLAS, the deterministic bilinear resizing) with ``deterministic=True``."""

from __future__ import annotations

import warnings

import pytest
import torch

from mmbalance.datasets import DATASETS
from mmbalance.methods import METHODS
from mmbalance.models import MODELS
from mmbalance.tasks import make_task
from mmbalance.testing import contract_trainer
from mmbalance.train import TrainConfig, batch_to_device, fit, make_loader, seed_everything

from .methods.test_contract_cuda import AMP_REFUSED

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

CUDA = torch.device("cuda")
# Every method but the baselines, on a two-modality classification task every method declares.
METHOD_CASES = [m for m in METHODS.names() if m not in ("joint", "unimodal")]


def _spy_steps(optimizers):
    """Record which optimizers' ``step`` ran (GradScaler skips the call on an inf step)."""
    ran: set[int] = set()

    def spied(optimizer):
        original = optimizer.step

        def step(*args, **kwargs):
            ran.add(id(optimizer))
            return original(*args, **kwargs)

        return step

    for optimizer in optimizers:
        optimizer.step = spied(optimizer)
    return ran


@pytest.mark.parametrize("method", METHOD_CASES)
def test_fp16_overflow_skips_the_steps_it_must_and_keeps_weights_finite(method):
    """A loss scale of 2^100 overflows fp16: the main optimizer's step is skipped, every optimizer
    whose step was skipped leaves its weights unchanged, nothing becomes non-finite (a method stepping
    its own optimizer outside the scaler would apply inf or scaled gradients), and the scale halves."""
    if (method, "fp16") in AMP_REFUSED:
        pytest.skip(f"{method} refuses fp16")
    trainer, batches = contract_trainer(method, "synthetic_cls2", device=CUDA, amp="fp16")
    trainer.train_step(batches[0], 0, 0)  # builds lazy heads and their optimizers
    optimizers = [trainer.optimizer, *trainer.balancer.auxiliary_optimizers()]
    before = {id(p): p.detach().clone() for o in optimizers for g in o.param_groups for p in g["params"]}
    trainer.scaler = torch.amp.GradScaler("cuda", init_scale=2.0**100)
    ran = _spy_steps(optimizers)
    trainer.train_step(batches[1], 0, 1)
    assert id(trainer.optimizer) not in ran, "the main optimizer stepped on overflowed gradients"
    for optimizer in optimizers:
        for group in optimizer.param_groups:
            for p in group["params"]:
                name = type(optimizer).__name__
                assert torch.isfinite(p).all(), f"{method}: a weight of {name} is not finite"
                if id(optimizer) not in ran:
                    assert torch.equal(p, before[id(p)]), f"{method}: a skipped optimizer changed a weight"
    assert trainer.scaler.get_scale() == 2.0**99


@pytest.mark.parametrize("method", METHOD_CASES)
def test_fp16_updates_do_not_depend_on_the_loss_scale(method):
    """With plain SGD an update is -lr * gradient: every optimizer (the main one and the method's own)
    must see unscaled gradients, so loss scales of 2^6 and 2^14 give the same updates up to fp16
    rounding. A method that steps or edits gradients before unscaling is off by 256x."""
    if (method, "fp16") in AMP_REFUSED:
        pytest.skip(f"{method} refuses fp16")
    updates = []
    for scale in (2.0**6, 2.0**14):
        sgd = {"optimizer": "sgd", "momentum": 0.0}
        trainer, batches = contract_trainer(method, "synthetic_cls2", device=CUDA, amp="fp16",
                                            train_options=sgd)
        trainer.train_step(batches[0], 0, 0)
        optimizers = [trainer.optimizer, *trainer.balancer.auxiliary_optimizers()]
        params = [p for o in optimizers for g in o.param_groups for p in g["params"]]
        before = [p.detach().clone() for p in params]
        trainer.scaler = torch.amp.GradScaler("cuda", init_scale=scale)
        seed_everything(5)  # the same dropout and noise in both runs
        trainer.train_step(batches[1], 0, 1)
        assert trainer.scaler.get_scale() == scale, "an overflow at a small scale: the test cannot compare"
        updates.append([(p.detach() - b).double() for p, b in zip(params, before, strict=True)])
    for i, (small, large) in enumerate(zip(*updates, strict=True)):
        if large.norm() > 0:
            relative = float((small - large).norm() / large.norm())
            assert relative < 0.1, f"{method}: update {i} depends on the loss scale ({relative:.3g})"


def test_cuda_loaders_pin_memory_and_transfer_without_a_sync():
    ds = DATASETS.build("synthetic_cls2")
    for workers in (0, 2):
        cfg = TrainConfig(batch_size=32, num_workers=workers)
        batches = []
        for _ in range(2):  # two epochs: persistent workers come back with the same seeded order
            for batch in make_loader(ds.split("train"), cfg, CUDA, train=True):
                assert all(v.is_pinned() for v in batch.values()), "a CUDA loader must pin memory"
                torch.cuda.set_sync_debug_mode("error")
                try:
                    moved = batch_to_device(batch, CUDA)  # non-blocking from pinned memory
                finally:
                    torch.cuda.set_sync_debug_mode("default")
                batches.append({k: (v, moved[k]) for k, v in batch.items()})
        for batch in batches:
            for host, device in batch.values():
                assert torch.equal(host, device.cpu())
        if workers == 0:
            order = [b["target"][0] for b in batches]
        else:
            assert all(torch.equal(a, b["target"][0]) for a, b in zip(order, batches, strict=True))


def test_sample_valuation_resamples_on_cuda_as_on_cpu_without_a_sync():
    """Its duplicates are fetched on the host, pinned and copied without blocking: the plan and the
    loss terms match the CPU run's, and the steps after the first read nothing back."""
    runs = {}
    for device in (torch.device("cpu"), CUDA):
        trainer, batches = contract_trainer("sample_valuation", "synthetic_cls2", device=device,
                                            options={"warmup": 0})
        plan = (trainer.balancer.rows.index.clone(), trainer.balancer.rows.keep.clone())
        trainer.train_step(batches[0], 0, 0)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.set_sync_debug_mode("error")
        try:
            for i, batch in enumerate(batches[1:], start=1):
                trainer.train_step(batch, 0, i)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        runs[device.type] = (plan, trainer.pop_epoch_terms())
    (plan_cpu, terms_cpu), (plan_cuda, terms_cuda) = runs["cpu"], runs["cuda"]
    assert all(torch.equal(a, b) for a, b in zip(plan_cpu, plan_cuda, strict=True))
    assert "resampled" in terms_cuda
    assert terms_cuda == pytest.approx(terms_cpu, rel=1e-4)


def _fit_twice(ds_name, method):
    results = []
    for _ in range(2):
        ds = DATASETS.build(ds_name, n_train=128, n_val=64, n_test=64)
        spec = ds.spec
        task = make_task(spec.task, spec.num_outputs, **dict(spec.task_options))
        cfg = TrainConfig(epochs=2, batch_size=32, eval_modality_scores=False, cost_steps=0)  # deterministic
        seed_everything(0)
        model = MODELS.build(spec.default_model)(spec)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            splits = {s: ds.split(s) for s in ("train", "val", "test")}
            result = fit(model, METHODS.build(method), splits, spec, task, cfg, CUDA)
        nondeterministic = [str(w.message) for w in caught if "deterministic" in str(w.message)]
        assert not nondeterministic, f"{method} on {ds_name}: {nondeterministic[:3]}"
        results.append((result, [p.detach().clone() for p in model.parameters()]))
    return results


@pytest.mark.parametrize("ds_name, method", [("synthetic_seg4", "joint"), ("synthetic_seg4", "cggm"),
                                             ("synthetic_reg3", "ogm_ge"), ("synthetic_cls3", "cggm")])
def test_a_seeded_cuda_run_repeats_bit_for_bit(ds_name, method):
    """Conv (cuDNN) and transformer models, with and without map heads: two runs of the same
    configuration give the same metrics and weights, and PyTorch warns of no nondeterministic kernel."""
    (first, weights), (second, weights2) = _fit_twice(ds_name, method)
    assert first.val == second.val and first.test == second.test
    assert all(torch.equal(a, b) for a, b in zip(weights, weights2, strict=True))
