"""Every pure decision in refresherd.policy: when to refresh, how long to wait, what failed."""

from __future__ import annotations

import heapq
import itertools
import math
import sys
from dataclasses import dataclass, field, replace

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from refresherd import policy
from refresherd.model import (
    Attempt,
    Failure,
    FailureKind,
    RefreshTokenUsage,
    Secret,
    State,
    TokenSet,
)
from refresherd.policy import (
    DEFAULT_LATENCY,
    GRACE_WINDOW_MISSED,
    INVALID_GRANT,
    INVALID_GRANT_AFTER_UNRESOLVED,
    LAST_SEND_LEAD,
    MAX_SENDS_IN_FLIGHT,
    MAX_UNSETTLED_SENDS,
    MIN_HEDGE_AFTER,
    MIN_WINDOW_MARGIN,
    Backoff,
    Decision,
    FailureContext,
    Invalidate,
    OpenCircuit,
    SendAgain,
    backoff_delay,
    circuit_delay,
    decide,
    hedge_after,
    keep_series_since,
    plan_next_refresh,
    retry_spacing,
    series_spacing,
    window_closes_at,
    window_margin,
    window_missed,
)
from refresherd.settings import ScheduleConfig

CFG = ScheduleConfig()
NOW = 1_700_000_000.0
ONE_TIME = RefreshTokenUsage.ONE_TIME
REUSE = RefreshTokenUsage.REUSE
TEN_YEARS = 10 * 365 * 86400.0

rands = st.floats(min_value=0.0, max_value=1.0, exclude_max=True)
nows = st.floats(min_value=1_000_000_000.0, max_value=4_000_000_000.0)
# Visma Connect allows 5 to 60 s; accept a wider range to find edge cases.
graces = st.floats(min_value=0.5, max_value=3600.0)


def plan(
    lifetime: float,
    *,
    rand: float = 0.0,
    now: float = NOW,
    cfg: ScheduleConfig = CFG,
    after_refresh: bool = True,
) -> float:
    """As the refresher plans after a grant: not_before = now + min_interval."""
    return plan_next_refresh(
        now=now,
        expires_at=now + lifetime,
        lifetime=lifetime,
        cfg=cfg,
        rand=rand,
        not_before=now + cfg.min_interval if after_refresh else None,
    )


# ---- plan_next_refresh -----------------------------------------------------------------------


@settings(deadline=None)
@given(lifetime=st.floats(min_value=10.0, max_value=TEN_YEARS), rand=rands, now=nows)
def test_planned_strictly_before_expiry_and_not_before_min_interval(
    lifetime: float, rand: float, now: float
) -> None:
    planned = plan(lifetime, rand=rand, now=now)
    assert planned < now + lifetime
    # never a tight loop: the next refresh is at least min_interval after this one
    assert planned - now >= CFG.min_interval


@settings(deadline=None)
@given(
    lifetime=st.floats(min_value=10.0, max_value=TEN_YEARS),
    rand=rands,
    now=nows,
    fraction=st.floats(min_value=0.05, max_value=0.99),
    margin=st.floats(min_value=0.0, max_value=7200.0),
    jitter=st.floats(min_value=0.0, max_value=0.5),
    min_interval=st.floats(min_value=0.0, max_value=5.0),
)
def test_planned_before_expiry_for_any_valid_schedule(
    lifetime: float,
    rand: float,
    now: float,
    fraction: float,
    margin: float,
    jitter: float,
    min_interval: float,
) -> None:
    cfg = replace(
        CFG, refresh_fraction=fraction, min_margin=margin, jitter=jitter, min_interval=min_interval
    )
    planned = plan(lifetime, rand=rand, now=now, cfg=cfg)
    assert now + min_interval <= planned < now + lifetime


@settings(deadline=None)
@given(lifetime=st.floats(min_value=CFG.min_interval + 0.01, max_value=10.0), rand=rands)
def test_short_lifetimes_above_min_interval_still_refresh_before_expiry(
    lifetime: float, rand: float
) -> None:
    planned = plan(lifetime, rand=rand)
    assert NOW + CFG.min_interval <= planned < NOW + lifetime


def test_lifetime_below_min_interval_does_not_spin() -> None:
    # A token that lives less than min_interval cannot be refreshed before expiry without a
    # tight loop; the loop guard wins and the refresh waits min_interval.
    assert plan(0.5) == NOW + CFG.min_interval
    assert plan(0.0) == NOW + CFG.min_interval


@settings(deadline=None)
@given(lifetime=st.floats(min_value=10.0, max_value=TEN_YEARS), rand=rands, now=nows)
def test_jitter_only_moves_earlier_and_within_bounds(
    lifetime: float, rand: float, now: float
) -> None:
    base = plan(lifetime, rand=0.0, now=now)
    jittered = plan(lifetime, rand=rand, now=now)
    assert jittered <= base
    # at most `jitter` of the lead time (the time from now to the unjittered plan)
    lead = base - now
    assert base - jittered <= CFG.jitter * lead * (1 + 1e-9) + 1e-6


@settings(deadline=None)
@given(lifetime=st.floats(min_value=10.0, max_value=TEN_YEARS), r1=rands, r2=rands)
def test_plan_is_monotone_in_rand(lifetime: float, r1: float, r2: float) -> None:
    lo, hi = sorted((r1, r2))
    assert plan(lifetime, rand=hi) <= plan(lifetime, rand=lo)


@settings(deadline=None)
@given(l1=st.floats(min_value=10.0, max_value=TEN_YEARS), l2=st.floats(10.0, TEN_YEARS))
def test_longer_lifetime_is_never_planned_earlier(l1: float, l2: float) -> None:
    short, long = sorted((l1, l2))
    assert plan(short) <= plan(long)


def test_concrete_20_second_token() -> None:
    # margin = max(20 * 0.2, min(60, 20 / 2)) = 10 s; jitter up to 10 % of the 10 s lead
    assert plan(20.0, rand=0.0) == pytest.approx(NOW + 10.0)
    assert plan(20.0, rand=0.999999) == pytest.approx(NOW + 9.0, abs=1e-4)


def test_concrete_one_hour_token() -> None:
    # margin = max(720, 60) = 720 s: at 80 % of the lifetime, jitter up to 288 s earlier
    assert plan(3600.0, rand=0.0) == pytest.approx(NOW + 2880.0)
    assert plan(3600.0, rand=0.5) == pytest.approx(NOW + 2880.0 - 144.0)
    assert plan(3600.0, rand=0.999999) == pytest.approx(NOW + 2592.0, abs=1e-2)


def test_concrete_24_hour_token() -> None:
    day = 86400.0
    assert plan(day, rand=0.0) == pytest.approx(NOW + 0.8 * day)
    assert plan(day, rand=0.999999) == pytest.approx(NOW + 0.8 * day * 0.9, abs=1e-1)


def test_min_margin_dominates_for_medium_tokens() -> None:
    # 5 minutes: 20 % is 60 s = min_margin; 4 minutes: 20 % is 48 s < 60 s margin
    assert plan(300.0) == pytest.approx(NOW + 240.0)
    assert plan(240.0) == pytest.approx(NOW + 180.0)


def test_no_expiry_is_due_at_once() -> None:
    assert plan_next_refresh(now=NOW, expires_at=None, lifetime=None, cfg=CFG, rand=0.5) == NOW
    assert (
        plan_next_refresh(
            now=NOW, expires_at=None, lifetime=3600.0, cfg=CFG, rand=0.5, not_before=NOW + 7
        )
        == NOW + 7
    )


def test_already_expired_is_due_at_once() -> None:
    assert plan_next_refresh(now=NOW, expires_at=NOW - 10, lifetime=None, cfg=CFG, rand=0.3) == NOW


def test_lifetime_from_expiry_when_unknown() -> None:
    # lifetime None: counted from now to expires_at (an imported token with expires_at)
    with_lifetime = plan_next_refresh(
        now=NOW, expires_at=NOW + 3600, lifetime=3600.0, cfg=CFG, rand=0.2
    )
    without = plan_next_refresh(now=NOW, expires_at=NOW + 3600, lifetime=None, cfg=CFG, rand=0.2)
    assert with_lifetime == without


