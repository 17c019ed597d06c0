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
    "NonFiniteLossError",
    "ResultError",
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


class NonFiniteLossError(MMBalanceError, FloatingPointError):
    """A loss term became NaN or inf; the message names the term and the step."""


class ResultError(MMBalanceError):
    """A corrupt, truncated or invalid result file."""
