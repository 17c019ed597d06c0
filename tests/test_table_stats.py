"""The comparisons behind the table marks, against hand values."""

from __future__ import annotations

import math

import pytest

from mmbalance.results import ResultRow
from mmbalance.table_stats import (
    below_single_modality,
    identical_to_joint,
    paired_delta,
    rank_marks,
    seed_values,
)
from tests.result_rows import make_row


def test_ranks_compare_displayed_means_and_skip_unimodal_rows():
    means = {"joint": 0.9100, "cggm": 0.9600, "agm": 0.91004, "unimodal[a]": 0.99, "pmr": math.nan}
    # shown with 2 decimals in %: joint 91.00 and agm 91.00 tie for second; unimodal[a] is not ranked
    assert rank_marks(means, True, 100.0, 2) == {"cggm": 1, "joint": 2, "agm": 2}
    # lower is better: the smallest mean is best
    assert rank_marks({"joint": 0.56, "ogm_ge": 0.51, "cggm": 0.74}, False, 1.0, 3) == {
        "ogm_ge": 1,
        "joint": 2,
    }
    # one distinct value: no marks
    assert rank_marks({"joint": 0.5, "mses": 0.5, "unimodal[a]": 0.7}, True, 100.0, 2) == {}


def test_below_single_modality():
    means = {"joint": 0.67, "cggm": 0.80, "agm": 0.7321, "unimodal[flair]": 0.7321, "unimodal[t1]": 0.01}
    assert below_single_modality(means, True, 100.0, 2) == {"joint"}  # agm ties the best unimodal row
    assert below_single_modality({"joint": 0.80, "unimodal[a]": 0.70}, False, 1.0, 3) == {"joint"}
    assert below_single_modality({"joint": 0.1}, True, 100.0, 2) == set()  # no unimodal row


def test_paired_t_test_by_hand():
    # With 3 pairs (2 degrees of freedom) the two-sided p of a t statistic is 1 - |t| / sqrt(t^2 + 2).
    # d = 4, 5, 6: mean 5, sample sd 1, t = 5 * sqrt(3) = 8.660, p = 1 - 8.660 / sqrt(77) = 0.01307
    delta = paired_delta({0: 0.94, 1: 0.96, 2: 0.98, 7: 0.5}, {0: 0.90, 1: 0.91, 2: 0.92, 9: 0.1})
    assert delta.pairs == 3 and delta.diff == pytest.approx(0.05)
    assert delta.p_value == pytest.approx(1 - 5 * math.sqrt(3) / math.sqrt(77), rel=1e-9)
    assert delta.significant
    # d = 1, -1, 1: mean 1/3, sd 2/sqrt(3), t = 0.5, p = 1 - 0.5 / 1.5 = 2/3
    delta = paired_delta({0: 0.91, 1: 0.90, 2: 0.93}, {0: 0.90, 1: 0.91, 2: 0.92})
    assert delta.p_value == pytest.approx(2 / 3, rel=1e-9) and not delta.significant


def test_paired_delta_edge_cases():
    assert paired_delta({0: 0.5}, {1: 0.5}) is None  # no common seed
    one = paired_delta({0: 0.6, 1: 0.7}, {0: 0.5})  # one pair: a difference, no test
    assert one.diff == pytest.approx(0.1) and one.pairs == 1 and one.p_value is None and not one.significant
    same = paired_delta({0: 0.5, 1: 0.6}, {0: 0.5, 1: 0.6})  # all differences zero
    assert same.diff == 0.0 and same.p_value is None and not same.significant
    nan = paired_delta({0: math.nan, 1: 0.6, 2: 0.7}, {0: 0.5, 1: 0.5, 2: 0.5})  # NaN seeds left out
    assert nan.pairs == 2 and nan.diff == pytest.approx(0.15)


def _rows(*specs):
    return [
        ResultRow.from_dict(make_row(label, "d", seed, test, status=status))
        for label, seed, test, status in specs
    ]


def test_identical_to_joint():
    a, b = {"acc": 0.9, "loss": 0.3}, {"acc": 0.8, "loss": 0.4}
    rows = _rows(
        ("joint", 0, a, "ok"),
        ("joint", 1, b, "ok"),
        ("mses", 0, a, "ok"),
        ("mses", 1, b, "ok"),  # identical on every seed
        ("mslr", 0, a, "ok"),
        ("mslr", 1, {**b, "loss": 0.41}, "ok"),  # one metric of one seed differs
        ("agm", 0, a, "ok"),
        ("agm", 1, None, "failed"),  # a failed run is not identical
        ("pmr", 2, a, "ok"),  # a seed joint does not have
        ("unimodal[x]", 0, a, "ok"),  # unimodal rows are never flagged
    )
    assert identical_to_joint(rows, "test") == {"mses"}
    values = seed_values(rows, "test")
    assert values[("mslr", "d", "loss")] == {0: 0.3, 1: 0.41}
    assert ("agm", "d", "acc") in values and values[("agm", "d", "acc")] == {0: 0.9}