@settings(deadline=None)
@given(
    lifetime=st.floats(min_value=10.0, max_value=TEN_YEARS),
    rand=rands,
    not_before=st.floats(min_value=0.0, max_value=TEN_YEARS),
)
def test_never_before_not_before(lifetime: float, rand: float, not_before: float) -> None:
    planned = plan_next_refresh(
        now=NOW,
        expires_at=NOW + lifetime,
        lifetime=lifetime,
        cfg=CFG,
        rand=rand,
        not_before=NOW + not_before,
    )
    assert planned >= NOW + not_before


# ---- backoff_delay ---------------------------------------------------------------------------

huge_failures = st.integers(min_value=0, max_value=10**30)


@settings(deadline=None)
@given(f1=huge_failures, f2=huge_failures, rand=rands)
def test_backoff_is_monotone_in_failures(f1: int, f2: int, rand: float) -> None:
    lo, hi = sorted((f1, f2))
    kw = {"initial": CFG.backoff_initial, "maximum": CFG.backoff_max, "rand": rand}
    assert backoff_delay(lo, **kw) <= backoff_delay(hi, **kw)


@settings(deadline=None)
@given(
    failures=huge_failures,
    rand=rands,
    initial=st.floats(min_value=0.001, max_value=1e6),
    maximum=st.floats(min_value=0.001, max_value=1e7),
)
def test_backoff_bounds(failures: int, rand: float, initial: float, maximum: float) -> None:
    delay = backoff_delay(failures, initial=initial, maximum=maximum, rand=rand)
    assert math.isfinite(delay)
    assert delay <= maximum
    base = min(maximum, initial * 2.0 ** min(max(failures - 1, 0), 60))
    assert delay >= base / 2
    assert delay > 0


@pytest.mark.parametrize("failures", [10**6, 2**63, sys.maxsize, 10**100])
def test_backoff_does_not_overflow(failures: int) -> None:
    assert backoff_delay(failures, initial=5.0, maximum=900.0, rand=0.0) == 450.0
    assert backoff_delay(failures, initial=5.0, maximum=900.0, rand=0.999999) <= 900.0


def test_backoff_concrete() -> None:
    kw = {"initial": 5.0, "maximum": 900.0, "rand": 0.0}
    assert [backoff_delay(f, **kw) for f in range(0, 10)] == [
        2.5, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0, 320.0, 450.0
    ]  # fmt: skip
    assert backoff_delay(1, initial=5.0, maximum=900.0, rand=0.5) == 3.75


# ---- the grace window: margin, close, keep-since, hedge, spacing ---------------------------

GRACE = 30.0
# Default pace (latency None): margin max(0.25, 3 * 0.25) = 0.75 s of a 30 s window.
CLOSES = NOW + 29.7  # window_closes_at(NOW, 30, None): the default pace 0.1, margin 0.3
LAST = CLOSES - LAST_SEND_LEAD  # the latest planned start of a send of a series begun at NOW
INSIDE = NOW + 1.0
OUTSIDE = CLOSES
MIN_SPACING = 0.1 * 0.8  # retry_spacing's floor, less the jitter
# Differences of wall times near NOW carry float error of a few 1e-7 s.
EPS = 1e-6


def series(sends: int = 1, started_at: float = NOW, version: int = 1, settled: int = 0) -> Attempt:
    return Attempt(
        version=version, started_at=started_at, owner="owner-1", sends=sends, settled=settled
    )


latencies = st.none() | st.floats(min_value=0.0, max_value=2.0)
wide_latencies = st.none() | st.floats(min_value=0.0, max_value=60.0)


@pytest.mark.parametrize(
    ("grace", "latency", "margin"),
    [
        (30.0, None, 0.3),  # DEFAULT_LATENCY: three answer times of 0.1 s
        (30.0, 0.0, MIN_WINDOW_MARGIN),  # the floor
        (30.0, 0.05, MIN_WINDOW_MARGIN),
        (30.0, 0.1, 0.3),  # three answer times, just over the floor
        (30.0, 1.0, 3.0),
        (30.0, 1.5, 4.5),
        (30.0, 2.0, 6.0),  # three answer times reach the ceiling exactly
        (30.0, 10.0, 6.0),  # the ceiling: a fifth of the window
        (5.0, 2.0, 1.0),
        (1.0, None, 0.2),  # the ceiling wins over the floor in a tiny window
        (1.0, 0.0, 0.2),
    ],
)
def test_window_margin_concrete(grace: float, latency: float | None, margin: float) -> None:
    assert window_margin(grace, latency) == pytest.approx(margin)


@settings(deadline=None)
@given(grace=graces, latency=wide_latencies, other=wide_latencies)
def test_window_margin_bounds(grace: float, latency: float | None, other: float | None) -> None:
    margin = window_margin(grace, latency)
    assert min(grace * 0.2, MIN_WINDOW_MARGIN) <= margin <= grace * 0.2
    pace = DEFAULT_LATENCY if latency is None else latency
    assert margin >= min(grace * 0.2, 3.0 * pace)
    assert margin <= max(MIN_WINDOW_MARGIN, 3.0 * pace)
    assert window_margin(grace, None) == window_margin(grace, DEFAULT_LATENCY)
    if other is not None and latency is not None:
        lo, hi = sorted((latency, other))
        assert window_margin(grace, lo) <= window_margin(grace, hi)


def test_window_closes_at_and_keep_series_since_concrete() -> None:
    assert window_closes_at(NOW, 30.0, None) == CLOSES
    assert window_closes_at(NOW, 30.0, 1.0) == NOW + 27.0
    assert window_closes_at(NOW, 5.0, 2.0) == NOW + 4.0
    assert keep_series_since(CLOSES, 30.0, None) == NOW
    assert keep_series_since(NOW + 27.0, 30.0, 1.0) == NOW
    for latency in (None, 0.0, 2.0):
        # No window: a re-use token is not spent by a send, and none of its series is missed.
        assert keep_series_since(NOW, 0.0, latency) is None
        assert keep_series_since(NOW, -1.0, latency) is None


@settings(deadline=None)
@given(
    started=nows,
    grace=st.floats(min_value=0.01, max_value=3600.0),
    latency=wide_latencies,
    gap=st.floats(min_value=1e-3, max_value=1e4),
)
def test_window_closes_at_and_keep_series_since_agree(
    started: float, grace: float, latency: float | None, gap: float
) -> None:
    """The journal keeps a series going while it started at or after keep_series_since(now):
    exactly while now has not passed window_closes_at (what decide and window_missed use)."""
    closes_at = window_closes_at(started, grace, latency)
    assert started + 0.8 * grace - 1e-5 <= closes_at < started + grace
    keep = keep_series_since(closes_at, grace, latency)
    assert keep == pytest.approx(started, abs=1e-5)
    before = keep_series_since(closes_at - gap, grace, latency)
    after = keep_series_since(closes_at + gap, grace, latency)
    assert before is not None and after is not None
    assert started >= before  # still open: the series goes on
    assert started < after  # closed: a series with an unsettled send is missed
    unresolved = series(sends=1, started_at=started)
    kw = {"version": 1, "usage": ONE_TIME, "grace_period": grace, "latency": latency}
    assert not window_missed(unresolved, now=closes_at - gap, **kw)
    assert window_missed(unresolved, now=closes_at + gap, **kw)


@pytest.mark.parametrize(
    ("grace", "latency", "after"),
    [
        (30.0, None, 0.5),  # a provider not yet observed: DEFAULT_LATENCY, at the floor
        (30.0, 0.0, MIN_HEDGE_AFTER),  # the floor: an IdP answering in ms is not raced
        (30.0, 0.05, MIN_HEDGE_AFTER),
        (30.0, 0.1, MIN_HEDGE_AFTER),  # five answer times, still under the floor
        (30.0, 0.2, 1.0),  # five answer times
        (30.0, 0.5, 2.5),
        (30.0, 1.0, 5.0),
        (60.0, 2.0, 10.0),
        (20.0, 2.0, 5.0),  # the ceiling: a quarter of the window
        (5.0, 2.0, 1.25),
        (1.0, 2.0, MIN_HEDGE_AFTER),  # the floor wins over the ceiling in a tiny window
    ],
)
def test_hedge_after_concrete(grace: float, latency: float | None, after: float) -> None:
    assert hedge_after(grace, latency) == pytest.approx(after)


