"""Config mixins shared by the methods: unimodal-head fields and the modulation window.

They add no fields (a method's run id is the hash of its own fields, so declaring a field here would
change the id of every run of every method that uses the mixin); they validate, with one rule each,
the shared fields that a method's Config declares:

* :class:`HeadConfig`: ``head_hidden`` (None or an integer >= 1), ``head_lr`` (None or > 0),
  ``head_layers`` (an integer >= 1), ``sequence_pool`` (one of ``SEQUENCE_POOLS``);
* :class:`ModulationWindow`: ``modulation_starts`` (>= 0) and ``modulation_ends``
  (>= ``modulation_starts``), 0-based inclusive epochs, and :meth:`ModulationWindow.modulates`.
"""

from __future__ import annotations

from mmbalance.config import ConfigBase, finite, need
from mmbalance.models.features import SEQUENCE_POOLS

__all__ = ["MethodConfig", "HeadConfig", "ModulationWindow"]


class MethodConfig(ConfigBase):
    """Base of method Configs: typed validation, then the config's own ``check()``."""


class HeadConfig(MethodConfig):
    """Validates the unimodal-head fields the Config declares (see the module docstring)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        names = vars(self)
        if "head_hidden" in names:
            hidden = self.head_hidden
            need(self, hidden is None or hidden >= 1, "head_hidden", "None or an integer >= 1")
        if "head_lr" in names:
            lr = self.head_lr
            need(self, lr is None or (finite(lr) and lr > 0), "head_lr", "None or > 0")
        if "head_layers" in names:
            need(self, self.head_layers >= 1, "head_layers", "an integer >= 1")
        if "sequence_pool" in names:
            need(self, self.sequence_pool in SEQUENCE_POOLS, "sequence_pool", f"one of {SEQUENCE_POOLS}")


class ModulationWindow(MethodConfig):
    """Validates ``modulation_starts`` / ``modulation_ends`` (0-based, inclusive epochs)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        need(self, self.modulation_starts >= 0, "modulation_starts", "an integer >= 0")
        need(
            self,
            self.modulation_ends >= self.modulation_starts,
            "modulation_ends",
            f"an integer >= modulation_starts ({self.modulation_starts})",
        )

    def modulates(self, epoch: int) -> bool:
        """Whether epoch ``epoch`` (0-based) lies in ``[modulation_starts, modulation_ends]``."""
        return self.modulation_starts <= epoch <= self.modulation_ends
