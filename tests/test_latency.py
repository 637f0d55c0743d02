"""AnswerTimes: a provider's recent answer times and the pace policy plans a grace window with."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from refresherd.latency import MIN_SAMPLES, WINDOW, AnswerTimes

seconds = st.floats(min_value=0.0, max_value=120.0)
quantiles = st.floats(min_value=0.0, max_value=1.0)


def times(*samples: float) -> AnswerTimes:
    observed = AnswerTimes()
    for sample in samples:
        observed.observe(sample)
    return observed


def nearest_rank(samples: list[float], q: float) -> float:
    """The textbook nearest-rank quantile: the smallest sample with at least a ``q`` share of
    the samples at or below it (rank ceil(q * n), at least 1)."""
    ordered = sorted(samples)
    rank = max(1, math.ceil(q * len(ordered) - 1e-9))
    return ordered[rank - 1]


def test_too_few_samples_give_no_quantile() -> None:
    observed = AnswerTimes()
    for n in range(MIN_SAMPLES - 1):
        assert observed.quantile(0.5) is None and observed.hint() is None
        observed.observe(0.1 * (n + 1))
    assert len(observed) == MIN_SAMPLES - 1
    assert observed.quantile(0.0) is None and observed.hint() is None
    observed.observe(0.5)
    assert len(observed) == MIN_SAMPLES
    assert observed.quantile(0.5) is not None and observed.hint() == 0.5


@pytest.mark.parametrize(
    ("q", "expected"),
    [(0.0, 1.0), (0.1, 1.0), (0.2, 2.0), (0.25, 3.0), (0.9, 9.0), (0.95, 10.0), (1.0, 10.0)],
)
def test_quantile_is_the_nearest_rank(q: float, expected: float) -> None:
    observed = times(*(float(n) for n in (7, 3, 10, 1, 9, 2, 8, 4, 6, 5)))
    assert observed.quantile(q) == expected


def test_median_of_five_is_the_middle_answer() -> None:
    assert times(0.5, 0.1, 0.4, 0.2, 0.3).quantile(0.5) == 0.3


def test_hint_is_the_95th_percentile() -> None:
    observed = times(*[0.1] * 19, 2.0)  # one slow answer in twenty: not the 95th percentile
    assert observed.hint() == 0.1
    observed.observe(2.0)  # two in 21: it is
    assert observed.hint() == 2.0


def test_hint_counts_one_slow_answer_in_eleven() -> None:
    """One answer in eleven (9 %) is slower than the rest: more than 5 % of the answers, so the
    95th percentile is that answer, not the fast ones (nearest rank ceil(0.95 * 11) = 11)."""
    assert times(*[0.1] * 10, 2.0).hint() == 2.0


@settings(deadline=None)
@given(samples=st.lists(seconds, min_size=MIN_SAMPLES, max_size=WINDOW), q=quantiles)
def test_quantile_matches_the_nearest_rank_definition(samples: list[float], q: float) -> None:
    observed = times(*samples)
    assert observed.quantile(q) == nearest_rank(samples, q)
    assert observed.hint() == observed.quantile(0.95)


@settings(deadline=None)
@given(
    samples=st.lists(seconds, min_size=MIN_SAMPLES, max_size=3 * WINDOW),
    q1=quantiles,
    q2=quantiles,
)
def test_quantile_is_a_recent_sample_and_monotone(
    samples: list[float], q1: float, q2: float
) -> None:
    observed = times(*samples)
    recent = samples[-WINDOW:]
    lo, hi = sorted((q1, q2))
    low, high = observed.quantile(lo), observed.quantile(hi)
    assert low is not None and high is not None
    assert low in recent and high in recent
    assert min(recent) <= low <= high <= max(recent)


def test_only_the_last_window_of_samples_counts() -> None:
    observed = times(*[10.0] * WINDOW)
    assert len(observed) == WINDOW and observed.quantile(0.0) == 10.0
    for n in range(WINDOW - 1):
        observed.observe(0.1)
        assert len(observed) == WINDOW
        assert observed.quantile(1.0) == 10.0  # one old slow answer is still in the window
        assert n < WINDOW - 1
    observed.observe(0.1)  # the last of the old answers drops out
    assert len(observed) == WINDOW
    assert observed.quantile(1.0) == 0.1 and observed.hint() == 0.1


@pytest.mark.parametrize("negative", [-0.001, -1.0, -math.inf])
def test_negative_times_are_ignored(negative: float) -> None:
    """A monotonic clock never runs back; a negative duration is a bug elsewhere, not a pace."""
    observed = times(0.2, 0.2, 0.2, 0.2)
    observed.observe(negative)
    assert len(observed) == MIN_SAMPLES - 1 and observed.hint() is None
    observed.observe(0.3)
    observed.observe(negative)
    assert len(observed) == MIN_SAMPLES
    assert observed.quantile(0.0) == 0.2 and observed.hint() == 0.3


def test_zero_is_an_answer_time() -> None:
    observed = times(0.0, 0.0, 0.0, 0.0, 0.0)
    assert len(observed) == MIN_SAMPLES and observed.hint() == 0.0


def test_a_new_sample_is_seen_by_the_next_quantile() -> None:
    observed = times(0.1, 0.1, 0.1, 0.1, 0.1)
    assert observed.hint() == 0.1  # sorted and kept
    observed.observe(5.0)
    assert observed.hint() == 5.0
    assert observed.quantile(0.0) == 0.1