@settings(deadline=None)
@given(grace=graces, latency=wide_latencies, other=wide_latencies)
def test_hedge_after_bounds(grace: float, latency: float | None, other: float | None) -> None:
    after = hedge_after(grace, latency)
    assert MIN_HEDGE_AFTER <= after <= max(MIN_HEDGE_AFTER, grace / 4.0)
    if latency is not None:
        assert after <= max(MIN_HEDGE_AFTER, 5.0 * latency)
        assert after >= min(5.0 * latency, grace / 4.0)
    else:
        assert after == hedge_after(grace, DEFAULT_LATENCY)
    if other is not None and latency is not None:
        lo, hi = sorted((latency, other))
        assert hedge_after(grace, lo) <= hedge_after(grace, hi)


def test_retry_spacing_doubles_up_to_a_tenth_of_the_window() -> None:
    # grace 30, default pace: window 29.7 s, from 0.1 s doubling, capped at 29.7 / 10
    spacing = [retry_spacing(n, 30.0, None, 0.5) for n in range(1, 10)]
    cap = 29.7 / 10
    assert spacing == pytest.approx([0.1, 0.2, 0.4, 0.8, 1.6, cap, cap, cap, cap])
    # an observed pace: from one answer time (0.5 s), window 28.5 s (margin 3 * 0.5)
    assert retry_spacing(1, 30.0, 0.5, 0.5) == pytest.approx(0.5)
    assert retry_spacing(2, 30.0, 0.5, 0.5) == pytest.approx(1.0)
    assert retry_spacing(9, 30.0, 0.5, 0.5) == pytest.approx(28.5 / 10)
    # a slow IdP in a short window: one answer time is more than a twentieth of the window
    assert retry_spacing(1, 5.0, 2.0, 0.5) == pytest.approx(0.2)  # 4 s window / 20
    assert retry_spacing(9, 5.0, 2.0, 0.5) == pytest.approx(4.0 / 10)
    # never under 0.1 s: not even a fast IdP gets a tight loop
    assert retry_spacing(1, 30.0, 0.001, 0.5) == pytest.approx(0.1)
    assert retry_spacing(1, 1.0, None, 0.5) == pytest.approx(0.1)
    assert retry_spacing(5, 0.0, None, 0.5) == pytest.approx(0.1)


def test_retry_spacing_jitter_is_twenty_percent_either_way() -> None:
    assert retry_spacing(3, 30.0, None, 0.0) == pytest.approx(0.4 * 0.8)
    assert retry_spacing(3, 30.0, None, 0.5) == pytest.approx(0.4)
    assert retry_spacing(3, 30.0, None, 0.999999) == pytest.approx(0.4 * 1.2, rel=1e-5)


@pytest.mark.parametrize("sends", [-5, 0, 1])
def test_retry_spacing_counts_from_the_first_send(sends: int) -> None:
    assert retry_spacing(sends, 30.0, None, 0.5) == retry_spacing(1, 30.0, None, 0.5)


@pytest.mark.parametrize("sends", [10**6, 2**63, 10**100])
def test_retry_spacing_does_not_overflow(sends: int) -> None:
    assert retry_spacing(sends, 30.0, None, 0.5) == pytest.approx(29.7 / 10)


@settings(deadline=None)
@given(
    sends=st.integers(min_value=-3, max_value=10**6),
    grace=st.floats(min_value=0.0, max_value=3600.0),
    latency=wide_latencies,
    rand=rands,
    r2=rands,
)
def test_retry_spacing_bounds(
    sends: int, grace: float, latency: float | None, rand: float, r2: float
) -> None:
    spacing = retry_spacing(sends, grace, latency, rand)
    window = max(grace - window_margin(grace, latency), 0.0)
    assert math.isfinite(spacing)
    assert spacing >= MIN_SPACING * (1 - 1e-9)
    assert spacing <= 1.2 * max(0.1, window / 6.0) * (1 + 1e-9)
    # growth: never shrinks, at most doubles (same jitter)
    following = retry_spacing(sends + 1, grace, latency, rand)
    assert spacing <= following <= 2.0 * spacing * (1 + 1e-9)
    # jitter within ±20 % of the unjittered spacing, monotone in rand
    plain = retry_spacing(sends, grace, latency, 0.5)
    assert 0.8 * plain * (1 - 1e-9) <= spacing <= 1.2 * plain * (1 + 1e-9)
    lo, hi = sorted((rand, r2))
    assert retry_spacing(sends, grace, latency, lo) <= retry_spacing(sends, grace, latency, hi)


# ---- series_spacing ---------------------------------------------------------------------------


def test_series_spacing_doubles_on_unsettled_sends_only() -> None:
    """The doubling counts the sends the IdP may have processed: settled ones (a refused
    connection, a 503) cost nothing against its cap and do not stretch the spacing; each
    unsettled one doubles it. Half a second before the last send time, so that the budget
    spread over what is left of the window stays under the doubling."""
    now = LAST - 0.5

    def spacing(sends: int, settled: int) -> float:
        journal = series(sends=sends, settled=settled)
        return series_spacing(journal, now=now, grace_period=GRACE, latency=None, rand=0.5)

    # one unsettled send, any number of settled ones beside it: the first spacing, 0.1 s
    for settled in (0, 1, 5, 20, 100):
        assert spacing(1 + settled, settled) == pytest.approx(0.1)
    # every send settled: as after the first
    assert spacing(30, 30) == pytest.approx(0.1)
    # each unsettled send doubles it, whatever was settled beside it
    assert [spacing(n, 0) for n in range(1, 5)] == pytest.approx([0.1, 0.2, 0.4, 0.8])
    assert [spacing(n + 20, 20) for n in range(1, 5)] == pytest.approx([0.1, 0.2, 0.4, 0.8])
    # as retry_spacing on the unsettled count
    for unsettled in range(1, 5):
        assert spacing(unsettled + 7, 7) == retry_spacing(unsettled, GRACE, None, 0.5)


@settings(deadline=None)
@given(
    unsettled=st.integers(min_value=0, max_value=40),
    settled=st.integers(min_value=1, max_value=10**4),
    grace=graces,
    latency=wide_latencies,
    into=st.floats(min_value=0.0, max_value=1.0),
    rand=rands,
)
def test_series_spacing_ignores_settled_sends_and_grows_with_unsettled_ones(
    unsettled: int,
    settled: int,
    grace: float,
    latency: float | None,
    into: float,
    rand: float,
) -> None:
    now = NOW + into * (window_closes_at(NOW, grace, latency) - NOW)

    def spacing(journal: Attempt) -> float:
        return series_spacing(journal, now=now, grace_period=grace, latency=latency, rand=rand)

    plain = spacing(series(sends=unsettled, settled=0))
    assert spacing(series(sends=unsettled + settled, settled=settled)) == plain
    assert plain >= retry_spacing(max(unsettled, 1), grace, latency, rand)
    if unsettled + 1 < MAX_UNSETTLED_SENDS:  # both with budget left to spread
        assert spacing(series(sends=unsettled + 1, settled=0)) >= plain


# ---- window_missed ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("attempt", "kw", "missed"),
    [
        (series(sends=2), {}, True),
        (series(sends=2, settled=1), {}, True),  # one send may still have been processed
        (series(sends=2, settled=2), {}, False),  # every send proven unprocessed
        (None, {}, False),
        (series(sends=2), {"now": CLOSES - 0.001}, False),  # still open
        (series(sends=2), {"now": NOW + 3600.0}, True),
        (series(sends=2), {"version": 2}, False),  # another version's series
        (series(sends=2), {"usage": REUSE}, False),
        (series(sends=2), {"grace_period": 0.0}, False),
        (series(sends=2), {"latency": 2.0, "now": NOW + 23.999}, False),  # margin 6 s: open
        (series(sends=2), {"latency": 2.0, "now": NOW + 24.0}, True),  # closed at 24
    ],
)
def test_window_missed(attempt: Attempt | None, kw: dict[str, object], missed: bool) -> None:
    args: dict[str, object] = {
        "version": 1,
        "usage": ONE_TIME,
        "grace_period": GRACE,
        "latency": None,
        "now": CLOSES,
    }
    args.update(kw)
    assert window_missed(attempt, **args) is missed  # type: ignore[arg-type]


