"""Politeness to IdPs: the token bucket (pure, ``now`` given), the per-provider slot, and the
Refresher honouring both against a real FakeIdP and a real SqliteStore. Nothing here is timed: the
bucket's waits are computed, and the end-to-end checks count connections and outcomes.
"""

from __future__ import annotations

import itertools
import random
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from pathlib import Path

import anyio
import pytest
from refresh_parts import build_refresher

from refresherd.idp.endpoint import TokenEndpoint
from refresherd.metrics import Metrics
from refresherd.model import RefreshTokenUsage, Secret
from refresherd.refresh.refresher import Refresher
from refresherd.settings import ProviderConfig, ScheduleConfig
from refresherd.store import NewTokenSet
from refresherd.store.sqlite import SqliteStore
from refresherd.testing import FakeIdP, FaultKind
from refresherd.throttle import ProviderThrottle, Throttles, TokenBucket

CLIENT_ID = "refresherd-throttle"
CLIENT_SECRET = "cs_throttle-test-7e1d4c9b"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


# --------------------------------------------------------------------------- the bucket


def test_bucket_lets_a_burst_through_then_spaces_sends_at_the_rate() -> None:
    bucket = TokenBucket(rate=10.0, burst=3.0, now=100.0)
    assert [bucket.reserve(100.0) for _ in range(3)] == [0.0, 0.0, 0.0]
    # Booked in call order, each 1/rate after the one before.
    assert [round(bucket.reserve(100.0), 6) for _ in range(3)] == [0.1, 0.2, 0.3]


def test_bucket_refills_with_time_but_never_beyond_the_burst() -> None:
    bucket = TokenBucket(rate=2.0, burst=2.0, now=0.0)
    assert bucket.reserve(0.0) == 0.0
    assert bucket.reserve(0.0) == 0.0
    assert bucket.reserve(0.0) == pytest.approx(0.5)
    # An hour of quiet refills to the burst, not to 7,200.
    assert [bucket.reserve(3600.0) for _ in range(2)] == [0.0, 0.0]
    assert bucket.reserve(3600.0) == pytest.approx(0.5)


def test_bucket_sustains_exactly_the_rate() -> None:
    bucket = TokenBucket(rate=5.0, burst=1.0, now=0.0)
    sent_at = []
    for _ in range(50):
        sent_at.append(bucket.reserve(0.0))
    # 50 sends booked at once go out over 49/5 s, evenly.
    assert sent_at[-1] == pytest.approx(49 / 5)
    gaps = {round(b - a, 9) for a, b in itertools.pairwise(sent_at)}
    assert gaps == {0.2}


def test_bucket_ignores_a_clock_that_steps_back() -> None:
    bucket = TokenBucket(rate=1.0, burst=1.0, now=10.0)
    assert bucket.reserve(10.0) == 0.0
    assert bucket.reserve(5.0) == pytest.approx(1.0)  # no refill from going back in time


@pytest.mark.parametrize(("rate", "burst"), [(0.0, 1.0), (-1.0, 1.0), (1.0, 0.5)])
def test_bucket_refuses_nonsense(rate: float, burst: float) -> None:
    with pytest.raises(ValueError):
        TokenBucket(rate=rate, burst=burst, now=0.0)


# --------------------------------------------------------------------------- slots


def provider(
    token_url: str = "http://127.0.0.1:9/connect/token", **limits: object
) -> ProviderConfig:
    base = ProviderConfig(
        name="p",
        token_url=token_url,
        client_id=CLIENT_ID,
        client_secret=Secret(CLIENT_SECRET),
        refresh_token_usage=RefreshTokenUsage.ONE_TIME,
        grace_period=4.0,
        request_timeout=5.0,
        connect_timeout=2.0,
    )
    return replace(base, **limits)  # type: ignore[arg-type]


def test_throttles_exist_only_for_providers_with_a_limit_and_survive_unchanged_reloads() -> None:
    throttles = Throttles()
    assert throttles.of(provider()) is None
    first = throttles.of(provider(max_concurrent_refreshes=4))
    assert first is not None
    assert throttles.of(provider(max_concurrent_refreshes=4)) is first
    changed = throttles.of(provider(max_concurrent_refreshes=4, max_requests_per_second=2.0))
    assert changed is not None and changed is not first
    assert throttles.of(provider()) is None


