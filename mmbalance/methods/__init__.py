"""Balancing methods: the METHODS registry and the built-in methods (one file each).

Built-ins register by explicit import (``BUILTIN_METHODS``); ``tests/methods/test_contract.py``
fails if a file here is missing from that list or registers nothing. Third-party methods register
through the ``mmbalance.methods`` entry-point group.
"""

from __future__ import annotations

import importlib

from mmbalance.balancer import Balancer
from mmbalance.registry import Registry

__all__ = ["METHODS", "register_method", "BUILTIN_METHODS"]

# Module names under mmbalance.methods, imported on first registry use.
BUILTIN_METHODS: tuple[str, ...] = (
    "joint",
    "unimodal",
    "cggm",
    "ogm_ge",
    "g_blending",
    "mslr",
    "mses",
    "umt",
    "ume",
    "mrd",
    "pmr",
    "agm",
    "greedy",
    "mmpareto",
    "qmf",
    "mla",
    "reconboost",
    "opm",
    "ogm",
    "mmcosine",
    "amco",
    "inforeg",
    "dgl",
    "arl",
    "mbsd",
    "cml",
    "lfm",
    "sample_valuation",
    "relearning",
    "aug",
    "remix",
    "g2d",
    "di_mml",
)


def _load_builtin_methods() -> None:
    for module in BUILTIN_METHODS:
        importlib.import_module(f"{__name__}.{module}")


METHODS: Registry[type[Balancer]] = Registry(
    "method", Balancer, entry_point_group="mmbalance.methods", loader=_load_builtin_methods
)
register_method = METHODS.register