# ---- decide: one answer -------------------------------------------------------------------------


def ctx(
    *,
    now: float = INSIDE,
    usage: RefreshTokenUsage = ONE_TIME,
    grace_period: float = GRACE,
    attempt: Attempt | None = None,
    failures: int = 0,
    invalid_grant_retried: bool = False,
    latency: float | None = None,
) -> FailureContext:
    return FailureContext(
        now=now,
        usage=usage,
        grace_period=grace_period,
        attempt=attempt if attempt is not None else series(),
        failures=failures,
        invalid_grant_retried=invalid_grant_retried,
        latency=latency,
    )


def failure(kind: FailureKind, retry_after: float | None = None) -> Failure:
    return Failure(kind, kind.value, f"{kind.value} detail", retry_after=retry_after)


def assert_backoff(decision: Decision, now: float, failures: int, rand: float) -> None:
    assert isinstance(decision, Backoff)
    expected = backoff_delay(
        failures, initial=CFG.backoff_initial, maximum=CFG.backoff_max, rand=rand
    )
    assert decision.at == pytest.approx(now + expected)


def answered(kind: FailureKind, sends: int = 2, unresolved: int = 1) -> Attempt:
    """The journal as decide sees it after ``kind`` answered the last of ``sends`` sends, of
    which ``unresolved`` (earlier ones) may have been processed: an answer other than
    AMBIGUOUS proves its own send unprocessed, so the caller has settled it already."""
    unsettled = unresolved + (1 if kind is FailureKind.AMBIGUOUS else 0)
    return series(sends=sends, settled=sends - unsettled)


def unsettled_after(kind: FailureKind, unsettled: int) -> Attempt:
    """The journal after ``kind`` answered, with ``unsettled`` sends that may be processed."""
    own = 1 if kind is FailureKind.AMBIGUOUS else 0
    return answered(kind, sends=unsettled + 1 - own, unresolved=unsettled - own)


# Nothing consumed: a re-use token, no grace window, or every send of the series settled (an
# AMBIGUOUS answer leaves its own send unsettled, so with a one-time token it never is).
NOTHING_CONSUMED = [
    ("reuse", {"usage": REUSE, "attempt": series(sends=1)}),
    ("reuse-sends", {"usage": REUSE, "attempt": series(sends=3, settled=1)}),
    ("no-grace", {"grace_period": 0.0, "attempt": series(sends=1)}),
    ("one-time-settled", {"attempt": series(sends=1, settled=1)}),
    ("one-time-all-settled", {"attempt": series(sends=30, settled=30)}),
]


@pytest.mark.parametrize(
    ("kind", "where"),
    [
        pytest.param(kind, where, id=f"{kind.value}-{name}")
        for name, where in NOTHING_CONSUMED
        for kind in FailureKind
        if kind is not FailureKind.AMBIGUOUS or not name.startswith("one-time")
    ],
)
@pytest.mark.parametrize("now", [INSIDE, OUTSIDE, NOW + 3600.0])
def test_nothing_consumed_follows_the_ordinary_table(
    kind: FailureKind, where: dict[str, object], now: float
) -> None:
    decision = decide(failure(kind), ctx(now=now, failures=2, **where), CFG, 0.3)  # type: ignore[arg-type]
    if kind in (FailureKind.NOT_SENT, FailureKind.AMBIGUOUS, FailureKind.RATE_LIMITED):
        assert_backoff(decision, now, failures=3, rand=0.3)
    elif kind is FailureKind.INVALID_GRANT:
        assert decision == Invalidate(INVALID_GRANT)
    elif kind is FailureKind.CLIENT_REJECTED:
        assert decision == OpenCircuit()
    else:
        assert kind is FailureKind.OAUTH_ERROR
        # probably a configuration problem: retried rarely, so a fix is picked up
        assert decision == Backoff(at=now + CFG.backoff_max * (0.5 + 0.5 * 0.3))


def test_not_sent_backoff_grows_with_failures() -> None:
    settled = series(sends=1, settled=1)
    decision = decide(failure(FailureKind.NOT_SENT), ctx(failures=4, attempt=settled), CFG, 0.0)
    assert_backoff(decision, INSIDE, failures=5, rand=0.0)


@settings(deadline=None)
@given(rand=rands, failures=st.integers(min_value=0, max_value=100))
def test_other_oauth_errors_back_off_long(rand: float, failures: int) -> None:
    settled = series(sends=1, settled=1)
    decision = decide(
        failure(FailureKind.OAUTH_ERROR), ctx(failures=failures, attempt=settled), CFG, rand
    )
    assert isinstance(decision, Backoff)
    assert INSIDE + CFG.backoff_max / 2 <= decision.at <= INSIDE + CFG.backoff_max


@pytest.mark.parametrize("kind", list(FailureKind))
@pytest.mark.parametrize("latency", [None, 0.0, 0.3, 2.0])
@pytest.mark.parametrize("rand", [0.0, 0.5, 0.999])
def test_maybe_consumed_with_the_window_open_sends_again_spaced(
    kind: FailureKind, latency: float | None, rand: float
) -> None:
    """Any answer while an earlier send of the series may have rotated the token: the same
    token again, after the spacing, inside the window (the only way to get the new one)."""
    attempt = answered(kind)
    decision = decide(failure(kind), ctx(attempt=attempt, latency=latency), CFG, rand)
    spacing = series_spacing(attempt, now=INSIDE, grace_period=GRACE, latency=latency, rand=rand)
    assert decision == SendAgain(at=INSIDE + spacing, grace=True)
    # the doubling counts the unsettled sends, not the answer's own settled one
    assert spacing >= retry_spacing(max(attempt.unsettled, 1), GRACE, latency, rand)
    assert decision.at < window_closes_at(NOW, GRACE, latency) - LAST_SEND_LEAD


@pytest.mark.parametrize("kind", list(FailureKind))
@pytest.mark.parametrize("late", [0.0, 1e-6, 0.5, 3600.0])
@pytest.mark.parametrize("retried", [False, True])
def test_maybe_consumed_with_the_window_closed_is_a_missed_window(
    kind: FailureKind, late: float, retried: bool
) -> None:
    """The window closed with a send that may have been processed: the token is never sent
    again (a reuse outside grace revokes the family), whatever the answer said."""
    decision = decide(
        failure(kind, retry_after=1.0),
        ctx(now=OUTSIDE + late, attempt=answered(kind), invalid_grant_retried=retried),
        CFG,
        0.5,
    )
    if kind is FailureKind.INVALID_GRANT:
        assert decision == Invalidate(INVALID_GRANT_AFTER_UNRESOLVED)
    else:
        assert decision == Invalidate(GRACE_WINDOW_MISSED)


@pytest.mark.parametrize("kind", list(FailureKind))
def test_maybe_consumed_with_the_budget_spent_is_a_missed_window(kind: FailureKind) -> None:
    spent = unsettled_after(kind, MAX_UNSETTLED_SENDS)
    decision = decide(failure(kind, retry_after=1.0), ctx(attempt=spent), CFG, 0.5)
    if kind is FailureKind.INVALID_GRANT:
        assert decision == Invalidate(INVALID_GRANT_AFTER_UNRESOLVED)
    else:
        assert decision == Invalidate(GRACE_WINDOW_MISSED)


@pytest.mark.parametrize("kind", list(FailureKind))
def test_the_budget_is_max_unsettled_sends(kind: FailureKind) -> None:
    for unsettled in range(1, MAX_UNSETTLED_SENDS):
        journal = unsettled_after(kind, unsettled)
        assert journal.unsettled == unsettled
        assert isinstance(decide(failure(kind), ctx(attempt=journal), CFG, 0.5), SendAgain)
    journal = unsettled_after(kind, MAX_UNSETTLED_SENDS)
    assert isinstance(decide(failure(kind), ctx(attempt=journal), CFG, 0.5), Invalidate)


