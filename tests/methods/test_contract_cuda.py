"""The registry-wide contract tests on CUDA (``gpu``; skipped without a GPU): the checks of
:mod:`mmbalance.testing` that ``check_method(..., device="cuda")`` runs, parametrised over the registry.

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

from mmbalance.testing import (
    AMP_MODES,
    check_finite_steps,
    check_grad_edit_scope,
    check_no_host_sync,
    check_seeded_determinism,
    check_state_round_trip,
)

from .test_contract import CASES

DEVICE = torch.device(os.environ.get("MMB_TEST_DEVICE", "cuda"))
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


def _refused(method, amp):
    """Whether the method must refuse ``amp`` here (a GradScaler is CUDA's)."""
    return (method, amp) in AMP_REFUSED and DEVICE.type == "cuda"


@pytest.mark.parametrize("amp", AMP_MODES)
@pytest.mark.parametrize("method, ds_name", DEVICE_CASES)
def test_three_finite_steps_on_the_device(method, ds_name, amp):
    note = check_finite_steps(method, ds_name, device=DEVICE, amp=amp)
    if _refused(method, amp):
        assert note is not None and f"amp='{amp}' is unsupported" in note, f"{method} ran amp={amp!r}"
    else:
        assert note is None, note


@pytest.mark.parametrize("method, ds_name", DEVICE_CASES)
def test_resume_through_a_cpu_checkpoint_continues_identically(method, ds_name):
    assert check_state_round_trip(method, ds_name, device=DEVICE, map_location="cpu") is None


@pytest.mark.parametrize("method, ds_name", DEVICE_CASES)
def test_seeded_determinism_on_the_device(method, ds_name):
    assert check_seeded_determinism(method, ds_name, device=DEVICE) is None


@pytest.mark.parametrize("amp", AMP_MODES)
@pytest.mark.parametrize("method, ds_name", DEVICE_CASES)
def test_gradient_edits_stay_in_declared_scope_on_the_device(method, ds_name, amp):
    if _refused(method, amp):
        pytest.skip(f"{method} refuses amp={amp!r} (test_three_finite_steps_on_the_device checks it)")
    assert check_grad_edit_scope(method, ds_name, device=DEVICE, amp=amp) is None


@pytest.mark.parametrize("method, ds_name", DEVICE_CASES)
def test_no_host_sync_after_the_first_step(method, ds_name):
    """The first step may build lazy parts and run one-off checks; the next ones read nothing back
    from the device (fp32: an fp16 GradScaler reads its inf flag on the host by design)."""
    if DEVICE.type != "cuda":
        pytest.skip("sync debug mode is CUDA's")
    assert check_no_host_sync(method, ds_name, device=DEVICE) is None
