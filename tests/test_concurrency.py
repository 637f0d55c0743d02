"""The adaptive limit's arithmetic (refresherd.concurrency): samples in, limit out."""

from __future__ import annotations

import itertools

from hypothesis import given
from hypothesis import strategies as st

from refresherd.concurrency import (
    FAR_RATE,
    FASTEST_WINDOWS,
    FLOOR,
    INITIAL,
    WINDOW,
    GradientLimit,
)
from refresherd.model import Secret
from refresherd.refresh.providers import Providers
from refresherd.settings import (
    AUTO_CONCURRENCY,
    AUTO_CONCURRENCY_FAR,
    ProviderConfig,
    ScheduleConfig,
)

SCHEDULE = ScheduleConfig()


def feed(
    limit: GradientLimit,
    *,
    seconds: float,
    windows: int,
    start: float = 0.0,
    busy: bool = True,
    per_window: int = 20,
) -> float:
    """``windows`` windows of answers taking ``seconds`` each, with the limit in use (``busy``)
    or a quarter of it; returns the time after the last."""
    now = start
    for _ in range(windows):
        for _ in range(per_window):
            now += WINDOW / per_window
            in_flight = limit.limit if busy else limit.limit // 4
            limit.answered(seconds, in_flight=in_flight, now=now)
        now += 1e-6
    return now


def test_flat_latency_with_a_backlog_rises_to_the_ceiling_within_seconds() -> None:
    limit = GradientLimit(ceiling=512, now=0.0)
    assert limit.limit == INITIAL
    now = feed(limit, seconds=0.05, windows=5)
    assert limit.limit == 512  # slow start: doubled each window
    assert now < 1.5


def test_after_slow_start_the_limit_grows_by_a_quarter_a_window() -> None:
    limit = GradientLimit(ceiling=4096, now=0.0)
    now = feed(limit, seconds=0.05, windows=2)
    assert limit.limit == 4 * INITIAL
    now = feed(limit, seconds=0.5, windows=1, start=now)  # slower: slow start ends
    after = limit.limit
    assert after < 4 * INITIAL
    now = feed(limit, seconds=0.5, windows=6, start=now)  # the new pace, held: growth again
    grown = limit.limit
    feed(limit, seconds=0.5, windows=1, start=now)
    assert grown < 4096
    assert 1.25 * grown - 1 <= limit.limit <= 1.25 * (grown + 1)


def test_a_quiet_steady_state_does_not_grow_the_limit() -> None:
    limit = GradientLimit(ceiling=512, now=0.0)
    feed(limit, seconds=0.05, windows=40, busy=False)
    assert limit.limit == INITIAL


def test_rising_latency_brings_the_limit_down() -> None:
    limit = GradientLimit(ceiling=512, now=0.0)
    now = feed(limit, seconds=0.05, windows=20)
    assert limit.limit == 512
    # The IdP slows to ten times its pace: the limit falls window after window, until the
    # slow pace has lasted long enough to be the IdP's usual one (Gradient2 follows it).
    seen = [limit.limit]
    for _ in range(3):
        now = feed(limit, seconds=0.5, windows=1, start=now)
        seen.append(limit.limit)
    assert all(b < a for a, b in itertools.pairwise(seen)), seen
    assert seen[-1] < 512 * 0.4


def test_overload_signs_back_off_and_the_limit_grows_back_after() -> None:
    limit = GradientLimit(ceiling=256, now=0.0)
    now = feed(limit, seconds=0.05, windows=20)
    assert limit.limit == 256
    for _ in range(5):
        now += WINDOW
        limit.overloaded(in_flight=limit.limit, now=now)
    low = limit.limit
    assert low <= 256 * 0.75**4
    feed(limit, seconds=0.05, windows=30, start=now)
    assert limit.limit == 256


def test_after_a_slow_spell_the_pace_recovers_and_the_limit_with_it() -> None:
    limit = GradientLimit(ceiling=300, now=0.0)
    now = feed(limit, seconds=0.02, windows=20)
    lowest = 300
    for _ in range(40):  # a long incident
        now = feed(limit, seconds=0.4, windows=1, start=now)
        lowest = min(lowest, limit.limit)
    assert lowest < 100
    feed(limit, seconds=0.02, windows=40, start=now)
    assert limit.limit == 300