@pytest.mark.parametrize("kind", list(FailureKind))
def test_settled_sends_do_not_spend_the_budget(kind: FailureKind) -> None:
    """Sends the IdP provably did not process (refused, 429/503, 4xx) mint nothing against
    its per-user cap: 30 sends of which 25 were settled leave 5 that count."""
    journal = series(sends=30, settled=25)
    decision = decide(failure(kind), ctx(attempt=journal), CFG, 0.5)
    spacing = series_spacing(journal, now=INSIDE, grace_period=GRACE, latency=None, rand=0.5)
    assert decision == SendAgain(at=INSIDE + spacing, grace=True)
    journal = series(sends=30, settled=30 - MAX_UNSETTLED_SENDS)
    assert isinstance(decide(failure(kind), ctx(attempt=journal), CFG, 0.5), Invalidate)


def test_four_lost_answers_early_in_a_5s_window_still_get_a_fifth_send() -> None:
    """From the chaos run (docs/reliability.md): a dropped answer, a timeout, a 500 and a crash
    recovery's dropped answer in a 5 s window (Visma Connect's shortest) with most of it
    left: the fifth send starts in the window."""
    decision = decide(
        failure(FailureKind.AMBIGUOUS),
        ctx(now=NOW + 3.5, grace_period=5.0, attempt=series(sends=4)),
        CFG,
        0.5,
    )
    assert isinstance(decision, SendAgain) and decision.grace
    assert NOW + 3.5 + MIN_SPACING <= decision.at < window_closes_at(NOW, 5.0, None)


# ---- decide: Retry-After ----------------------------------------------------------------------


@pytest.mark.parametrize("retry_after", [2.0, 5.0, 20.0])
def test_retry_after_inside_the_window_is_honoured(retry_after: float) -> None:
    decision = decide(
        failure(FailureKind.RATE_LIMITED, retry_after),
        ctx(attempt=answered(FailureKind.RATE_LIMITED)),
        CFG,
        0.5,
    )
    attempt = answered(FailureKind.RATE_LIMITED)
    spacing = series_spacing(attempt, now=INSIDE, grace_period=GRACE, latency=None, rand=0.5)
    quarter = (LAST - INSIDE) / 4  # at most a quarter of what is left of the window
    expected = min(max(retry_after, spacing), max(spacing, quarter))
    assert decision == SendAgain(at=INSIDE + expected, grace=True)
    assert (retry_after <= quarter) == (expected == max(retry_after, spacing))


@pytest.mark.parametrize("retry_after", [0.0, -5.0, 0.01, 0.05])
@pytest.mark.parametrize("sends", [2, 5, 9])
def test_retry_after_is_never_sooner_than_the_spacing(retry_after: float, sends: int) -> None:
    attempt = series(sends=sends, settled=1)
    decision = decide(
        failure(FailureKind.RATE_LIMITED, retry_after), ctx(attempt=attempt), CFG, 0.2
    )
    spacing = series_spacing(attempt, now=INSIDE, grace_period=GRACE, latency=None, rand=0.2)
    assert decision == SendAgain(at=INSIDE + spacing, grace=True)
    assert decision.at - INSIDE >= MIN_SPACING - EPS


@pytest.mark.parametrize("retry_after", [28.7, 29.0, 120.0, 86400.0])
@pytest.mark.parametrize("latency", [None, 1.0])
def test_a_long_retry_after_inside_the_window_waits_a_quarter_of_what_is_left(
    retry_after: float, latency: float | None
) -> None:
    """The token's life is at stake: the IdP's Retry-After is honoured up to a quarter of
    the window left, so later sends still fit in it."""
    decision = decide(
        failure(FailureKind.RATE_LIMITED, retry_after),
        ctx(attempt=answered(FailureKind.RATE_LIMITED), latency=latency),
        CFG,
        0.5,
    )
    last = window_closes_at(NOW, GRACE, latency) - LAST_SEND_LEAD
    attempt = answered(FailureKind.RATE_LIMITED)
    spacing = series_spacing(attempt, now=INSIDE, grace_period=GRACE, latency=latency, rand=0.5)
    assert decision == SendAgain(at=INSIDE + max(spacing, (last - INSIDE) / 4), grace=True)
    assert isinstance(decision, SendAgain) and decision.at < last


def test_retry_after_with_nothing_consumed_reschedules_as_told() -> None:
    # The IdP processed nothing: no window runs, the token is as good as before. Rescheduled
    # rather than resent inside this refresh: each resend would start a new series, and a
    # short Retry-After repeated would never end.
    first = series(sends=1, settled=1)
    decision = decide(failure(FailureKind.RATE_LIMITED, 5.0), ctx(attempt=first), CFG, 0.5)
    assert decision == Backoff(at=INSIDE + 5.0)
    decision = decide(failure(FailureKind.RATE_LIMITED, 28.5), ctx(attempt=first), CFG, 0.5)
    assert decision == Backoff(at=INSIDE + 28.5)
    # bounded
    decision = decide(failure(FailureKind.RATE_LIMITED, 86400.0), ctx(attempt=first), CFG, 0.5)
    assert decision == Backoff(at=INSIDE + CFG.retry_after_max)


@pytest.mark.parametrize("now", [INSIDE, OUTSIDE])
def test_retry_after_for_a_reuse_token_waits_as_told(now: float) -> None:
    decision = decide(failure(FailureKind.RATE_LIMITED, 5.0), ctx(now=now, usage=REUSE), CFG, 0.0)
    assert decision == Backoff(at=now + 5.0)
    decision = decide(
        failure(FailureKind.RATE_LIMITED, 86400.0), ctx(now=now, usage=REUSE), CFG, 0.0
    )
    assert decision == Backoff(at=now + CFG.retry_after_max)


@pytest.mark.parametrize("retry_after", [0.0, -5.0, 0.01])
@pytest.mark.parametrize(
    "where",
    [
        pytest.param({"usage": REUSE}, id="reuse"),
        pytest.param({"grace_period": 0.0}, id="no-grace"),
        pytest.param({"attempt": series(sends=1, settled=1)}, id="one-time-first-send"),
        pytest.param({"attempt": series(sends=4, settled=4)}, id="one-time-all-settled"),
        pytest.param({"attempt": series(sends=2, settled=1)}, id="one-time-maybe-consumed"),
        pytest.param({"attempt": series(sends=9, settled=1)}, id="one-time-budget-nearly-spent"),
    ],
)
@pytest.mark.parametrize("now", [INSIDE, NOW + 20.0, OUTSIDE])
def test_retry_after_zero_is_no_tight_loop(
    retry_after: float, where: dict[str, object], now: float
) -> None:
    """A "Retry-After: 0" (or an HTTP date in the past): the token is not sent straight back.
    A send again is spaced like any other; a backoff is at least min_interval away."""
    decision = decide(
        failure(FailureKind.RATE_LIMITED, retry_after),
        ctx(now=now, **where),  # type: ignore[arg-type]
        CFG,
        0.0,
    )
    if isinstance(decision, SendAgain):
        assert decision.at - now >= MIN_SPACING - EPS
    elif isinstance(decision, Backoff):
        assert decision.at >= now + CFG.min_interval
    else:
        assert decision == Invalidate(GRACE_WINDOW_MISSED)


def test_rate_limited_without_retry_after_backs_off() -> None:
    settled = series(sends=1, settled=1)
    decision = decide(failure(FailureKind.RATE_LIMITED), ctx(failures=1, attempt=settled), CFG, 0.4)
    assert_backoff(decision, INSIDE, failures=2, rand=0.4)


# ---- decide: the end of the window ------------------------------------------------------------


