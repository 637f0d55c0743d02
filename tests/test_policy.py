"""Every pure decision in refresherd.policy: when to refresh, how long to wait, what failed."""

from __future__ import annotations

import math
import sys
from dataclasses import replace

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from refresherd import policy
from refresherd.config import ScheduleConfig
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
    MAX_GRACE_SENDS,
    MIN_ATTEMPT_TIMEOUT,
    Backoff,
    Decision,
    FailureContext,
    Invalidate,
    OpenCircuit,
    RetryNow,
    attempt_budget,
    attempt_timeout,
    backoff_delay,
    circuit_delay,
    decide,
    grace_deadline,
    grace_safety,
    plan_next_refresh,
)

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


# ---- attempt_timeout -------------------------------------------------------------------------


def series(sends: int = 1, started_at: float = NOW, version: int = 1) -> Attempt:
    return Attempt(version=version, started_at=started_at, owner="owner-1", sends=sends)


@settings(deadline=None)
@given(
    grace=graces,
    request_timeout=st.floats(min_value=0.5, max_value=120.0),
    started=nows,
)
def test_first_attempt_leaves_room_for_a_retry_inside_grace(
    grace: float, request_timeout: float, started: float
) -> None:
    first = series(sends=1, started_at=started)
    timeout = attempt_timeout(
        usage=ONE_TIME,
        grace_period=grace,
        request_timeout=request_timeout,
        now=started,
        attempt=first,
    )
    deadline = grace_deadline(first, grace)
    assert deadline == started + grace - grace_safety(grace)
    assert 0 < timeout <= request_timeout
    if attempt_budget(deadline - started) >= MIN_ATTEMPT_TIMEOUT:
        # A window wide enough to split: the retry after a timeout still starts in it.
        assert started + timeout < deadline
    else:
        # Too narrow to be worth splitting: the attempt gets its full time.
        assert timeout == request_timeout


@settings(deadline=None)
@given(
    grace=st.floats(min_value=0.5, max_value=120.0),
    request_timeout=st.floats(min_value=0.5, max_value=60.0),
    spent=st.lists(st.floats(min_value=0.0, max_value=1.0), min_size=MAX_GRACE_SENDS),
)
@example(grace=15.0, request_timeout=10.0, spent=[0.0] * MAX_GRACE_SENDS)
@example(grace=60.0, request_timeout=30.0, spent=[0.0] * MAX_GRACE_SENDS)
def test_every_non_final_attempt_leaves_room_for_the_next_one(
    grace: float, request_timeout: float, spent: list[float]
) -> None:
    """A series where every send times out: each send that decide() would follow with another
    one inside the window gets a timeout that lets the next send start inside the window."""
    deadline = NOW + grace - grace_safety(grace)
    now = NOW
    for sends in range(1, MAX_GRACE_SENDS + 1):
        current = series(sends=sends)
        timeout = attempt_timeout(
            usage=ONE_TIME,
            grace_period=grace,
            request_timeout=request_timeout,
            now=now,
            attempt=current,
        )
        assert 0 < timeout <= request_timeout
        if sends == MAX_GRACE_SENDS:
            assert timeout == request_timeout  # the last attempt gets all its time
            break
        if attempt_budget(deadline - now) < MIN_ATTEMPT_TIMEOUT:
            assert timeout == request_timeout
            break
        now += timeout
        assert now < deadline
        decision = decide(
            Failure(FailureKind.AMBIGUOUS, "timeout", "timed out"),
            ctx(now=now, attempt=current, grace_period=grace),
            CFG,
            0.5,
        )
        assert isinstance(decision, RetryNow)
        # some of the time before the retry is spent elsewhere (journal commit, scheduling)
        now += spent[sends - 1] * (deadline - now) / 4


def test_attempt_timeouts_concrete_15_second_grace() -> None:
    # grace 15 s, safety 1 s: the window for starting sends closes at NOW + 14
    def timeout(sends: int, now: float) -> float:
        return attempt_timeout(
            usage=ONE_TIME,
            grace_period=15.0,
            request_timeout=10.0,
            now=now,
            attempt=series(sends=sends),
        )

    assert timeout(1, NOW) == 10.0  # 13 s of the 14 s left would do; the request timeout is less
    assert timeout(2, NOW + 10.0) == 3.0  # 4 s left, 1 s kept to start the third send
    assert timeout(3, NOW + 13.0) == 10.0  # the last send gets the full request timeout


