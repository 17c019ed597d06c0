"""The step-level contract checks: finite steps, seeded determinism, gradient edits within the
declared scope, and no host synchronisation in the steps (CUDA).

Each check builds a fresh trainer of the method on one synthetic task (three training batches of
16) and raises AssertionError naming the method, the task, the check and what differed. The resume
checks are in :mod:`mmbalance.testing.resume`.
"""

from __future__ import annotations

import torch

from mmbalance.errors import ConfigError
from mmbalance.testing._contract import contract_check, expect, steps_or_refusal
from mmbalance.testing._setup import STEPS, Subject, contract_trainer, run_steps
from mmbalance.train import AmpMode, Trainer

__all__ = [
    "check_finite_steps",
    "check_seeded_determinism",
    "check_grad_edit_scope",
    "check_no_host_sync",
    "off_device",
]


def off_device(trainer: Trainer) -> list[str]:
    """Names of the model's and balancer's parameters and buffers that are not on the run's device."""
    out = []
    for prefix, module in (("model.", trainer.model), ("balancer.", trainer.balancer)):
        for name, tensor in (*module.named_parameters(), *module.named_buffers()):
            if tensor.device.type != trainer.device.type:
                out.append(f"{prefix}{name} ({tensor.device})")
    return out


@contract_check("finite_steps")
def check_finite_steps(method: Subject, task: str, *, device: torch.device,
                       amp: AmpMode = "none") -> str | None:
    """Three training steps in AMP mode ``amp`` (CUDA; ``"fp16"`` with the GradScaler): every loss
    term and model parameter finite, every parameter and buffer of the model and the balancer on the
    device, and a finite loss scale. Returns a note when the method refuses ``amp`` with the
    documented error (:func:`~mmbalance.testing._contract.steps_or_refusal`)."""
    trainer, batches = contract_trainer(method, task, device=device, amp=amp)
    refused = steps_or_refusal(trainer, batches, amp)
    if refused:
        return refused
    bad = [name for name, p in trainer.model.named_parameters() if not torch.isfinite(p).all()]
    expect(not bad, f"parameters not finite after {STEPS} steps: {bad[:5]}")
    off = off_device(trainer)
    expect(not off, f"state not on {device}: {off[:5]}")
    if trainer.scaler.is_enabled():
        expect(bool(torch.isfinite(torch.tensor(trainer.scaler.get_scale()))), "the loss scale is not finite")
    return None


@contract_check("seeded_determinism")
def check_seeded_determinism(method: Subject, task: str, *, device: torch.device) -> str | None:
    """Two trainers built and trained from one seed end with identical model parameters."""
    finals = []
    for _ in range(2):
        trainer, batches = contract_trainer(method, task, seed=7, device=device)
        run_steps(trainer, batches)
        finals.append({n: p.detach().clone() for n, p in trainer.model.named_parameters()})
    bad = [n for n, p in finals[0].items() if not torch.equal(p, finals[1][n])]
    expect(not bad, f"two runs from seed 7 end with different parameters: {bad[:5]}")
    return None


def _scope_params(trainer: Trainer, scope: frozenset[str]) -> set[int]:
    model = trainer.model
    parts = {"encoders": model.encoders, "fusion": model.fusion, "head": model.head}
    return {id(p) for part in scope if part in parts for p in parts[part].parameters()}


@contract_check("grad_edit_scope")
def check_grad_edit_scope(method: Subject, task: str, *, device: torch.device,
                          amp: AmpMode = "none") -> str | None:
    """Over three steps in AMP mode ``amp``, ``on_after_backward`` changes (edits, sets or clears)
    the gradients of model parameters inside the parts named by ``grad_edit_scope`` only. Returns a
    note when the method refuses ``amp`` with the documented error."""
    trainer, batches = contract_trainer(method, task, device=device, amp=amp)
    balancer = trainer.balancer
    allowed = _scope_params(trainer, balancer.grad_edit_scope)
    violations: list[str] = []
    original = balancer.on_after_backward

    def spy(ctx):
        before = {id(p): (None if p.grad is None else p.grad.clone()) for p in ctx.model.parameters()}
        original(ctx)
        for name, p in ctx.model.named_parameters():
            g0 = before[id(p)]
            changed = (g0 is None) != (p.grad is None) or (g0 is not None and not torch.equal(g0, p.grad))
            if changed and id(p) not in allowed and name not in violations:
                violations.append(name)

    balancer.on_after_backward = spy
    try:
        refused = steps_or_refusal(trainer, batches, amp)
    finally:
        del balancer.on_after_backward
    if refused:
        return refused
    scope = sorted(balancer.grad_edit_scope)
    expect(not violations, f"edited gradients outside grad_edit_scope {scope}: {violations[:5]}")
    return None


@contract_check("no_host_sync")
def check_no_host_sync(method: Subject, task: str, *, device: torch.device) -> str | None:
    """CUDA: the steps after the first read nothing back from the device (fp32; the first step may
    build lazy parts and run one-off checks) under ``torch.cuda.set_sync_debug_mode("error")``."""
    if device.type != "cuda":
        raise ConfigError(f"check no_host_sync needs a CUDA device, got device {str(device)!r}")
    trainer, batches = contract_trainer(method, task, device=device)
    trainer.train_step(batches[0], 0, 0)
    torch.cuda.synchronize(device)
    torch.cuda.set_sync_debug_mode("error")
    try:
        for i, batch in enumerate(batches[1:], start=1):
            try:
                trainer.train_step(batch, 0, i)
            except RuntimeError as exc:
                if "synchroniz" not in str(exc):
                    raise
                raise AssertionError(f"step {i} synchronises with the host: {exc}") from exc
    finally:
        torch.cuda.set_sync_debug_mode("default")
    trainer.flush_terms()
    return None