@pytest.mark.parametrize("kind", list(FailureKind))
def test_a_send_planned_late_in_the_window_starts_at_the_last_send_time(
    kind: FailureKind,
) -> None:
    # 7 unsettled sends: the spacing (about 4.9 s) would take the next send past the window's
    # end (settled sends would not stretch it: see test_series_spacing_counts_unsettled_sends)
    attempt = unsettled_after(kind, 7)
    decision = decide(failure(kind), ctx(now=CLOSES - 1.0, attempt=attempt), CFG, 0.5)
    assert decision == SendAgain(at=LAST, grace=True)


@pytest.mark.parametrize("kind", [FailureKind.AMBIGUOUS, FailureKind.NOT_SENT])
@pytest.mark.parametrize("before_close", [LAST_SEND_LEAD / 2, 1e-4])
def test_no_send_is_planned_past_the_last_send_time(kind: FailureKind, before_close: float) -> None:
    """Inside the last LAST_SEND_LEAD of the window a fast failure must not be answered with
    a send at once: that is past the planned last send, and (each such send failing fast)
    an unspaced burst until the window closes."""
    now = CLOSES - before_close
    decision = decide(failure(kind), ctx(now=now, attempt=answered(kind)), CFG, 0.5)
    if isinstance(decision, SendAgain):
        assert decision.at <= LAST
        assert decision.at - now >= MIN_SPACING - EPS
    else:
        assert isinstance(decision, Invalidate)


@pytest.mark.parametrize("kind", [FailureKind.AMBIGUOUS, FailureKind.NOT_SENT])
@pytest.mark.parametrize("before_last", [0.001, 0.05])
def test_the_last_send_time_does_not_shorten_the_spacing(
    kind: FailureKind, before_last: float
) -> None:
    now = LAST - before_last
    decision = decide(failure(kind), ctx(now=now, attempt=answered(kind)), CFG, 0.5)
    if isinstance(decision, SendAgain):
        assert decision.at <= LAST
        assert decision.at - now >= MIN_SPACING - EPS
    else:
        assert isinstance(decision, Invalidate)


def test_fast_failures_at_the_end_of_the_window_are_no_burst() -> None:
    """One send that may have rotated the token, then connection refusals answering in a
    millisecond from just before the last send time on: a few sends, not one per ms."""
    now = LAST - 0.01
    journal = series(sends=2, settled=1)
    sends = 2
    while sends < 100:
        decision = decide(failure(FailureKind.NOT_SENT), ctx(now=now, attempt=journal), CFG, 0.5)
        if not isinstance(decision, SendAgain):
            break
        now = decision.at + 0.001  # sent, refused at once
        sends += 1
        journal = series(sends=sends, settled=sends - 1)
    assert decision == Invalidate(GRACE_WINDOW_MISSED)
    assert sends <= 3


# ---- decide: invalid_grant --------------------------------------------------------------------


@pytest.mark.parametrize("usage", [ONE_TIME, REUSE])
@pytest.mark.parametrize("now", [INSIDE, OUTSIDE])
@pytest.mark.parametrize("retried", [False, True])
def test_invalid_grant_on_a_first_send_invalidates(
    usage: RefreshTokenUsage, now: float, retried: bool
) -> None:
    decision = decide(
        failure(FailureKind.INVALID_GRANT),
        ctx(
            now=now,
            usage=usage,
            attempt=series(sends=1, settled=1),  # the refusal proves its send unprocessed
            invalid_grant_retried=retried,
        ),
        CFG,
        0.5,
    )
    assert decision == Invalidate(INVALID_GRANT)


def test_invalid_grant_after_an_unresolved_send_retries_once_inside_grace() -> None:
    earlier = series(sends=2, settled=1)  # an earlier send of this series went unanswered
    first = decide(failure(FailureKind.INVALID_GRANT), ctx(attempt=earlier), CFG, 0.5)
    spacing = series_spacing(
        series(sends=2, settled=1), now=INSIDE, grace_period=GRACE, latency=None, rand=0.5
    )
    assert first == SendAgain(at=INSIDE + spacing, grace=True)
    second = decide(
        failure(FailureKind.INVALID_GRANT),
        ctx(now=INSIDE + 0.5, attempt=series(sends=3, settled=2), invalid_grant_retried=True),
        CFG,
        0.5,
    )
    assert second == Invalidate(INVALID_GRANT_AFTER_UNRESOLVED)
    # also when the budget would still allow another send
    second = decide(
        failure(FailureKind.INVALID_GRANT),
        ctx(attempt=earlier, invalid_grant_retried=True),
        CFG,
        0.5,
    )
    assert second == Invalidate(INVALID_GRANT_AFTER_UNRESOLVED)


def test_client_rejected_after_an_unresolved_send_keeps_sending_inside_the_window() -> None:
    """Our credentials refused while an earlier send may have rotated the token: pausing the
    provider would let the window close on it. The same token again, spaced; the circuit
    opens when nothing was consumed."""
    decision = decide(
        failure(FailureKind.CLIENT_REJECTED), ctx(attempt=series(sends=2, settled=1)), CFG, 0.5
    )
    assert isinstance(decision, SendAgain) and decision.grace
    first = ctx(attempt=series(sends=1, settled=1))
    assert decide(failure(FailureKind.CLIENT_REJECTED), first, CFG, 0.5) == OpenCircuit()


# ---- decide: properties of one answer -----------------------------------------------------------

kinds = st.sampled_from(list(FailureKind))
retry_afters = st.none() | st.floats(min_value=-10.0, max_value=100_000.0)


@st.composite
def journals(draw: st.DrawFn) -> Attempt:
    sends = draw(st.integers(min_value=1, max_value=40))
    settled = draw(st.integers(min_value=0, max_value=sends))
    return series(sends=sends, settled=settled)


@settings(deadline=None)
@given(
    kind=kinds,
    retry_after=retry_afters,
    usage=st.sampled_from(list(RefreshTokenUsage)),
    grace=st.floats(min_value=0.0, max_value=3600.0),
    journal=journals(),
    latency=wide_latencies,
    late=st.floats(min_value=0.0, max_value=1e6),
    failures=st.integers(min_value=0, max_value=1000),
    retried=st.booleans(),
    rand=rands,
)
def test_no_send_again_once_the_window_has_closed(
    kind: FailureKind,
    retry_after: float | None,
    usage: RefreshTokenUsage,
    grace: float,
    journal: Attempt,
    latency: float | None,
    late: float,
    failures: int,
    retried: bool,
    rand: float,
) -> None:
    now = window_closes_at(NOW, grace, latency) + late
    decision = decide(
        failure(kind, retry_after),
        ctx(
            now=now,
            usage=usage,
            grace_period=grace,
            attempt=journal,
            failures=failures,
            invalid_grant_retried=retried,
            latency=latency,
        ),
        CFG,
        rand,
    )
    assert not isinstance(decision, SendAgain)
    if usage is ONE_TIME and grace > 0 and journal.unsettled > 0:
        assert decision in (
            Invalidate(GRACE_WINDOW_MISSED),
            Invalidate(INVALID_GRANT_AFTER_UNRESOLVED),
        )
    if isinstance(decision, Backoff):
        assert decision.at >= now


@settings(deadline=None)
@given(
    kind=kinds,
    retry_after=retry_afters,
    grace=st.floats(min_value=0.5, max_value=3600.0),
    journal=journals(),
    latency=wide_latencies,
    into=st.floats(min_value=0.0, max_value=1.0, exclude_max=True),
    retried=st.booleans(),
    rand=rands,
)
def test_a_grace_send_is_planned_inside_the_window(
    kind: FailureKind,
    retry_after: float | None,
    grace: float,
    journal: Attempt,
    latency: float | None,
    into: float,
    retried: bool,
    rand: float,
) -> None:
    closes_at = window_closes_at(NOW, grace, latency)
    now = NOW + into * (closes_at - NOW)
    decision = decide(
        failure(kind, retry_after),
        ctx(
            now=now,
            grace_period=grace,
            attempt=journal,
            invalid_grant_retried=retried,
            latency=latency,
        ),
        CFG,
        rand,
    )
    if isinstance(decision, SendAgain):
        assert now <= decision.at < closes_at
        if decision.grace:
            assert journal.unsettled > 0
            assert decision.at <= max(now, closes_at - LAST_SEND_LEAD)
    if journal.unsettled == 0:
        assert not isinstance(decision, SendAgain) or not decision.grace
        assert decision != Invalidate(GRACE_WINDOW_MISSED)


