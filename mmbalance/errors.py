"""Exception types. Every user-facing error subclasses :class:`MMBalanceError`.

The CLI prints these as one clear line (no traceback); anything else is a bug and keeps its
traceback. Messages name the argument, the value received and the value expected.
"""

from __future__ import annotations

__all__ = [
    "MMBalanceError",
    "ConfigError",
    "RegistryError",
    "DataError",
    "ShapeError",
    "UnsupportedError",
    "DivergedError",
    "NonFiniteLossError",
    "ResultError",
    "OutputError",
]


class MMBalanceError(Exception):
    """Base of all user-facing errors."""


class ConfigError(MMBalanceError, ValueError):
    """Unknown config key, out-of-range hyperparameter, malformed option."""


class RegistryError(MMBalanceError, KeyError):
    """Unknown or duplicate name, broken plugin."""

    def __str__(self) -> str:  # KeyError quotes its message; keep it readable
        return str(self.args[0]) if self.args else ""


class DataError(MMBalanceError):
    """Missing or malformed dataset files."""


class ShapeError(DataError, ValueError):
    """A tensor whose shape differs from the declared one."""


class UnsupportedError(MMBalanceError):
    """A method used on a task or modality count it does not declare."""


class DivergedError(MMBalanceError):
    """Training diverged: a step's loss rose above the run's bound (see
    ``TrainConfig.divergence_factor``), or a loss term became non-finite (:class:`NonFiniteLossError`).

    ``step`` is the 0-based global training step, ``epoch`` its 0-based epoch; the message names the
    loss and the bound (or the term). A runner records such a run with status ``diverged``.
    """

    def __init__(self, message: str, *, step: int | None = None, epoch: int | None = None) -> None:
        super().__init__(message)
        self.step, self.epoch = step, epoch


class NonFiniteLossError(DivergedError, FloatingPointError):
    """A loss term became NaN or inf; the message names the term and the step."""


class ResultError(MMBalanceError):
    """A corrupt, truncated or invalid result file."""


class OutputError(MMBalanceError, OSError):
    """The output folder or a result file cannot be created or written (file in the way, read-only
    folder, no permission, full disk); the message names the path and the errno."""
