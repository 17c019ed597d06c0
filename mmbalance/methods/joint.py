"""``joint``: plain multimodal joint training. Overrides nothing; the denominator of every cost ratio."""

from __future__ import annotations

from mmbalance.balancer import Balancer
from mmbalance.methods import register_method

__all__ = ["Joint"]


@register_method("joint")
class Joint(Balancer):
    """Joint training of all modalities with the task loss alone (the papers' "Baseline")."""

    paper = "Multimodal joint training (baseline)"
    min_modalities = 1