def test_a_slow_idp_is_not_abandoned_early_in_a_short_window() -> None:
    # Visma Connect's shortest grace, 5 s: window 4 s. The first attempt waits 3 s (not 2 s),
    # and the one retry a timeout leaves room for still starts a second before the deadline.
    first = attempt_timeout(
        usage=ONE_TIME, grace_period=5.0, request_timeout=10.0, now=NOW, attempt=series()
    )
    assert first == 3.0
    second = attempt_timeout(
        usage=ONE_TIME,
        grace_period=5.0,
        request_timeout=10.0,
        now=NOW + 3.0,
        attempt=series(sends=2),
    )
    assert second == 10.0


def test_reuse_and_no_grace_get_the_request_timeout() -> None:
    for usage, grace, att in [
        (REUSE, 30.0, series()),
        (ONE_TIME, 0.0, series()),
        (ONE_TIME, 30.0, None),
    ]:
        assert (
            attempt_timeout(
                usage=usage, grace_period=grace, request_timeout=10.0, now=NOW, attempt=att
            )
            == 10.0
        )


def test_last_attempt_gets_the_request_timeout() -> None:
    last = series(sends=MAX_GRACE_SENDS)
    assert (
        attempt_timeout(
            usage=ONE_TIME, grace_period=60.0, request_timeout=10.0, now=NOW, attempt=last
        )
        == 10.0
    )


def test_narrow_window_gets_the_request_timeout() -> None:
    # grace 1.5 s: safety 0.3 s, window 1.2 s, budget 0.9 s < MIN_ATTEMPT_TIMEOUT
    assert (
        attempt_timeout(
            usage=ONE_TIME, grace_period=1.5, request_timeout=10.0, now=NOW, attempt=series()
        )
        == 10.0
    )


def test_grace_safety_and_deadline() -> None:
    assert grace_safety(60.0) == 1.0
    assert grace_safety(5.0) == 1.0
    assert grace_safety(2.0) == pytest.approx(0.4)
    assert grace_deadline(None, 60.0) is None
    assert grace_deadline(series(), 0.0) is None
    assert grace_deadline(series(started_at=100.0), 30.0) == 129.0


# ---- decide ----------------------------------------------------------------------------------


def ctx(
    *,
    now: float = NOW + 1.0,
    usage: RefreshTokenUsage = ONE_TIME,
    grace_period: float = 30.0,
    attempt: Attempt | None = None,
    failures: int = 0,
    invalid_grant_retried: bool = False,
) -> FailureContext:
    return FailureContext(
        now=now,
        usage=usage,
        grace_period=grace_period,
        attempt=attempt if attempt is not None else series(),
        failures=failures,
        invalid_grant_retried=invalid_grant_retried,
    )


def failure(kind: FailureKind, retry_after: float | None = None) -> Failure:
    return Failure(kind, kind.value, f"{kind.value} detail", retry_after=retry_after)


INSIDE = NOW + 1.0  # the series started at NOW, grace 30 s: window open until NOW + 29
OUTSIDE = NOW + 29.0


def assert_backoff(decision: Decision, now: float, failures: int, rand: float) -> None:
    assert isinstance(decision, Backoff)
    expected = backoff_delay(
        failures, initial=CFG.backoff_initial, maximum=CFG.backoff_max, rand=rand
    )
    assert decision.at == pytest.approx(now + expected)


@pytest.mark.parametrize("usage", [ONE_TIME, REUSE])
@pytest.mark.parametrize("now", [INSIDE, OUTSIDE])
def test_not_sent_backs_off_with_the_same_token(usage: RefreshTokenUsage, now: float) -> None:
    decision = decide(failure(FailureKind.NOT_SENT), ctx(now=now, usage=usage), CFG, 0.3)
    assert_backoff(decision, now, failures=1, rand=0.3)


def test_not_sent_backoff_grows_with_failures() -> None:
    decision = decide(failure(FailureKind.NOT_SENT), ctx(failures=4), CFG, 0.0)
    assert_backoff(decision, INSIDE, failures=5, rand=0.0)


def test_not_sent_after_an_ambiguous_send_retries_soon_inside_grace() -> None:
    # The window of the earlier (possibly consumed) send is still open: try again soon.
    decision = decide(failure(FailureKind.NOT_SENT), ctx(attempt=series(sends=2)), CFG, 0.3)
    assert isinstance(decision, RetryNow) and decision.grace
    assert 0 < decision.delay <= 0.5
    # ... and the retry starts inside the window even when it is nearly closed
    late = NOW + 28.9
    decision = decide(
        failure(FailureKind.NOT_SENT), ctx(now=late, attempt=series(sends=2)), CFG, 0.3
    )
    assert isinstance(decision, RetryNow)
    assert late + decision.delay < NOW + 29.0


