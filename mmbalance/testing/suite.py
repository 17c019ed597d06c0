"""``check_method``: every contract check on every synthetic task a method declares.

The plan, per task: finite steps, seeded determinism, gradient edits within ``grad_edit_scope``,
the state round trip, the ``weights_only`` training state, and "stop after an epoch, resume,
finish" equals "run straight through". On CUDA the step checks run in every AMP mode (fp32, bf16,
fp16), the state round trip reads its checkpoint through the CPU, and the steps after the first
must not synchronise with the host.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from mmbalance.balancer import Balancer
from mmbalance.errors import ConfigError
from mmbalance.testing._contract import ContractCheck, check_label
from mmbalance.testing._setup import SYNTHETIC_TASKS, Subject, as_device, declared_tasks, subject
from mmbalance.testing.checks import (
    check_finite_steps,
    check_grad_edit_scope,
    check_no_host_sync,
    check_seeded_determinism,
)
from mmbalance.testing.resume import (
    check_state_round_trip,
    check_stop_resume_finish,
    check_weights_only_state,
)

__all__ = [
    "AMP_MODES", "CheckResult", "ContractReport", "PlannedCheck", "plan_checks", "run_checks", "check_method",
]

AMP_MODES = ("none", "bf16", "fp16")  # CUDA; a CPU run has no autocast, so fp32 only


@dataclass(frozen=True)
class PlannedCheck:
    """One check of the plan: ``check(subject, task, device=..., **params)``."""

    task: str
    check: ContractCheck
    params: Mapping[str, Any] = field(default_factory=dict)

    @property
    def label(self) -> str:
        return check_label(self.check.check_name, self.params)


@dataclass(frozen=True)
class CheckResult:
    """The outcome of one planned check. ``note``: the failure message, or a documented refusal."""

    method: str
    task: str
    check: str
    passed: bool
    seconds: float
    note: str | None = None

    def line(self) -> str:
        status = "ok  " if self.passed else "FAIL"
        tail = f" ({self.note})" if self.passed and self.note else (f": {self.note}" if self.note else "")
        return f"{status} {self.method} {self.task} {self.check} [{self.seconds:.1f} s]{tail}"


@dataclass(frozen=True)
class ContractReport:
    """What :func:`check_method` checked: one :class:`CheckResult` per (task, check), in order."""

    method: str
    device: str
    results: tuple[CheckResult, ...]

    @property
    def passed(self) -> bool:
        return all(r.passed for r in self.results)

    @property
    def tasks(self) -> list[str]:
        return list(dict.fromkeys(r.task for r in self.results))

    @property
    def checks(self) -> list[str]:
        return list(dict.fromkeys(r.check for r in self.results))

    def __str__(self) -> str:
        failed = sum(not r.passed for r in self.results)
        head = (f"{self.method} on {self.device}: {len(self.results)} checks on {len(self.tasks)} tasks, "
                f"{failed} failed")
        return "\n".join([head, *(r.line() for r in self.results)])


def plan_checks(method: Subject, tasks: Iterable[str] | None, device: torch.device) -> list[PlannedCheck]:
    """The checks to run, task by task (see the module docstring).

    Raises:
        ConfigError: the method declares none of the synthetic tasks (nothing could be checked), or
            ``tasks`` names one it does not declare.
    """
    cuda = device.type == "cuda"
    modes = AMP_MODES if cuda else ("none",)
    chosen = declared_tasks(method, tasks)
    if not chosen:
        cls = method.cls
        raise ConfigError(
            f"method {method.name!r} declares none of the synthetic tasks {list(SYNTHETIC_TASKS)} (tasks "
            f"{sorted(cls.tasks)}, {cls.min_modalities} to {cls.max_modalities or 'any'} modalities): "
            "nothing to check"
        )
    out = []
    for task in chosen:
        out += [PlannedCheck(task, check_finite_steps, {"amp": amp}) for amp in modes]
        out.append(PlannedCheck(task, check_seeded_determinism))
        out += [PlannedCheck(task, check_grad_edit_scope, {"amp": amp}) for amp in modes]
        out.append(PlannedCheck(task, check_state_round_trip, {"map_location": "cpu"} if cuda else {}))
        out.append(PlannedCheck(task, check_weights_only_state))
        out.append(PlannedCheck(task, check_stop_resume_finish))
        if cuda:
            out.append(PlannedCheck(task, check_no_host_sync))
    return out


def _run_one(
    method: Subject, planned: PlannedCheck, device: torch.device,
) -> tuple[CheckResult, Exception | None]:
    """Run one check; a failure is returned with its exception, never raised."""
    t0 = time.perf_counter()
    error: Exception | None = None
    try:
        note = planned.check(method, planned.task, device=device, **planned.params)
    except AssertionError as exc:
        note, error = str(exc), exc
    except Exception as exc:  # a method may fail in any way; the report names the check it failed
        where = f"{method.name} on {planned.task}, check {planned.label}"
        note, error = f"{where}: raised {type(exc).__name__}: {exc}", exc
    seconds = time.perf_counter() - t0
    return CheckResult(method.name, planned.task, planned.label, error is None, seconds, note), error


def _checks(
    method: str | type[Balancer] | Subject, tasks: Iterable[str] | None, device: str | torch.device,
    options: Mapping[str, Any] | None,
) -> Iterator[tuple[CheckResult, Exception | None]]:
    target, dev = subject(method, options), as_device(device)
    planned = plan_checks(target, tasks, dev)
    for task in dict.fromkeys(p.task for p in planned):
        target.build(task)  # a bad option fails here, once, not as every check's failure
    for one in planned:
        yield _run_one(target, one, dev)


def run_checks(
    method: str | type[Balancer] | Subject, *, tasks: Iterable[str] | None = None,
    device: str | torch.device = "cpu", options: Mapping[str, Any] | None = None,
    on_result: Callable[[CheckResult], None] | None = None,
) -> ContractReport:
    """Run every planned check, recording a failing one (with its message) and going on;
    ``on_result`` is called after each check. Arguments and errors as :func:`check_method`, except
    that a failing check does not raise."""
    results = []
    for result, _ in _checks(method, tasks, device, options):
        results.append(result)
        if on_result is not None:
            on_result(result)
    return ContractReport(subject(method, options).name, str(as_device(device)), tuple(results))


def check_method(
    name_or_class: str | type[Balancer], *, tasks: Iterable[str] | None = None,
    device: str | torch.device = "cpu", options: Mapping[str, Any] | None = None,
) -> ContractReport:
    """Run the registry-wide contract suite on one method, as the project's own tests do.

    Args:
        name_or_class: a registered method name (built-in or plugin) or a ``Balancer`` subclass
            (registered or not).
        tasks: synthetic task names (``synthetic_cls2``, ...); default every one the method declares
            (its ``tasks`` and modality counts).
        device: ``"cpu"`` or a CUDA device (adds the AMP modes and the host-sync check).
        options: config overrides applied on every task (e.g. to shorten a costly stage).

    Returns:
        The :class:`ContractReport` of every check, all passed.

    Raises:
        AssertionError: at the first failing check, naming the method, the task, the check and what
            differed (an exception the method raised is chained to it).
        RegistryError: an unknown name (with the close match) or a plugin that failed to import.
        ConfigError: a task that is not synthetic or not declared, a bad device or option.
    """
    results = []
    for result, error in _checks(name_or_class, tasks, device, options):
        if isinstance(error, AssertionError):
            raise error
        if error is not None:
            raise AssertionError(result.note) from error
        results.append(result)
    return ContractReport(subject(name_or_class, options).name, str(as_device(device)), tuple(results))
