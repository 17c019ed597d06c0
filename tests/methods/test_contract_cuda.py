"""The registry-wide contract tests on CUDA (``gpu``; skipped without a GPU).

Every registered method, on every synthetic task it declares, on the GPU: three finite steps in
fp32, bf16 and fp16 with its GradScaler, with every parameter and buffer of the model and the
balancer on the device afterwards; a resume from a checkpoint read back through the CPU
(``map_location="cpu"``, as when a checkpoint moves between machines) that continues exactly like
the uninterrupted run; seeded determinism (cuDNN / cuBLAS in deterministic mode); gradient edits
confined to ``grad_edit_scope`` in every AMP mode; and no host synchronisation in the steps after
the first (``torch.cuda.set_sync_debug_mode("error")``).

``benchmarks/cuda_check.sh`` runs this file. Environment (test selection only):
``MMB_TEST_DEVICE`` (default ``cuda``; ``cpu`` runs the same checks on the CPU, as the script's
dry run does), ``MMB_TEST_METHODS`` (comma-separated method names), ``MMB_TEST_SHARD`` (``K/N``:
every N-th case from the K-th, for parallel processes).
"""

from __future__ import annotations

import os

import pytest
import torch

from mmbalance.errors import UnsupportedError

from .test_contract import (
    CASES,
    _steps,
    _trainer,
    check_grad_edit_scope,
    check_resume,
)

DEVICE = torch.device(os.environ.get("MMB_TEST_DEVICE", "cuda"))
AMP_MODES = ("none", "bf16", "fp16")
# Methods that refuse an AMP mode with an UnsupportedError naming it (tested: the refusal happens).
AMP_REFUSED = {("mla", "fp16"): "steps its shared head M times per batch; a GradScaler allows one step"}

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(DEVICE.type == "cuda" and not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def _selected(cases):
    methods = os.environ.get("MMB_TEST_METHODS")
    if methods:
        wanted = {m.strip() for m in methods.split(",") if m.strip()}
        cases = [c for c in cases if c[0] in wanted]
    shard = os.environ.get("MMB_TEST_SHARD")
    if shard:
        k, n = (int(x) for x in shard.split("/"))
        cases = cases[k - 1 :: n]
    return cases


DEVICE_CASES = _selected(CASES)


def _off_device(trainer):
    """Names of the model's and balancer's parameters and buffers that are not on the run's device."""
    out = []
    for prefix, module in (("model.", trainer.model), ("balancer.", trainer.balancer)):
        for name, tensor in (*module.named_parameters(), *module.named_buffers()):
            if tensor.device.type != DEVICE.type:
                out.append(f"{prefix}{name} ({tensor.device})")
    return out


@pytest.mark.parametrize("amp", AMP_MODES)
@pytest.mark.parametrize("method, ds_name", DEVICE_CASES)
def test_three_finite_steps_on_the_device(method, ds_name, amp):
    trainer, batches = _trainer(method, ds_name, device=DEVICE, amp=amp)
    refused = AMP_REFUSED.get((method, amp))
    if refused and DEVICE.type == "cuda":
        with pytest.raises(UnsupportedError, match=f"amp='{amp}' is unsupported"):
            _steps(trainer, batches)
        return
    _steps(trainer, batches)
    for name, p in trainer.model.named_parameters():
        assert torch.isfinite(p).all(), f"{method} ({amp}): parameter {name} is not finite"
    assert not _off_device(trainer), f"{method}: state not on {DEVICE}: {_off_device(trainer)[:5]}"
    if trainer.scaler.is_enabled():
        assert torch.isfinite(torch.tensor(trainer.scaler.get_scale()))


@pytest.mark.parametrize("method, ds_name", DEVICE_CASES)
def test_resume_through_a_cpu_checkpoint_continues_identically(method, ds_name):
    check_resume(method, ds_name, device=DEVICE, map_location="cpu")


@pytest.mark.parametrize("method, ds_name", DEVICE_CASES)
def test_seeded_determinism_on_the_device(method, ds_name):
    finals = []
    for _ in range(2):
        trainer, batches = _trainer(method, ds_name, seed=7, device=DEVICE)
        _steps(trainer, batches)
        finals.append([p.detach().clone() for p in trainer.model.parameters()])
    for a, b in zip(*finals, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("amp", AMP_MODES)
@pytest.mark.parametrize("method, ds_name", DEVICE_CASES)
def test_gradient_edits_stay_in_declared_scope_on_the_device(method, ds_name, amp):
    if (method, amp) in AMP_REFUSED and DEVICE.type == "cuda":
        pytest.skip(f"{method} refuses amp={amp!r} (test_three_finite_steps_on_the_device checks it)")
    check_grad_edit_scope(method, ds_name, device=DEVICE, amp=amp)


@pytest.mark.parametrize("method, ds_name", DEVICE_CASES)
def test_no_host_sync_after_the_first_step(method, ds_name):
    """The first step may build lazy parts and run one-off checks; the next ones read nothing back
    from the device (fp32: an fp16 GradScaler reads its inf flag on the host by design)."""
    if DEVICE.type != "cuda":
        pytest.skip("sync debug mode is CUDA's")
    trainer, batches = _trainer(method, ds_name, device=DEVICE)
    trainer.train_step(batches[0], 0, 0)
    torch.cuda.synchronize(DEVICE)
    torch.cuda.set_sync_debug_mode("error")
    try:
        for i, batch in enumerate(batches[1:], start=1):
            trainer.train_step(batch, 0, i)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    trainer.flush_terms()