def test_ambiguous_one_time_inside_grace_retries_at_once() -> None:
    decision = decide(failure(FailureKind.AMBIGUOUS), ctx(now=INSIDE), CFG, 0.3)
    assert decision == RetryNow(delay=0.0, grace=True)


def test_ambiguous_one_time_outside_grace_backs_off() -> None:
    for now in (OUTSIDE, NOW + 31.0, NOW + 3600.0):
        decision = decide(failure(FailureKind.AMBIGUOUS), ctx(now=now, failures=2), CFG, 0.7)
        assert_backoff(decision, now, failures=3, rand=0.7)


def test_ambiguous_one_time_without_grace_period_backs_off() -> None:
    decision = decide(failure(FailureKind.AMBIGUOUS), ctx(grace_period=0.0), CFG, 0.1)
    assert_backoff(decision, INSIDE, failures=1, rand=0.1)


def test_ambiguous_reuse_backs_off() -> None:
    decision = decide(failure(FailureKind.AMBIGUOUS), ctx(usage=REUSE), CFG, 0.1)
    assert_backoff(decision, INSIDE, failures=1, rand=0.1)


def test_four_lost_answers_early_in_a_5s_window_still_get_a_fifth_send() -> None:
    """From the chaos run (docs/reliability.md): a dropped answer, a timeout, a 500 and a crash
    recovery's dropped answer used up a budget of three sends while a 5 s window (Visma
    Connect's shortest) was still open; the next send, a new series outside the window, met
    invalid_grant and the token set was lost. With sends left, the fifth starts in the window."""
    decision = decide(
        failure(FailureKind.AMBIGUOUS),
        ctx(now=NOW + 3.5, grace_period=5.0, attempt=series(sends=4)),
        CFG,
        0.5,
    )
    assert decision == RetryNow(delay=0.0, grace=True)


def test_ambiguous_grace_budget_is_max_grace_sends() -> None:
    for sends in range(1, MAX_GRACE_SENDS):
        decision = decide(failure(FailureKind.AMBIGUOUS), ctx(attempt=series(sends=sends)), CFG, 0)
        assert isinstance(decision, RetryNow)
    decision = decide(
        failure(FailureKind.AMBIGUOUS), ctx(attempt=series(sends=MAX_GRACE_SENDS)), CFG, 0.0
    )
    assert isinstance(decision, Backoff)


def test_rate_limited_outside_grace_waits_as_told() -> None:
    decision = decide(failure(FailureKind.RATE_LIMITED, retry_after=42.0), ctx(now=OUTSIDE), CFG, 0)
    assert decision == Backoff(at=OUTSIDE + 42.0)


def test_rate_limited_wait_is_bounded() -> None:
    decision = decide(failure(FailureKind.RATE_LIMITED, retry_after=86400.0), ctx(), CFG, 0.0)
    assert decision == Backoff(at=INSIDE + CFG.retry_after_max)


@pytest.mark.parametrize("retry_after", [0.0, -5.0, 0.01])
def test_rate_limited_with_zero_retry_after_does_not_spin(retry_after: float) -> None:
    # "Retry-After: 0" (or an HTTP date in the past) outside grace: not a tight loop.
    decision = decide(
        failure(FailureKind.RATE_LIMITED, retry_after=retry_after),
        ctx(now=OUTSIDE, usage=REUSE),
        CFG,
        0.0,
    )
    assert isinstance(decision, Backoff)
    assert decision.at >= OUTSIDE + CFG.min_interval


def test_rate_limited_inside_grace_retries_when_it_fits() -> None:
    # first send: the IdP processed nothing, so this is a plain resend, not a grace retry
    decision = decide(failure(FailureKind.RATE_LIMITED, retry_after=5.0), ctx(now=INSIDE), CFG, 0)
    assert decision == RetryNow(delay=5.0, grace=False)
    # after an ambiguous send the window is what makes the resend safe
    decision = decide(
        failure(FailureKind.RATE_LIMITED, retry_after=5.0),
        ctx(now=INSIDE, attempt=series(sends=2)),
        CFG,
        0,
    )
    assert decision == RetryNow(delay=5.0, grace=True)
    # does not fit: the window (until NOW + 29) would close before the wait is over
    decision = decide(failure(FailureKind.RATE_LIMITED, retry_after=28.0), ctx(now=INSIDE), CFG, 0)
    assert decision == Backoff(at=INSIDE + 28.0)


