"""Analyses of training behaviour.

:mod:`mmbalance.analysis.probe`: is the planted modality imbalance real? (linear probes on frozen
encoders after joint vs. unimodal training). Names are imported lazily so that
``python -m mmbalance.analysis.probe`` runs the module once, as ``__main__``.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["ProbeConfig", "ProbeResult", "imbalance_experiment", "imbalance_table", "train_probe"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        return getattr(importlib.import_module("mmbalance.analysis.probe"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
