"""Bootstrap intervals over timing blocks: hand-checkable cases, the two-sample change, bad input."""

from __future__ import annotations

import pytest

from mmbalance.bootstrap import Interval, change_interval, median_interval


def test_constant_blocks_have_a_zero_width_interval():
    assert median_interval([2.0] * 7) == Interval(2.0, 2.0, 2.0)


def test_median_interval_of_three_blocks_by_hand():
    # Medians of 3 draws with replacement from {1, 2, 3}: P(1) = P(at least two 1s) = 3 * (1/3)^2 * (2/3)
    # + (1/3)^3 = 7/27 ~ 26 %, P(3) = 7/27, P(2) = 13/27. The 2.5th and 97.5th percentiles therefore
    # fall inside the masses at 1 and at 3: the interval is [1, 3] around the median 2.
    assert median_interval([3.0, 1.0, 2.0]) == Interval(2.0, 1.0, 3.0)


def test_change_interval_of_a_constant_shift():
    # Every head block is 1.25 x every base block: whatever is resampled, the ratio is 1.25.
    base = [1.6, 1.6, 1.6, 1.6]
    assert change_interval([2.0] * 5, base) == Interval(1.25, 1.25, 1.25)
    # a base known only by its point ratio contributes no spread
    assert change_interval([2.0] * 5, [1.6]) == Interval(1.25, 1.25, 1.25)


def test_change_interval_covers_the_spread_of_both():
    base = [1.0, 1.02, 0.98, 1.01, 0.99, 1.0, 1.03, 0.97]
    head = [1.3, 1.32, 1.28, 1.31, 1.29, 1.3, 1.33, 1.27]
    change = change_interval(head, base)
    assert change.point == pytest.approx(1.3)
    # extreme resamples: 1.28 / 1.02 ~ 1.255 and 1.32 / 0.98 ~ 1.347 bound every resampled ratio
    assert 1.25 < change.low < 1.3 < change.high < 1.35
    assert change_interval(head, base) == change  # fixed seed: the same blocks give the same interval


def test_interval_format():
    assert Interval(2.4137, 2.351, 2.4949).format() == "2.41 [2.35, 2.49]"
    assert Interval(1.0, 0.5, 1.5).format(3) == "1.000 [0.500, 1.500]"


@pytest.mark.parametrize(
    "blocks, message",
    [([], "non-empty"), ([1.0, 0.0], "finite ratios > 0"), ([1.0, float("nan")], "finite ratios > 0")],
)
def test_bad_blocks(blocks, message):
    with pytest.raises(ValueError, match=message):
        median_interval(blocks)
    with pytest.raises(ValueError, match=message):
        change_interval([1.0], blocks)


def test_bad_settings():
    with pytest.raises(ValueError, match="confidence must be in"):
        median_interval([1.0], confidence=1.0)
    with pytest.raises(ValueError, match="resamples must be"):
        change_interval([1.0], [1.0], resamples=10)
