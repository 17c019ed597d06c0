"""Per-epoch means of per-step statistics, kept on the device (torchmetrics' update / compute / reset).

A method records its coefficients, ratios or cosines every step with :meth:`EpochMeans.update`
(device tensors, no host read) and reports their epoch means from ``diagnostics()`` with
:meth:`EpochMeans.pop`, which reads them all in one host transfer and starts the next epoch. Every
balancer gets one over its modalities, ``self.epoch_means``, from ``Balancer.setup``; a method makes
more where it needs other options (``finite_only``, ``reduction``) or other step subsets.
Sums are float64, so long epochs do not lose the small terms. With ``reduction="min"`` or ``"max"``
the same accumulator keeps the epoch's extremes instead (CGGM's ``B_min`` / ``B_max``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["EpochMeans", "REDUCTIONS"]

REDUCTIONS = ("mean", "min", "max")


class EpochMeans:
    """Running sums of named statistics; each is a 0-d tensor or one value per modality ``(M,)``.

    Args:
        modalities: names used for the per-modality entries (``coeff/<m>``).
        finite_only: replace NaN / inf by 0 before summing (fp16 steps that the scaler skips).
        reduction: ``"mean"`` (the default), or ``"min"`` / ``"max"``: the epoch's elementwise
            minimum / maximum instead of the mean.
    """

    def __init__(
        self, modalities: Sequence[str], *, finite_only: bool = False, reduction: str = "mean"
    ) -> None:
        if reduction not in REDUCTIONS:
            raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
        self.modalities = tuple(modalities)
        self.finite_only = finite_only
        self.reduction = reduction
        self._sums: dict[str, Tensor] = {}
        self.count = 0

    def update(self, **values: Tensor) -> None:
        """Add one step's statistics (detached, no host sync). Every call must name the same keys."""
        if self._sums and values.keys() != self._sums.keys():
            raise KeyError(f"EpochMeans.update got keys {sorted(values)}, expected {sorted(self._sums)}")
        for name, value in values.items():
            v = value.detach().to(torch.float64)
            if self.finite_only:
                v = torch.nan_to_num(v, nan=0.0, posinf=0.0, neginf=0.0)
            if name not in self._sums:
                self._sums[name] = v.clone()
            elif self.reduction == "mean":
                self._sums[name].add_(v)
            else:
                extreme = torch.minimum if self.reduction == "min" else torch.maximum
                extreme(self._sums[name], v, out=self._sums[name])
        self.count += 1

    def compute(self) -> dict[str, float]:
        """Epoch means (or extremes) as ``{name: v}`` for 0-d statistics and ``{name/<m>: v}`` per
        modality; one host read; ``{}`` before the first update."""
        if not self.count:
            return {}
        names = list(self._sums)
        flat = torch.cat([self._sums[n].reshape(-1) for n in names])
        flat = (flat.div(self.count) if self.reduction == "mean" else flat).tolist()
        out: dict[str, float] = {}
        i = 0
        for name in names:
            size = self._sums[name].numel()
            if self._sums[name].dim() == 0:
                out[name] = flat[i]
            else:
                if size != len(self.modalities):
                    raise ValueError(
                        f"statistic {name!r} has {size} values for {len(self.modalities)} modalities"
                    )
                out.update({f"{name}/{m}": flat[i + j] for j, m in enumerate(self.modalities)})
            i += size
        return out

    def reset(self) -> None:
        self._sums = {}
        self.count = 0

    def pop(self) -> dict[str, float]:
        """:meth:`compute`, then :meth:`reset`."""
        out = self.compute()
        self.reset()
        return out