def test_a_window_needs_enough_answers_or_time() -> None:
    limit = GradientLimit(ceiling=100, now=0.0)
    # Three answers over a second: too few for a window, not long enough for the last resort.
    for i in range(3):
        limit.answered(0.01, in_flight=INITIAL, now=0.3 * (i + 1))
    assert limit.limit == INITIAL
    limit.answered(0.01, in_flight=INITIAL, now=2.5)
    assert limit.limit > INITIAL


def test_a_reload_keeps_the_limit_within_the_new_ceiling() -> None:
    limit = GradientLimit(ceiling=512, now=0.0)
    feed(limit, seconds=0.05, windows=20)
    limit.set_ceiling(64)
    assert limit.limit == 64
    limit.set_ceiling(2)
    assert limit.limit == 2  # a ceiling below the floor wins
    limit.set_ceiling(128)
    assert limit.limit >= 2


_events = st.lists(
    st.tuples(
        st.floats(min_value=0.0, max_value=1.0),  # time step
        st.one_of(st.none(), st.floats(min_value=0.0, max_value=30.0)),  # None: overload
        st.integers(min_value=0, max_value=5000),  # in flight
    ),
    max_size=300,
)


@given(ceiling=st.integers(min_value=1, max_value=4096), events=_events)
def test_the_limit_stays_within_floor_and_ceiling(
    ceiling: int, events: list[tuple[float, float | None, int]]
) -> None:
    limit = GradientLimit(ceiling=ceiling, now=0.0)
    now = 0.0
    for step, seconds, in_flight in events:
        now += step
        if seconds is None:
            limit.overloaded(in_flight=in_flight, now=now)
        else:
            limit.answered(seconds, in_flight=in_flight, now=now)
        assert min(FLOOR, ceiling) <= limit.limit <= ceiling


@given(
    pace=st.floats(min_value=0.0005, max_value=5.0),
    ceiling=st.integers(min_value=FLOOR, max_value=2048),
)
def test_under_flat_latency_and_a_backlog_the_limit_never_falls(pace: float, ceiling: int) -> None:
    limit = GradientLimit(ceiling=ceiling, now=0.0)
    before = limit.limit
    now = 0.0
    for _ in range(30):
        now = feed(limit, seconds=pace, windows=1, start=now)
        assert limit.limit >= before
        before = limit.limit
    assert limit.limit == ceiling


@given(
    pace=st.floats(min_value=0.001, max_value=1.0),
    slowdown=st.floats(min_value=3.0, max_value=50.0),
)
def test_under_rising_latency_the_limit_falls(pace: float, slowdown: float) -> None:
    limit = GradientLimit(ceiling=1024, now=0.0)
    now = feed(limit, seconds=pace, windows=30)
    top = limit.limit
    now = feed(limit, seconds=pace * slowdown, windows=3, start=now)
    assert limit.limit < top


# --------------------------------------------------------------------------- the far ceiling


def test_a_distant_idp_raises_the_limit_past_the_ceiling_as_far_as_its_pace_needs() -> None:
    # 200 ms away: FAR_RATE refreshes a second need FAR_RATE * 0.2 in flight.
    limit = GradientLimit(ceiling=512, far_ceiling=1024, now=0.0)
    feed(limit, seconds=0.2, windows=12)
    assert limit.reach == min(1024, int(FAR_RATE * 0.2))
    assert limit.limit == limit.reach > 512


def test_the_far_ceiling_bounds_the_reach() -> None:
    limit = GradientLimit(ceiling=512, far_ceiling=1024, now=0.0)
    feed(limit, seconds=2.0, windows=12)
    assert limit.reach == limit.limit == 1024


def test_an_idp_nearby_keeps_the_ceiling_however_slow_its_answers_are_in_this_process() -> None:
    # At 512 in flight on loopback an answer waited 40 ms in this process's queue; the
    # fastest answer of each window, the IdP's own pace, was about a millisecond. Answers
    # queued for 150 ms here: by their median or slowest, the reach would be 750.
    limit = GradientLimit(ceiling=512, far_ceiling=1024, now=0.0)
    now = 0.0
    for _ in range(12):
        for i in range(20):
            now += WINDOW / 20
            limit.answered(0.001 if i == 0 else 0.15, in_flight=limit.limit, now=now)
        now += 1e-6
    assert limit.reach == 512
    assert limit.limit <= 512


