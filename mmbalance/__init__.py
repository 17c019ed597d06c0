"""mmbalance: balancing methods for multimodal imbalance behind one interface, and a benchmark.

Public API::

    from mmbalance import Balancer, register_method, METHODS, DATASETS, MODELS, run
    from mmbalance import load_results, load_history   # result rows as pandas DataFrames

The names are imported on first use (PEP 562), so ``import mmbalance`` and the command line's
``--version``, ``--help`` and ``list`` do not import torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

__all__ = [
    "Balancer",
    "StepContext",
    "EpochContext",
    "METHODS",
    "DATASETS",
    "MODELS",
    "register_method",
    "register_dataset",
    "register_model",
    "ModelOutput",
    "MultimodalModel",
    "MMBalanceError",
    "run",
    "load_results",
    "load_history",
    "__version__",
]

# name -> module that defines it (imported when the name is first read)
_LAZY = {
    "Balancer": "mmbalance.balancer",
    "StepContext": "mmbalance.balancer",
    "EpochContext": "mmbalance.balancer",
    "METHODS": "mmbalance.methods",
    "register_method": "mmbalance.methods",
    "DATASETS": "mmbalance.datasets",
    "register_dataset": "mmbalance.datasets",
    "MODELS": "mmbalance.models",
    "register_model": "mmbalance.models",
    "ModelOutput": "mmbalance.models",
    "MultimodalModel": "mmbalance.models",
    "MMBalanceError": "mmbalance.errors",
}

if TYPE_CHECKING:
    from mmbalance.balancer import Balancer, EpochContext, StepContext
    from mmbalance.datasets import DATASETS, register_dataset
    from mmbalance.errors import MMBalanceError
    from mmbalance.methods import METHODS, register_method
    from mmbalance.models import MODELS, ModelOutput, MultimodalModel, register_model


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'mmbalance' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


def run(*args, **kwargs):
    """Train and evaluate one run; see :func:`mmbalance.runner.run_one`."""
    from mmbalance.runner import run_one

    return run_one(*args, **kwargs)


def load_results(*args, **kwargs):
    """One row per run as a pandas DataFrame; see :func:`mmbalance.load.load_results`."""
    from mmbalance.load import load_results as load

    return load(*args, **kwargs)


def load_history(*args, **kwargs):
    """One row per (run, epoch) as a pandas DataFrame; see :func:`mmbalance.load.load_history`."""
    from mmbalance.load import load_history as load

    return load(*args, **kwargs)
