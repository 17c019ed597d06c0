"""mmbalance: balancing methods for multimodal imbalance behind one interface, and a benchmark.

Public API::

    from mmbalance import Balancer, register_method, METHODS, DATASETS, MODELS, run
    from mmbalance import load_results, load_history   # result rows as pandas DataFrames
"""

from __future__ import annotations

from mmbalance.balancer import Balancer, EpochContext, StepContext
from mmbalance.datasets import DATASETS, register_dataset
from mmbalance.errors import MMBalanceError
from mmbalance.methods import METHODS, register_method
from mmbalance.models import MODELS, ModelOutput, MultimodalModel, register_model

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