def test_without_a_far_ceiling_a_slow_idp_stays_under_the_ceiling() -> None:
    limit = GradientLimit(ceiling=512, now=0.0)
    feed(limit, seconds=0.2, windows=12)
    assert limit.reach == limit.limit == 512


def test_the_reach_comes_down_when_the_idp_comes_closer() -> None:
    limit = GradientLimit(ceiling=512, far_ceiling=1024, now=0.0)
    now = feed(limit, seconds=0.2, windows=12)
    assert limit.limit > 512
    # The fastest answer is kept for FASTEST_WINDOWS windows, then the nearer pace rules.
    feed(limit, seconds=0.02, windows=FASTEST_WINDOWS + 2, start=now)
    assert limit.reach == 512
    assert limit.limit <= 512


def test_a_reload_sets_both_ceilings() -> None:
    limit = GradientLimit(ceiling=512, far_ceiling=1024, now=0.0)
    now = feed(limit, seconds=0.2, windows=12)
    limit.set_ceiling(256)  # a count set by hand: no far ceiling any more
    assert limit.reach == 256
    assert limit.limit <= 256
    now = feed(limit, seconds=0.2, windows=12, start=now)
    assert limit.limit == 256
    limit.set_ceiling(512, 1024)  # back to "auto": the pace it saw still counts
    assert limit.reach == int(FAR_RATE * 0.2)
    feed(limit, seconds=0.2, windows=12, start=now)
    assert limit.limit == int(FAR_RATE * 0.2)


def test_auto_concurrency_rises_with_a_distant_provider_within_its_caps() -> None:
    """The daemon's own ceiling ([daemon] concurrency = "auto") follows a distant provider's
    limit past 512; max_concurrent_refreshes still caps a provider's."""
    now = [0.0]
    configs = {
        name: ProviderConfig(
            name=name,
            token_url=f"https://{name}.example/token",
            client_id="c",
            client_secret=Secret("s"),
            max_concurrent_refreshes=cap,
        )
        for name, cap in (("far", None), ("capped", 600), ("near", None))
    }
    providers = Providers(
        configs,
        {},
        SCHEDULE,
        concurrency=AUTO_CONCURRENCY,
        far_concurrency=AUTO_CONCURRENCY_FAR,
        monotonic=lambda: now[0],
    )
    assert providers.concurrency == AUTO_CONCURRENCY
    feed(providers.limit("far"), seconds=0.2, windows=12)
    feed(providers.limit("capped"), seconds=0.2, windows=12)
    feed(providers.limit("near"), seconds=0.01, windows=12)
    assert providers.limit("far").limit == int(FAR_RATE * 0.2) > AUTO_CONCURRENCY
    assert providers.limit("capped").limit == 600
    assert providers.limit("near").limit == AUTO_CONCURRENCY
    # The daemon's ceiling follows a distant provider's limit while it has refreshes out, and
    # gives the room back (to nearer providers' 512 together) once it goes quiet.
    assert providers.concurrency == AUTO_CONCURRENCY
    providers.sending["capped"] += 1
    assert providers.concurrency == 600
    providers.sending["far"] += 1
    assert providers.concurrency == int(FAR_RATE * 0.2)
    providers.sending["far"] -= 1
    providers.sending["capped"] -= 1
    assert providers.concurrency == AUTO_CONCURRENCY
    providers.sending["far"] += 1
    # A count set by hand is a ceiling kept, however far the IdP.
    providers.reconfigure(providers=configs, endpoints={}, schedule=SCHEDULE, concurrency=256)
    assert providers.concurrency == 256
    assert providers.limit("far").limit <= 256
    # A provider a reload removes takes its limit with it.
    del configs["far"]
    providers.reconfigure(
        providers=configs,
        endpoints={},
        schedule=SCHEDULE,
        concurrency=AUTO_CONCURRENCY,
        far_concurrency=AUTO_CONCURRENCY_FAR,
    )
    assert "far" not in providers
    assert providers.concurrency == AUTO_CONCURRENCY