@settings(deadline=None)
@given(
    kind=kinds,
    retry_after=retry_afters,
    journal=journals(),
    offset=st.floats(min_value=0.0, max_value=100.0),
    rand=rands,
)
def test_reuse_tokens_never_send_again(
    kind: FailureKind, retry_after: float | None, journal: Attempt, offset: float, rand: float
) -> None:
    """A re-use token is not spent by a send: every failure is an ordinary one, never a missed
    window and never a send inside this refresh."""
    decision = decide(
        failure(kind, retry_after),
        ctx(now=NOW + offset, usage=REUSE, attempt=journal),
        CFG,
        rand,
    )
    assert not isinstance(decision, SendAgain)
    assert decision != Invalidate(GRACE_WINDOW_MISSED)


# ---- decide: properties of a whole series, driven the way the refresher does ------------------


@dataclass(frozen=True)
class Answer:
    kind: FailureKind | None  # None: a grant
    took: float  # seconds from the send to its answer
    retry_after: float | None
    rand: float  # decide's randomness for this answer


@dataclass(frozen=True)
class Sent:
    at: float
    started_at: float  # the start of the series it was journaled in
    goes_on: bool  # journaled into a series with an unsettled send: relies on its window
    cause: str  # "first", "hedge" or "again" (a SendAgain)


@dataclass
class Run:
    sent: list[Sent] = field(default_factory=list)
    decided: list[tuple[FailureContext, Failure, Decision]] = field(default_factory=list)
    most_unsettled: int = 0
    most_in_flight: int = 0
    invalid_grants: int = 0
    attempt: Attempt | None = None
    # "grant", "refused" (begin_attempt refused, nothing unsettled), or the final decision;
    # None: no end within MAX_SIM_SENDS sends.
    end: Decision | str | None = None


MAX_SIM_SENDS = 500  # far more than any series that ends can make (about 10 + 2 per window)


def run_series(
    grace: float, latency: float | None, answers: list[Answer], *, max_sends: int = MAX_SIM_SENDS
) -> Run:
    """refresh.series.Series.run for one refresh of a one-time token, on a simulated clock.

    Each send is journaled by store.begin_attempt's rules (a series with an unsettled send
    goes on while started_at >= keep_series_since(now), is refused after that; otherwise a
    new series starts), gets the next answer of ``answers`` after its ``took`` (the IdP
    answers as listed, then like the last one for good);
    answers other than AMBIGUOUS settle their send; a send unanswered for hedge_after gets a
    hedge (at most MAX_SENDS_IN_FLIGHT out, none past the last send time, none with the
    budget spent, none once no send is out); decide plans the next send; a final decision
    waits until no send is out.
    """
    run = Run()
    now = NOW
    next_send_at: float | None = NOW
    cause = "first"
    refused = False
    pending: Decision | None = None
    retried = False
    out: list[tuple[float, int, Attempt, Answer]] = []  # (answered at, order, journal, answer)

    def hedge_at(at: float, attempt: Attempt) -> float | None:
        if attempt.unsettled >= MAX_UNSETTLED_SENDS:
            return None
        last = window_closes_at(attempt.started_at, grace, latency) - LAST_SEND_LEAD
        return None if at >= last else min(at + hedge_after(grace, latency), last)

    while True:
        may_send = not refused and next_send_at is not None and len(out) < MAX_SENDS_IN_FLIGHT
        if may_send and next_send_at is not None and now >= next_send_at:
            if len(run.sent) >= max_sends:
                return run
            attempt = run.attempt
            if attempt is not None and attempt.unsettled > 0:
                keep_since = keep_series_since(now, grace, latency)
                assert keep_since is not None
                if attempt.started_at < keep_since:
                    refused, next_send_at = True, None  # a missed window: nothing is sent
                    continue
                attempt = replace(attempt, sends=attempt.sends + 1)
                goes_on = True
            else:
                attempt = Attempt(version=1, started_at=now, owner="sim", sends=1)
                goes_on = False
            run.attempt = attempt
            answer = answers[min(len(run.sent), len(answers) - 1)]
            run.sent.append(Sent(now, attempt.started_at, goes_on, cause))
            heapq.heappush(out, (now + answer.took, len(run.sent), attempt, answer))
            run.most_unsettled = max(run.most_unsettled, attempt.unsettled)
            run.most_in_flight = max(run.most_in_flight, len(out))
            next_send_at, cause = hedge_at(now, attempt), "hedge"
            continue
        if not out:
            if refused:
                missed = window_missed(
                    run.attempt,
                    version=1,
                    usage=ONE_TIME,
                    grace_period=grace,
                    latency=latency,
                    now=now,
                )
                run.end = Invalidate(GRACE_WINDOW_MISSED) if missed else "refused"
                return run
            if pending is not None:
                run.end = pending
                return run
            assert next_send_at is not None, "a series with nothing out and nothing planned"
            now = max(now, next_send_at)
            continue
        if may_send and next_send_at is not None and next_send_at < out[0][0]:
            now = next_send_at
            continue
        answered_at, _, sent_under, answer = heapq.heappop(out)
        now = max(now, answered_at)
        if not out and cause == "hedge":
            # A hedge races the sends out; with none out, only decide's plan stands.
            next_send_at = None
        if answer.kind is None:
            run.end = "grant"
            return run
        attempt = run.attempt
        assert attempt is not None
        if answer.kind is not FailureKind.AMBIGUOUS and attempt.started_at == sent_under.started_at:
            attempt = replace(attempt, settled=min(attempt.settled + 1, attempt.sends))
            run.attempt = attempt
        if answer.kind is FailureKind.INVALID_GRANT:
            run.invalid_grants += 1
        answer_failure = failure(answer.kind, answer.retry_after)
        context = ctx(
            now=now,
            grace_period=grace,
            attempt=attempt,
            invalid_grant_retried=retried,
            latency=latency,
        )
        decision = decide(answer_failure, context, CFG, answer.rand)
        run.decided.append((context, answer_failure, decision))
        if isinstance(decision, SendAgain):
            if answer.kind is FailureKind.INVALID_GRANT:
                retried = True
            if next_send_at is None or decision.at < next_send_at:
                next_send_at, cause = decision.at, "again"
            pending = None
        else:
            pending, next_send_at = decision, None


answer_kinds = st.sampled_from([*FailureKind, *FailureKind, *FailureKind, None])
tooks = st.just(0.0) | st.floats(min_value=0.0, max_value=2.0) | st.floats(0.0, 12.0)
answers_lists = st.lists(
    st.builds(
        Answer,
        kind=answer_kinds,
        took=tooks,
        retry_after=st.none() | st.just(0.0) | st.floats(min_value=0.0, max_value=120.0),
        rand=rands,
    ),
    min_size=1,
    max_size=16,
)
series_graces = st.floats(min_value=1.0, max_value=60.0)


@settings(deadline=None)
@given(grace=series_graces, latency=latencies, answers=answers_lists)
def test_series_every_send_starts_before_the_window_closes(
    grace: float, latency: float | None, answers: list[Answer]
) -> None:
    run = run_series(grace, latency, answers)
    for sent in run.sent:
        if sent.goes_on:
            # counted from our first send (the IdP counts from later: its first processing)
            assert sent.at < sent.started_at + grace
            assert sent.at <= window_closes_at(sent.started_at, grace, latency)
    for context, _, decision in run.decided:
        if isinstance(decision, SendAgain) and decision.grace:
            assert context.attempt is not None
            assert context.now <= decision.at
            assert decision.at < window_closes_at(context.attempt.started_at, grace, latency)


@settings(deadline=None)
@given(grace=series_graces, latency=latencies, answers=answers_lists)
def test_series_spends_at_most_the_budget_of_unsettled_sends(
    grace: float, latency: float | None, answers: list[Answer]
) -> None:
    run = run_series(grace, latency, answers)
    assert run.most_unsettled <= MAX_UNSETTLED_SENDS
    assert run.most_in_flight <= MAX_SENDS_IN_FLIGHT
    retries_after_invalid_grant = [
        d
        for _, f, d in run.decided
        if f.kind is FailureKind.INVALID_GRANT and isinstance(d, SendAgain)
    ]
    assert len(retries_after_invalid_grant) <= 1


