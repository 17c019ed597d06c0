"""The comparisons behind the table marks: best and second best per column, Δ against joint with a
paired test across seeds, methods identical to joint, and cells below the best single modality.

Decisions, stated once here and in the tables' captions:

* Ranking compares the means **as displayed** (rounded to the column's decimals), so two cells that
  read the same share a mark; only the multimodal rows compete (``unimodal[...]`` rows are
  references, not entries); a column gets no marks when fewer than two distinct values compete.
* Δ is the mean over the seeds that both the row and joint have of ``row − joint`` (seed ``s`` of a
  method against seed ``s`` of joint: same data split and initialisation seed). Significance is a
  two-sided **paired t-test** (``scipy.stats.ttest_rel``) on those per-seed values at α = 0.05.
  A t-test, not Wilcoxon: with the 2-5 seeds of a benchmark the signed-rank test cannot reach
  p < 0.05 at all (its smallest two-sided p with 3 pairs is 0.25). Fewer than two pairs, or
  differences that are all zero, count as not significant.
* "Identical to joint": every ``ok`` row of the method has a joint row of the same dataset and seed
  with exactly the same metrics of the split shown, and the method has no failed run (for example a
  method whose modulation never fires).
* "Below single modality": the row's displayed mean is worse than that of the best ``unimodal[...]``
  row of the same column.
* Rows of a grid (labels with swept values, :mod:`mmbalance.variants`) are compared with the joint
  and unimodal rows of the same swept values where the spec sweeps those too, else with the plain
  ``joint`` / ``unimodal[m]`` rows (:func:`mmbalance.variants.reference_label`).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from mmbalance.results import ResultRow
from mmbalance.variants import reference_label, swept_items

__all__ = [
    "ALPHA",
    "Delta",
    "is_unimodal",
    "is_joint",
    "joint_of",
    "seed_values",
    "rank_marks",
    "below_single_modality",
    "paired_delta",
    "identical_to_joint",
]

ALPHA = 0.05  # significance level of the paired test
JOINT = "joint"


def is_unimodal(label: str) -> bool:
    return label.split("[", 1)[0] == "unimodal"


def is_joint(label: str) -> bool:
    """``joint``, or a joint row of a grid (``joint[clip_grad_norm=0.8]``)."""
    return label.split("[", 1)[0] == JOINT


def joint_of(label: str, labels: Iterable[str]) -> str:
    """The joint row ``label`` is compared with (module docstring)."""
    return reference_label(label, {lb for lb in labels if is_joint(lb)}, JOINT)


def seed_values(rows: Iterable[ResultRow], split: str) -> dict[tuple[str, str, str], dict[int, float]]:
    """``{(label, dataset, metric): {seed: value}}`` of the ``ok`` rows (null metrics as NaN)."""
    out: dict[tuple[str, str, str], dict[int, float]] = {}
    for row in rows:
        if row.status != "ok":
            continue
        for name in row.metrics.get(split) or {}:
            value = row.metric(split, name)
            if value is not None:
                out.setdefault((row.label, row.dataset, name), {})[row.seed] = value
    return out


def _displayed(means: Mapping[str, float], scale: float, decimals: int) -> dict[str, float]:
    return {lb: round(m * scale, decimals) for lb, m in means.items() if not math.isnan(m)}


def rank_marks(
    means: Mapping[str, float], higher_is_better: bool, scale: float, decimals: int
) -> dict[str, int]:
    """``{label: 1 (best) or 2 (second best)}`` among the multimodal rows of one column."""
    shown = {lb: v for lb, v in _displayed(means, scale, decimals).items() if not is_unimodal(lb)}
    distinct = sorted(set(shown.values()), reverse=higher_is_better)
    if len(distinct) < 2:
        return {}
    return {lb: 1 if v == distinct[0] else 2 for lb, v in shown.items() if v in distinct[:2]}


def below_single_modality(
    means: Mapping[str, float], higher_is_better: bool, scale: float, decimals: int
) -> set[str]:
    """Multimodal rows whose displayed mean is worse than the best ``unimodal[...]`` row's."""
    shown = _displayed(means, scale, decimals)
    singles: dict[tuple[str, ...], list[float]] = {}
    for lb, v in shown.items():
        if is_unimodal(lb):
            singles.setdefault(swept_items(lb), []).append(v)
    out = set()
    for lb, v in shown.items():
        single = singles.get(swept_items(lb)) or singles.get(())
        if is_unimodal(lb) or not single:
            continue
        best = max(single) if higher_is_better else min(single)
        if v < best if higher_is_better else v > best:
            out.add(lb)
    return out


@dataclass(frozen=True)
class Delta:
    """Row minus joint over the paired seeds. ``p_value`` is None when there is no test (< 2 pairs)."""

    diff: float
    pairs: int
    p_value: float | None

    @property
    def significant(self) -> bool:
        return self.p_value is not None and self.p_value < ALPHA


def paired_delta(row_values: Mapping[int, float], joint_values: Mapping[int, float]) -> Delta | None:
    """Δ and the paired t-test over the seeds both have (NaN values left out); None without a pair."""
    seeds = sorted(
        s for s in set(row_values) & set(joint_values)
        if not (math.isnan(row_values[s]) or math.isnan(joint_values[s]))
    )
    if not seeds:
        return None
    ours = [row_values[s] for s in seeds]
    theirs = [joint_values[s] for s in seeds]
    diffs = [a - b for a, b in zip(ours, theirs, strict=True)]
    diff = math.fsum(diffs) / len(diffs)
    if len(seeds) < 2 or all(d == 0 for d in diffs):
        return Delta(diff, len(seeds), None)
    from scipy.stats import ttest_rel  # only when Δ columns are asked for

    with warnings.catch_warnings():  # near-constant differences: scipy warns, the p-value stands
        warnings.simplefilter("ignore", RuntimeWarning)
        p_value = float(ttest_rel(ours, theirs).pvalue)
    return Delta(diff, len(seeds), None if math.isnan(p_value) else p_value)


def identical_to_joint(rows: Iterable[ResultRow], split: str) -> set[str]:
    """Labels (other than joint and the unimodal rows) whose runs all equal joint's (module docstring)."""
    rows = list(rows)
    joint = {
        (r.label, r.dataset, r.seed): dict(r.metrics.get(split) or {})
        for r in rows
        if is_joint(r.label) and r.status == "ok"
    }
    labels = {r.label for r in rows}
    candidates: dict[str, bool] = {}
    for r in rows:
        if is_joint(r.label) or is_unimodal(r.label) or r.status == "unsupported":
            continue
        ref = joint.get((joint_of(r.label, labels), r.dataset, r.seed))
        same = r.status == "ok" and ref == dict(r.metrics.get(split) or {})
        candidates[r.label] = candidates.get(r.label, True) and same
    return {label for label, same in candidates.items() if same}