def test_rate_limited_reuse_waits_as_told() -> None:
    decision = decide(
        failure(FailureKind.RATE_LIMITED, retry_after=5.0), ctx(usage=REUSE), CFG, 0.0
    )
    assert decision == Backoff(at=INSIDE + 5.0)


def test_rate_limited_without_retry_after_backs_off() -> None:
    decision = decide(failure(FailureKind.RATE_LIMITED), ctx(failures=1), CFG, 0.4)
    assert_backoff(decision, INSIDE, failures=2, rand=0.4)


@pytest.mark.parametrize("usage", [ONE_TIME, REUSE])
@pytest.mark.parametrize("now", [INSIDE, OUTSIDE])
@pytest.mark.parametrize("retried", [False, True])
def test_invalid_grant_on_a_first_send_invalidates(
    usage: RefreshTokenUsage, now: float, retried: bool
) -> None:
    decision = decide(
        failure(FailureKind.INVALID_GRANT),
        ctx(now=now, usage=usage, attempt=series(sends=1), invalid_grant_retried=retried),
        CFG,
        0.5,
    )
    assert decision == Invalidate("invalid_grant")


def test_invalid_grant_after_an_unresolved_send_retries_once_inside_grace() -> None:
    earlier = series(sends=2)  # an earlier send of this series went unanswered
    first = decide(failure(FailureKind.INVALID_GRANT), ctx(attempt=earlier), CFG, 0.5)
    assert first == RetryNow(delay=0.0, grace=True)
    second = decide(
        failure(FailureKind.INVALID_GRANT),
        ctx(now=INSIDE + 0.1, attempt=series(sends=3), invalid_grant_retried=True),
        CFG,
        0.5,
    )
    assert second == Invalidate("invalid_grant_after_unresolved_attempt")
    # also when the budget of sends would still allow another
    second = decide(
        failure(FailureKind.INVALID_GRANT),
        ctx(attempt=series(sends=2), invalid_grant_retried=True),
        CFG,
        0.5,
    )
    assert second == Invalidate("invalid_grant_after_unresolved_attempt")


def test_invalid_grant_after_an_unresolved_send_outside_grace_invalidates() -> None:
    decision = decide(
        failure(FailureKind.INVALID_GRANT), ctx(now=OUTSIDE, attempt=series(sends=2)), CFG, 0
    )
    assert decision == Invalidate("invalid_grant_after_unresolved_attempt")


@pytest.mark.parametrize("usage", [ONE_TIME, REUSE])
@pytest.mark.parametrize("sends", [1, 2, MAX_GRACE_SENDS])
def test_client_rejected_opens_the_circuit(usage: RefreshTokenUsage, sends: int) -> None:
    decision = decide(
        failure(FailureKind.CLIENT_REJECTED), ctx(usage=usage, attempt=series(sends=sends)), CFG, 0
    )
    assert decision == OpenCircuit()


@settings(deadline=None)
@given(rand=rands, failures=st.integers(min_value=0, max_value=100))
def test_other_oauth_errors_back_off_long(rand: float, failures: int) -> None:
    decision = decide(failure(FailureKind.OAUTH_ERROR), ctx(failures=failures), CFG, rand)
    assert isinstance(decision, Backoff)
    assert INSIDE + CFG.backoff_max / 2 <= decision.at <= INSIDE + CFG.backoff_max


# ---- decide: properties over whole series -----------------------------------------------------

kinds = st.sampled_from(list(FailureKind))
retry_afters = st.none() | st.floats(min_value=0.0, max_value=100_000.0)


@settings(deadline=None)
@given(
    kind=kinds,
    retry_after=retry_afters,
    usage=st.sampled_from(list(RefreshTokenUsage)),
    grace=st.floats(min_value=0.0, max_value=3600.0),
    sends=st.integers(min_value=1, max_value=10),
    late=st.floats(min_value=0.0, max_value=1e6),
    failures=st.integers(min_value=0, max_value=1000),
    retried=st.booleans(),
    rand=rands,
)
def test_no_retry_now_once_the_grace_deadline_has_passed(
    kind: FailureKind,
    retry_after: float | None,
    usage: RefreshTokenUsage,
    grace: float,
    sends: int,
    late: float,
    failures: int,
    retried: bool,
    rand: float,
) -> None:
    journal = series(sends=sends)
    deadline = grace_deadline(journal, grace)
    now = (deadline if deadline is not None else NOW) + late
    decision = decide(
        failure(kind, retry_after),
        ctx(
            now=now,
            usage=usage,
            grace_period=grace,
            attempt=journal,
            failures=failures,
            invalid_grant_retried=retried,
        ),
        CFG,
        rand,
    )
    assert not isinstance(decision, RetryNow)
    if isinstance(decision, Backoff):
        assert decision.at >= now


