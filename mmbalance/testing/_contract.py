"""The frame every contract check shares: how it is called, named, and how it fails."""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import Any, Protocol

from mmbalance.errors import UnsupportedError
from mmbalance.testing._setup import Subject, as_device, run_steps, subject
from mmbalance.train import Trainer

__all__ = ["ContractCheck", "contract_check", "check_label", "expect", "steps_or_refusal"]


class ContractCheck(Protocol):
    """``check(method, task, *, device="cpu", options=None, **params) -> note``: None, or a short
    note when the method refused a setting with the documented error (see :func:`steps_or_refusal`).
    Raises AssertionError naming the method, the task, the check and what differed."""

    check_name: str

    def __call__(self, method: Any, task: str, **kwargs: Any) -> str | None: ...


def check_label(name: str, params: Mapping[str, Any]) -> str:
    """``name`` and its non-default parameters, e.g. ``finite_steps amp=bf16``."""
    extra = [f"{k}={v}" for k, v in params.items() if not (k == "amp" and v == "none")]
    return " ".join([name, *extra])


def contract_check(name: str) -> Callable[[Callable[..., str | None]], ContractCheck]:
    """Turn ``fn(subject, task, *, device, **params)`` into a public check: ``method`` may be a name,
    a class or a :class:`Subject`, ``options`` are config overrides, ``device`` a string or a device,
    and an AssertionError's message is prefixed with the method, the task and the check."""

    def decorate(fn: Callable[..., str | None]) -> ContractCheck:
        @functools.wraps(fn)
        def check(method: Any, task: str, *, device: Any = "cpu", options: Mapping[str, Any] | None = None,
                  **params: Any) -> str | None:
            target: Subject = subject(method, options)
            try:
                return fn(target, task, device=as_device(device), **params)
            except AssertionError as exc:
                exc.args = (f"{target.name} on {task}, check {check_label(name, params)}: {exc}",)
                raise

        check.check_name = name  # type: ignore[attr-defined]
        return check  # type: ignore[return-value]

    return decorate


def expect(ok: bool, what: str) -> None:
    """Raise AssertionError(``what``) unless ``ok`` (explicit, so that ``python -O`` keeps it)."""
    if not ok:
        raise AssertionError(what)


def steps_or_refusal(trainer: Trainer, batches: list[Any], amp: str) -> str | None:
    """Train on ``batches``; a method may refuse an AMP mode (not ``"none"``) by raising
    :class:`~mmbalance.errors.UnsupportedError` whose message says ``amp='<mode>' is unsupported``:
    that refusal is returned as a note, any other error propagates."""
    try:
        run_steps(trainer, batches)
    except UnsupportedError as exc:
        if amp != "none" and f"amp='{amp}' is unsupported" in str(exc):
            return f"refused amp={amp!r}: {exc}"
        raise
    return None
