"""Bootstrap confidence intervals over timing blocks: the noise model of the wall-clock gate.

A wall-clock ratio is measured as ``B`` blocks of interleaved method / joint steps; each block gives
one paired ratio (:func:`mmbalance.measure.block_ratios`). The blocks are the unit of resampling:
noise that hits a whole block (another process taking a core for a while) moves one block ratio,
and the spread of the block ratios is what the interval reports. The point estimate is the median
of the block ratios; its interval is the percentile bootstrap interval of that median.

The gate compares two such measurements (base and head) with :func:`change_interval`: both sets of
blocks are resampled independently and the interval is that of ``median(head) / median(base)``.
A regression is flagged only when the interval's lower bound exceeds ``1 + threshold``, i.e. when
the measurements make a slowdown larger than the threshold likely, not merely possible.

Resampling uses a fixed seed, so the same blocks always give the same interval.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

__all__ = ["Interval", "median_interval", "change_interval", "RESAMPLES", "CONFIDENCE"]

RESAMPLES = 4000  # bootstrap resamples: percentile bounds stable to ~0.5 % of the spread
CONFIDENCE = 0.95


@dataclass(frozen=True)
class Interval:
    """A point estimate and its two-sided bootstrap interval."""

    point: float
    low: float
    high: float

    def format(self, digits: int = 2) -> str:
        """``2.41 [2.35, 2.49]``."""
        return f"{self.point:.{digits}f} [{self.low:.{digits}f}, {self.high:.{digits}f}]"


def _values(name: str, values: Sequence[float]) -> np.ndarray:
    array = np.asarray(values, dtype=np.float64)
    if array.ndim != 1 or array.size == 0:
        raise ValueError(f"{name} must be a non-empty sequence of numbers, got {values!r}")
    if not np.all(np.isfinite(array)) or np.any(array <= 0):
        raise ValueError(f"{name} must hold finite ratios > 0, got {values!r}")
    return array


def _resampled_medians(values: np.ndarray, resamples: int, rng: np.random.Generator) -> np.ndarray:
    index = rng.integers(0, values.size, size=(resamples, values.size))
    return np.median(values[index], axis=1)


def _bounds(samples: np.ndarray, confidence: float) -> tuple[float, float]:
    tail = (1.0 - confidence) / 2.0 * 100.0
    low, high = np.percentile(samples, [tail, 100.0 - tail])
    return float(low), float(high)


def _check(confidence: float, resamples: int) -> None:
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence!r}")
    if resamples < 100:
        raise ValueError(f"resamples must be an integer >= 100, got {resamples!r}")


def median_interval(
    blocks: Sequence[float], *, confidence: float = CONFIDENCE, resamples: int = RESAMPLES, seed: int = 0
) -> Interval:
    """Median of the block ratios with its percentile bootstrap interval (blocks resampled)."""
    _check(confidence, resamples)
    values = _values("blocks", blocks)
    rng = np.random.default_rng(seed)
    low, high = _bounds(_resampled_medians(values, resamples, rng), confidence)
    return Interval(float(np.median(values)), low, high)


def change_interval(
    head: Sequence[float],
    base: Sequence[float],
    *,
    confidence: float = CONFIDENCE,
    resamples: int = RESAMPLES,
    seed: int = 0,
) -> Interval:
    """``median(head) / median(base)`` with its two-sample percentile bootstrap interval.

    ``head`` and ``base`` are block ratios of two measurements; each is resampled independently.
    A base known only by its point ratio (one value) contributes no spread of its own.
    """
    _check(confidence, resamples)
    h, b = _values("head", head), _values("base", base)
    rng = np.random.default_rng(seed)
    samples = _resampled_medians(h, resamples, rng) / _resampled_medians(b, resamples, rng)
    low, high = _bounds(samples, confidence)
    return Interval(float(np.median(h) / np.median(b)), low, high)