@pytest.mark.anyio
async def test_slot_holds_at_most_max_concurrent_at_once() -> None:
    throttle = ProviderThrottle(max_concurrent=3, per_second=None)
    inside = 0
    most = 0
    waited = 0

    async def one() -> None:
        nonlocal inside, most, waited
        async with throttle.slot():
            inside += 1
            most = max(most, inside)
            waited = max(waited, throttle.waiting)
            await anyio.sleep(0.05)
            inside -= 1

    async with anyio.create_task_group() as tg:
        for _ in range(10):
            tg.start_soon(one)
    assert most == 3
    assert waited > 0
    assert inside == 0 and throttle.waiting == 0


@pytest.mark.anyio
async def test_slot_waits_what_the_bucket_says_on_the_injected_clock() -> None:
    # A frozen clock: the 1,000 slots took the whole burst, so the next send waits 1/rate.
    clock = [50.0]
    throttle = ProviderThrottle(max_concurrent=None, per_second=1000.0, monotonic=lambda: clock[0])
    for _ in range(1000):
        async with throttle.slot():
            pass
    assert throttle._bucket is not None
    assert throttle._bucket.reserve(clock[0]) == pytest.approx(1 / 1000)


# --------------------------------------------------------------------------- the refresher


@dataclass
class Rig:
    idp: FakeIdP
    store: SqliteStore
    refresher: Refresher
    metrics: Metrics

    async def add(self, token_set_id: str) -> None:
        issued = self.idp.issue(token_set_id)
        now = time.time()
        await self.store.add(
            NewTokenSet(
                id=token_set_id,
                provider="p",
                refresh_token=Secret(str(issued["refresh_token"])),
                access_token=Secret(str(issued["access_token"])),
                expires_at=now + 3600,
                next_refresh_at=now + 2880,
                token_type="Bearer",
                scope=str(issued["scope"]),
            ),
            now=now,
        )


@asynccontextmanager
async def rig(tmp_path: Path, *, latency: float = 0.0, **limits: object) -> AsyncIterator[Rig]:
    store = await SqliteStore.open(tmp_path / "tokens.db")
    idp = FakeIdP(clients={CLIENT_ID: CLIENT_SECRET}, grace_period=4.0, latency=latency)
    try:
        async with anyio.create_task_group() as tg:
            await tg.start(idp.serve)
            p = provider(idp.token_url, **limits)
            endpoint = TokenEndpoint(p)
            metrics = Metrics()
            refresher = build_refresher(
                store=store,
                providers={"p": p},
                endpoints={"p": endpoint},
                schedule=ScheduleConfig(),
                metrics=metrics,
                owner="owner-throttle",
                lease_duration=30.0,
                rng=random.Random(1),
            ).refresher
            try:
                yield Rig(idp, store, refresher, metrics)
            finally:
                await endpoint.aclose()
                tg.cancel_scope.cancel()
    finally:
        await store.close()


@pytest.mark.anyio
@pytest.mark.parametrize(("limit", "connections"), [(None, 6), (2, 2)])
async def test_max_concurrent_refreshes_caps_what_the_idp_sees(
    tmp_path: Path, limit: int | None, connections: int
) -> None:
    # max_connections is 20: only the provider's own limit keeps six refreshes from opening six
    # connections to a slow IdP.
    async with rig(tmp_path, latency=0.3, max_concurrent_refreshes=limit) as r:
        for i in range(6):
            await r.add(f"ts-{i}")
        outcomes: list[str] = []

        async def one(token_set_id: str) -> None:
            outcomes.append((await r.refresher.refresh(token_set_id)).outcome)

        async with anyio.create_task_group() as tg:
            for i in range(6):
                tg.start_soon(one, f"ts-{i}")
        assert outcomes == ["refreshed"] * 6
        assert r.idp.ledger.refreshes == 6
        assert r.idp.ledger.connections == connections


@pytest.mark.anyio
async def test_a_grace_retry_does_not_queue_behind_the_rate_limit(tmp_path: Path) -> None:
    # One send per 100 s at most, and the answer to the first is lost after the IdP rotated.
    # The retry presents the same token again at once: had it waited for the rate, the 4 s
    # grace window would be over and the IdP would refuse it (invalid_grant, token lost).
    async with rig(tmp_path, max_concurrent_refreshes=1, max_requests_per_second=0.01) as r:
        await r.add("ts-grace")
        r.idp.faults.add(FaultKind.DROP_AFTER_ROTATE)
        with anyio.fail_after(30):
            result = await r.refresher.refresh("ts-grace")
        assert result.outcome == "refreshed"
        assert r.idp.ledger.reuses_in_grace == 1
        assert (
            r.metrics.registry.get_sample_value("refresherd_grace_retries_total", {"provider": "p"})
            == 1.0
        )