@settings(deadline=None)
@given(
    grace=st.floats(min_value=0.0, max_value=120.0),
    steps=st.lists(
        st.tuples(kinds, retry_afters, st.floats(min_value=0.0, max_value=40.0)),
        min_size=1,
        max_size=12,
    ),
    rand=rands,
)
def test_a_series_never_sends_more_than_the_grace_budget(
    grace: float, steps: list[tuple[FailureKind, float | None, float]], rand: float
) -> None:
    """Drive decide() the way the refresher does, for one attempt series: every RetryNow is one
    more send of the same refresh token. At most MAX_GRACE_SENDS sends, each started inside the
    window, at most one retry after invalid_grant."""
    now = NOW
    sends = 1
    retried = False
    invalid_grant_retries = 0
    deadline = NOW + grace - grace_safety(grace)
    for kind, retry_after, elapsed in steps:
        now += elapsed  # the send took this long to fail
        decision = decide(
            failure(kind, retry_after),
            ctx(
                now=now,
                grace_period=grace,
                attempt=series(sends=sends),
                invalid_grant_retried=retried,
            ),
            CFG,
            rand,
        )
        if not isinstance(decision, RetryNow):
            break
        # a grace retry, except a resend after a 429 that followed nothing unresolved
        assert decision.grace == (kind is not FailureKind.RATE_LIMITED or sends > 1)
        assert decision.delay >= 0
        assert now < deadline
        now += decision.delay
        assert now < deadline  # the retry itself starts inside the window
        if kind is FailureKind.INVALID_GRANT:
            retried = True
            invalid_grant_retries += 1
        sends += 1
    assert sends <= MAX_GRACE_SENDS
    assert invalid_grant_retries <= 1


@settings(deadline=None)
@given(
    kind=kinds,
    retry_after=retry_afters,
    sends=st.integers(min_value=1, max_value=5),
    offset=st.floats(min_value=0.0, max_value=100.0),
    rand=rands,
)
def test_reuse_tokens_never_retry_now(
    kind: FailureKind, retry_after: float | None, sends: int, offset: float, rand: float
) -> None:
    decision = decide(
        failure(kind, retry_after),
        ctx(now=NOW + offset, usage=REUSE, attempt=series(sends=sends)),
        CFG,
        rand,
    )
    assert not isinstance(decision, RetryNow)


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


# ---- after an unresolved send, "not processed" answers keep the next send inside the window --


@pytest.mark.parametrize(
    ("kind", "retry_after"),
    [
        (FailureKind.RATE_LIMITED, 120.0),
        (FailureKind.RATE_LIMITED, None),
        (FailureKind.OAUTH_ERROR, None),
    ],
)
def test_not_processed_after_an_unresolved_send_retries_inside_the_window(
    kind: FailureKind, retry_after: float | None
) -> None:
    # Send 1 got no usable answer (the IdP may have rotated); send 2 was refused unprocessed
    # with 29 s of the window left. Waiting as told (or a long backoff) would lose the token.
    c = ctx(now=NOW + 1.0, attempt=series(sends=2), grace_period=31.0)
    deadline = grace_deadline(c.attempt, c.grace_period)
    assert deadline is not None
    decision = decide(failure(kind, retry_after), c, CFG, 0.5)
    assert isinstance(decision, RetryNow) and decision.grace
    assert c.now + decision.delay < deadline


def test_a_first_send_refused_unprocessed_is_a_plain_resend_or_backoff() -> None:
    first = ctx(now=NOW + 1.0, attempt=series(sends=1), grace_period=31.0)
    resend = decide(failure(FailureKind.RATE_LIMITED, 2.0), first, CFG, 0.5)
    assert resend == RetryNow(delay=2.0, grace=False)
    assert isinstance(decide(failure(FailureKind.OAUTH_ERROR), first, CFG, 0.5), Backoff)


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
