"""AnswerTimes: a provider's recent answer times and the pace policy plans a grace window with;
HedgeBudget: how many hedges a provider may get."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from refresherd.latency import MIN_SAMPLES, WINDOW, AnswerTimes, HedgeBudget

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
    assert (
        observed.quantile(0.5) is not None and observed.hint() == 0.1 * 3
    )  # the median, third of five


@pytest.mark.parametrize(
    ("q", "expected"),
    [(0.0, 1.0), (0.1, 1.0), (0.2, 2.0), (0.25, 3.0), (0.9, 9.0), (0.95, 10.0), (1.0, 10.0)],
)
def test_quantile_is_the_nearest_rank(q: float, expected: float) -> None:
    observed = times(*(float(n) for n in (7, 3, 10, 1, 9, 2, 8, 4, 6, 5)))
    assert observed.quantile(q) == expected


def test_median_of_five_is_the_middle_answer() -> None:
    assert times(0.5, 0.1, 0.4, 0.2, 0.3).quantile(0.5) == 0.3


def test_median_of_an_even_count_is_the_lower_middle_answer() -> None:
    """Nearest rank, not the mean of the two middle answers: ceil(0.5 * 6) = 3."""
    assert times(6.0, 1.0, 5.0, 2.0, 4.0, 3.0).hint() == 3.0


def test_hint_is_the_median() -> None:
    observed = times(*[0.1] * 10, *[2.0] * 9)  # nine slow answers in nineteen
    assert observed.hint() == 0.1
    observed.observe(2.0)  # ten in twenty: half the answers are still at or below 0.1
    assert observed.hint() == 0.1
    observed.observe(2.0)  # eleven in 21: most answers are slow, and so is the pace
    assert observed.hint() == 2.0


def test_one_slow_answer_in_eleven_does_not_move_the_hint() -> None:
    """One answer in eleven (9 %) is a stall: the 95th percentile would be that answer
    (nearest rank ceil(0.95 * 11) = 11) and every hedge would wait 20 times too long; the
    median is the fast answers' pace."""
    observed = times(*[0.1] * 10, 2.0)
    assert observed.quantile(0.95) == 2.0
    assert observed.hint() == 0.1


def test_stalls_in_fewer_than_half_the_answers_do_not_move_the_hint() -> None:
    assert times(*[0.1] * 6, *[12.0] * 5).hint() == 0.1
    assert times(*[0.1] * 5, *[12.0] * 6).hint() == 12.0


@settings(deadline=None)
@given(samples=st.lists(seconds, min_size=MIN_SAMPLES, max_size=WINDOW), q=quantiles)
def test_quantile_matches_the_nearest_rank_definition(samples: list[float], q: float) -> None:
    observed = times(*samples)
    assert observed.quantile(q) == nearest_rank(samples, q)
    assert observed.hint() == observed.quantile(0.5) == nearest_rank(samples, 0.5)


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
    assert observed.quantile(0.0) == 0.2 and observed.quantile(1.0) == 0.3
    assert observed.hint() == 0.2


def test_zero_is_an_answer_time() -> None:
    observed = times(0.0, 0.0, 0.0, 0.0, 0.0)
    assert len(observed) == MIN_SAMPLES and observed.hint() == 0.0


def test_a_new_sample_is_seen_by_the_next_quantile() -> None:
    observed = times(0.1, 0.1, 0.1, 5.0, 5.0)
    assert observed.hint() == 0.1  # sorted and kept
    observed.observe(5.0)
    assert observed.hint() == 0.1  # rank ceil(0.5 * 6) = 3
    observed.observe(5.0)
    assert observed.hint() == 5.0  # rank ceil(0.5 * 7) = 4
    assert observed.quantile(0.0) == 0.1


# ---- HedgeBudget ------------------------------------------------------------------------------


def test_hedge_budget_defaults_a_fifth_of_a_hedge_per_send_and_a_burst_of_twenty() -> None:
    budget = HedgeBudget()
    assert budget.share == 0.2 and budget.burst == 20.0
    assert budget.tokens == 20.0  # starts full


def test_hedge_budget_allows_a_burst_then_refuses() -> None:
    budget = HedgeBudget(share=0.1, burst=10.0)
    assert [budget.take() for _ in range(10)] == [True] * 10
    assert budget.tokens == 0.0
    assert not budget.take()
    assert not budget.take()
    assert budget.tokens == 0.0  # a refusal spends nothing, and the bucket never goes negative


def test_hedge_budget_refills_by_its_share_per_send() -> None:
    budget = HedgeBudget(share=0.1, burst=10.0)
    for _ in range(10):
        budget.take()
    for n in range(1, 6):
        budget.note_send()
        assert budget.tokens == pytest.approx(0.1 * n)
    # shares exact in binary: one hedge per four sends
    budget = HedgeBudget(share=0.25, burst=2.0)
    assert budget.take() and budget.take() and not budget.take()
    for _ in range(3):
        budget.note_send()
        assert not budget.take()
    budget.note_send()
    assert budget.tokens == 1.0
    assert budget.take() and budget.tokens == 0.0
    assert not budget.take()


def test_ten_sends_earn_one_hedge_after_the_burst() -> None:
    budget = HedgeBudget(share=0.1, burst=10.0)
    for _ in range(10):
        budget.take()
    for _ in range(10):
        budget.note_send()
    assert budget.take()


def test_hedge_budget_never_fills_above_its_burst() -> None:
    budget = HedgeBudget(share=0.1, burst=10.0)
    for _ in range(1000):
        budget.note_send()
    assert budget.tokens == budget.burst
    assert [budget.take() for _ in range(11)] == [True] * 10 + [False]  # nothing banked
    budget = HedgeBudget(share=1.0, burst=2.5)
    budget.take()
    for _ in range(5):
        budget.note_send()
    assert budget.tokens == 2.5
    assert budget.take() and budget.take()
    assert budget.tokens == 0.5 and not budget.take()


@pytest.mark.parametrize("sends", [1, 2, 3])
def test_take_refuses_below_one_token(sends: int) -> None:
    budget = HedgeBudget(share=0.375, burst=10.0)  # 0.375, 0.75, 1.125: exact in binary
    budget.tokens = 0.0
    for _ in range(sends):
        budget.note_send()
    before = budget.tokens
    taken = budget.take()
    assert taken is (before >= 1.0)
    assert budget.tokens == (before - 1.0 if taken else before)
    if sends < 3:
        assert not taken and budget.tokens == 0.375 * sends


@settings(deadline=None)
@given(
    ops=st.lists(st.booleans(), max_size=300),
    share=st.floats(min_value=0.01, max_value=2.0),
    burst=st.floats(min_value=1.0, max_value=20.0),
)
def test_hedge_budget_grants_at_most_the_burst_and_the_shares_earned(
    ops: list[bool], share: float, burst: float
) -> None:
    """Whatever the order of sends (False) and hedges (True): the bucket stays within
    [0, burst], a hedge is granted exactly when a whole token is there, and the hedges
    granted are never more than the burst plus the shares the sends earned."""
    budget = HedgeBudget(share=share, burst=burst)
    granted = sends = 0
    for hedge in ops:
        before = budget.tokens
        if hedge:
            taken = budget.take()
            assert taken is (before >= 1.0)
            granted += taken
        else:
            budget.note_send()
            sends += 1
            assert budget.tokens == min(burst, before + share)
        assert 0.0 <= budget.tokens <= burst
    assert granted <= burst + share * sends + 1e-9