# An IdP that rotated on the first send, then answers 500 at once: the send after the one
# planned at the last send time must not follow it in less than the spacing.
FAST_500S = [Answer(FailureKind.AMBIGUOUS, 0.0, None, 0.0)]
# One send that may have rotated, then refusals at once until the window closes.
REFUSED_AFTER_A_ROTATION = [
    Answer(FailureKind.AMBIGUOUS, 0.0, None, 0.0),
    Answer(FailureKind.NOT_SENT, 0.0, None, 0.0),
]
# A first send answered 429 "Retry-After: 0" (nothing consumed), and every one after it.
RETRY_AFTER_ZERO = [Answer(FailureKind.RATE_LIMITED, 0.0, 0.0, 0.5)]
# The same with a short Retry-After: each resend starts a series (and a window) of its own.
RETRY_AFTER_TWO = [Answer(FailureKind.RATE_LIMITED, 0.0, 2.0, 0.5)]


@settings(deadline=None)
@given(grace=series_graces, latency=latencies, answers=answers_lists)
@example(grace=1.0, latency=None, answers=FAST_500S)
@example(grace=30.0, latency=None, answers=RETRY_AFTER_ZERO)
def test_series_spaces_the_send_after_a_fast_failure(
    grace: float, latency: float | None, answers: list[Answer]
) -> None:
    run = run_series(grace, latency, answers)
    for context, _, decision in run.decided:
        if isinstance(decision, SendAgain):
            assert decision.at - context.now >= MIN_SPACING - EPS, (context, decision)
    for previous, sent in itertools.pairwise(run.sent):
        if sent.cause == "again":
            assert sent.at - previous.at >= MIN_SPACING - EPS, (previous, sent)


@settings(deadline=None)
@given(grace=series_graces, latency=latencies, answers=answers_lists)
@example(grace=1.0, latency=None, answers=REFUSED_AFTER_A_ROTATION)
@example(grace=30.0, latency=None, answers=RETRY_AFTER_ZERO)
@example(grace=60.0, latency=None, answers=RETRY_AFTER_TWO)
def test_series_ends_and_names_a_missed_window(
    grace: float, latency: float | None, answers: list[Answer]
) -> None:
    run = run_series(grace, latency, answers)
    ended = run.end is not None  # else: still sending after MAX_SIM_SENDS sends
    assert ended
    if run.end == "grant":
        return
    assert run.attempt is not None
    if run.attempt.unsettled > 0:
        # A send may have been processed and no grant came: named as refresherd's loss.
        allowed = [Invalidate(GRACE_WINDOW_MISSED)]
        if run.invalid_grants:
            allowed.append(Invalidate(INVALID_GRANT_AFTER_UNRESOLVED))
        assert run.end in allowed
    else:
        assert run.end != Invalidate(GRACE_WINDOW_MISSED)
        assert run.end != Invalidate(INVALID_GRANT_AFTER_UNRESOLVED)
    last = run.sent[-1]
    if last.goes_on:
        assert last.at < last.started_at + grace


instant_kinds = st.sampled_from(
    [
        FailureKind.AMBIGUOUS,
        FailureKind.NOT_SENT,
        FailureKind.RATE_LIMITED,
        FailureKind.OAUTH_ERROR,
        FailureKind.CLIENT_REJECTED,
    ]
)


@settings(deadline=None)
@given(
    latency=latencies,
    rest=st.lists(st.tuples(instant_kinds, rands), min_size=1, max_size=16),
    first_rand=rands,
)
def test_series_uses_a_5s_window_not_a_burst(
    latency: float | None, rest: list[tuple[FailureKind, float]], first_rand: float
) -> None:
    """Visma Connect's shortest window and an IdP that rotated on the first send, then fails
    every send in no time (500s, refusals, 429s without Retry-After, 4xx): at least six sends,
    spread over the window."""
    answers = [Answer(FailureKind.AMBIGUOUS, 0.0, None, first_rand)]
    answers += [Answer(kind, 0.0, None, rand) for kind, rand in rest]
    run = run_series(5.0, latency, answers)
    assert len(run.sent) >= 6
    closes_at = window_closes_at(NOW, 5.0, latency)
    assert all(sent.started_at == NOW for sent in run.sent)  # one series
    assert run.sent[-1].at - NOW >= (closes_at - NOW) / 2


# ---- circuit_delay ---------------------------------------------------------------------------


def test_circuit_delay_grows_and_caps() -> None:
    delays = [circuit_delay(n, CFG, 0.0) for n in range(1, 12)]
    assert delays[0] == CFG.circuit_backoff_initial / 2
    assert delays == sorted(delays)
    assert delays[1] == 2 * delays[0]
    assert delays[-1] == CFG.circuit_backoff_max / 2
    assert circuit_delay(10**9, CFG, 0.999999) <= CFG.circuit_backoff_max


@settings(deadline=None)
@given(o1=st.integers(0, 10**9), o2=st.integers(0, 10**9), rand=rands)
def test_circuit_delay_monotone_and_bounded(o1: int, o2: int, rand: float) -> None:
    lo, hi = sorted((o1, o2))
    assert circuit_delay(lo, CFG, rand) <= circuit_delay(hi, CFG, rand) <= CFG.circuit_backoff_max
    assert circuit_delay(lo, CFG, rand) >= CFG.circuit_backoff_initial / 2


def test_hook_retry_backs_off_exponentially_and_gives_up_after_the_horizon() -> None:
    common = {"created_at": 1000.0, "initial": 1.0, "maximum": 60.0, "give_up_after": 300.0}
    delays = [
        policy.hook_retry_at(attempts=n, now=1000.0, rand=1.0, **common) - 1000.0  # type: ignore[operator]
        for n in range(1, 9)
    ]
    assert delays == [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 60.0, 60.0]
    # Equal jitter: never below half the step.
    assert policy.hook_retry_at(attempts=3, now=1000.0, rand=0.0, **common) == 1002.0
    # Past the horizon: give up.
    assert policy.hook_retry_at(attempts=9, now=1250.0, rand=1.0, **common) is None
    assert policy.hook_retry_at(attempts=9, now=1240.0, rand=1.0, **common) == 1300.0


def _stored(**kw: object) -> TokenSet:
    fields: dict[str, object] = {
        "id": "ts",
        "provider": "p",
        "refresh_token": Secret("rt"),
        "access_token": Secret("at"),
        "expires_at": NOW + 3600,
        "state": State.ACTIVE,
        "version": 1,
        "next_refresh_at": NOW + 2880,
        "created_at": NOW - 10,
        "updated_at": NOW - 10,
    }
    fields.update(kw)
    return TokenSet(**fields)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("stored", "expected"),
    [
        (_stored(), policy.Serve()),
        # Inside the margin: the stored plan says due, the API refreshes as the scheduler would.
        (_stored(next_refresh_at=NOW - 1), policy.RefreshFirst()),
        (_stored(expires_at=NOW - 1, next_refresh_at=NOW + 5), policy.RefreshFirst()),
        (_stored(access_token=None, expires_at=None, next_refresh_at=NOW), policy.RefreshFirst()),
        # Failing and backing off: a still valid token is served, an expired one is not, and
        # the IdP is not hammered before the planned retry.
        (_stored(state=State.FAILING, next_refresh_at=NOW + 30), policy.Serve()),
        (
            _stored(state=State.FAILING, expires_at=NOW - 1, next_refresh_at=NOW + 30),
            policy.Unavailable(NOW + 30),
        ),
        (_stored(state=State.FAILING, next_refresh_at=NOW - 1), policy.RefreshFirst()),
        (
            _stored(state=State.INVALIDATED, invalid_reason="invalid_grant"),
            policy.NeedsAuthorization("invalid_grant"),
        ),
    ],
)
def test_access_decision(stored: TokenSet, expected: policy.AccessDecision) -> None:
    assert policy.access_decision(stored, now=NOW) == expected
