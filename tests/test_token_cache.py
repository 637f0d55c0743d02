"""The token API's answers in memory (refresherd.web.token_cache) and the store's change feed
that keeps them true: real stores on a real SQLite file and a real PostgreSQL, with a second
store on the same database standing for another process (its own connections: to SQLite's
``data_version`` and to PostgreSQL's NOTIFY that is all another process is). The proof with
real processes, a daemon answering GETs while the CLI rotates and deletes, is in
tests/test_token_cache_processes.py."""

from __future__ import annotations

import itertools
import json
import sqlite3
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import anyio
import pytest

from refresherd import policy
from refresherd.metrics import Metrics
from refresherd.model import Secret, State, TokenSet
from refresherd.store import Location, NewTokenSet, TokenStore, open_store
from refresherd.web.app import render_json
from refresherd.web.token_cache import CachedAnswer, TokenCache, token_json

NOW = 1_700_000_000.0
pytestmark = pytest.mark.anyio


def new(token_set_id: str, *, access: str | None = None, due: float = NOW + 3000) -> NewTokenSet:
    return NewTokenSet(
        id=token_set_id,
        provider="idp",
        refresh_token=Secret(f"RT-{token_set_id}-s3cr3t"),
        access_token=Secret(access or f"AT-{token_set_id}-s3cr3t-1"),
        expires_at=NOW + 3600,
        next_refresh_at=due,
        token_type="Bearer",
        scope="openid",
    )


@asynccontextmanager
async def two_stores(location: Location) -> AsyncIterator[tuple[TokenStore, TokenStore]]:
    """This process's store, and another's on the same database."""
    mine = await open_store(location)
    try:
        other = await open_store(location, create=False)
        try:
            yield mine, other
        finally:
            await other.close()
    finally:
        await mine.close()


async def get(cache: TokenCache, store: TokenStore, token_set_id: str, now: float = NOW) -> str:
    """What the token API's GET does: memory, else the database (remembered); the token."""
    body = await cache.answer(token_set_id, now)
    if body is None:
        generation = cache.generation
        ts = await store.read(token_set_id)
        if ts is None:
            return "404"
        cache.remember(ts, generation, now)
        assert ts.access_token is not None
        return ts.access_token.reveal()
    return str(json.loads(body)["access_token"])


def hits(metrics: Metrics) -> float:
    value = metrics.registry.get_sample_value("refresherd_api_token_reads_total", {"result": "hit"})
    assert value is not None
    return value


async def rotate(store: TokenStore, token_set_id: str, access: str) -> None:
    """A refresh's grant, as any process's refresher stores it."""
    async with store.owner("rotator") as owner:
        ts = await store.claim(token_set_id, owner=owner, now=NOW, lease_until=NOW + 60)
        assert isinstance(ts, TokenSet)
        stored = await store.save_grant(
            token_set_id,
            owner=owner,
            expected_version=ts.version,
            sent_refresh_token=ts.refresh_token,
            access_token=Secret(access),
            refresh_token=Secret(f"RT-{access}-s3cr3t"),
            token_type="Bearer",
            scope=None,
            expires_at=NOW + 3600,
            next_refresh_at=NOW + 3000,
            now=NOW,
        )
        assert stored is not None


async def invalidate(store: TokenStore, token_set_id: str) -> None:
    async with store.owner("invalidator") as owner:
        ts = await store.claim(token_set_id, owner=owner, now=NOW, lease_until=NOW + 60)
        assert isinstance(ts, TokenSet)
        assert await store.record_failure(
            token_set_id,
            owner=owner,
            expected_version=ts.version,
            state=State.INVALIDATED,
            next_refresh_at=NOW + 3000,
            error="invalid_grant",
            failures=1,
            invalid_reason="invalid_grant",
            now=NOW,
            resolve_attempt=True,
        )


@pytest.mark.parametrize("writer", ["other", "mine"])
async def test_an_answer_in_memory_never_outlives_a_commit(
    store_location: Location, writer: str
) -> None:
    # "other": another process's connections; "mine": this process's own store, whose writes
    # the database records the same way.
    async with two_stores(store_location) as (mine, other):
        by = other if writer == "other" else mine
        for token_set_id in ("a", "b", "c", "d"):
            await mine.add(new(token_set_id), now=NOW)
        metrics = Metrics()
        async with mine.change_feed() as feed:
            cache = TokenCache(feed, size=100, metrics=metrics)
            for token_set_id in ("a", "b", "c", "d"):
                assert await get(cache, mine, token_set_id) == f"AT-{token_set_id}-s3cr3t-1"
            before = hits(metrics)
            assert await get(cache, mine, "a") == "AT-a-s3cr3t-1"
            assert hits(metrics) == before + 1  # from memory

            await rotate(by, "a", "AT-a-s3cr3t-2")
            assert await get(cache, mine, "a") == "AT-a-s3cr3t-2"
            await by.remove("b")
            assert await get(cache, mine, "b") == "404"
            await invalidate(by, "c")
            assert await cache.answer("c", NOW) is None
            ts = await mine.read("c")
            assert ts is not None and ts.state is State.INVALIDATED
            # What changed only those: "d" and the new "a" are still answered from memory.
            assert await get(cache, mine, "a") == "AT-a-s3cr3t-2"
            before = hits(metrics)
            assert await get(cache, mine, "d") == "AT-d-s3cr3t-1"
            assert await get(cache, mine, "a") == "AT-a-s3cr3t-2"
            assert hits(metrics) == before + 2


async def test_a_set_made_due_elsewhere_is_not_answered_from_memory(
    store_location: Location,
) -> None:
    # `make_due_written_after` (and a journaled attempt) bring the planned refresh forward:
    # the GET must join the refresh, not serve the token the cache knew as fresh.
    async with two_stores(store_location) as (mine, other):
        await mine.add(new("a"), now=NOW)
        async with mine.change_feed() as feed:
            cache = TokenCache(feed, size=10)
            await get(cache, mine, "a")
            assert await cache.answer("a", NOW) is not None
            assert await other.make_due_written_after(now=NOW, limit=NOW - 1) == 1
            assert await cache.answer("a", NOW) is None
            ts = await mine.read("a")
            assert ts is not None
            assert isinstance(policy.access_decision(ts, now=NOW), policy.RefreshFirst)


async def test_a_read_that_raced_a_change_is_not_remembered(store_location: Location) -> None:
    async with two_stores(store_location) as (mine, other):
        await mine.add(new("a"), now=NOW)
        await mine.add(new("b"), now=NOW)
        async with mine.change_feed() as feed:
            cache = TokenCache(feed, size=10)
            generation = cache.generation
            stale = await mine.read("a")  # read; then the set changes before it is kept
            assert stale is not None
            await rotate(other, "a", "AT-a-s3cr3t-2")
            await get(cache, mine, "b")  # a catch-up in between drops "a"
            cache.remember(stale, generation, NOW)
            assert await get(cache, mine, "a") == "AT-a-s3cr3t-2"
            # A change to another set does not keep a read from being remembered.
            generation = cache.generation
            fresh = await mine.read("a")
            await rotate(other, "b", "AT-b-s3cr3t-2")
            assert await get(cache, mine, "b") == "AT-b-s3cr3t-2"
            assert fresh is not None
            cache.remember(fresh, generation, NOW)
            assert await cache.answer("a", NOW) is not None


async def test_memory_is_bounded_least_recently_read_first_out(tmp_path: Path) -> None:
    async with two_stores(tmp_path / "tokens.db") as (mine, _):
        for i in range(5):
            await mine.add(new(f"s{i}"), now=NOW)
        async with mine.change_feed() as feed:
            cache = TokenCache(feed, size=3)
            for i in range(4):
                await get(cache, mine, f"s{i}")
            assert len(cache) == 3
            assert "s3cr3t" not in repr(cache) + repr(
                vars(cache) if hasattr(cache, "__dict__") else ""
            )
            assert await cache.answer("s0", NOW) is None  # the oldest went
            assert await cache.answer("s1", NOW) is not None  # now the newest
            await get(cache, mine, "s4")
            assert await cache.answer("s2", NOW) is None
            assert await cache.answer("s1", NOW) is not None
            off = TokenCache(feed, size=0)
            await get(off, mine, "s1")
            assert len(off) == 0 and await off.answer("s1", NOW) is None


async def test_a_change_log_pruned_past_the_last_row_seen_forgets_everything(
    tmp_path: Path,
) -> None:
    path = tmp_path / "tokens.db"
    async with two_stores(path) as (mine, _):
        await mine.add(new("a"), now=NOW)
        async with mine.change_feed() as feed:
            cache = TokenCache(feed, size=10)
            await get(cache, mine, "a")
            assert await cache.answer("a", NOW) is not None
            conn = sqlite3.connect(path, isolation_level=None)
            try:  # 70,000 changes of other sets: the log keeps the last 65,536 or so
                conn.execute(
                    "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n"
                    " WHERE i < 70000) INSERT INTO token_set_changes (id) SELECT 'x' FROM n"
                )
                kept = conn.execute("SELECT count(*) FROM token_set_changes").fetchone()[0]
            finally:
                conn.close()
            assert 65536 <= kept < 70000
            # A request comes through the event loop: a turn after the commit, at least.
            await anyio.sleep(0)
            assert await cache.answer("a", NOW) is None
            assert len(cache) == 0


async def test_a_lost_listening_session_forgets_everything(postgres_url: str) -> None:
    import asyncpg

    from refresherd.store import postgres_location

    async with two_stores(postgres_location(postgres_url)) as (mine, _):
        await mine.add(new("a"), now=NOW)
        async with mine.change_feed() as feed:
            cache = TokenCache(feed, size=10)
            await get(cache, mine, "a")
            assert await cache.answer("a", NOW) is not None
            admin = await asyncpg.connect(postgres_url)
            try:
                ended = await admin.fetchval(
                    "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
                    " WHERE application_name = 'refresherd token cache'"
                )
            finally:
                await admin.close()
            assert ended == 1
            # Notifications may have been missed while it was gone: nothing is kept, and the
            # session is opened again.
            assert await cache.answer("a", NOW) is None
            await get(cache, mine, "a")
            assert await cache.answer("a", NOW) is not None


def test_memory_serves_exactly_where_the_access_decision_says_serve() -> None:
    # An answer is kept only where access_decision says Serve when it is read; from then on
    # it must be served at exactly the times access_decision would still say Serve.
    times = (NOW - 10, NOW + 10, NOW + 100, NOW + 200)
    for state, access, expires_at, next_refresh_at in itertools.product(
        State, (True, False), (None, *times), times
    ):
        ts = TokenSet(
            id="a",
            provider="idp",
            refresh_token=Secret("RT-s3cr3t"),
            access_token=Secret("AT-s3cr3t") if access else None,
            expires_at=expires_at,
            state=state,
            version=3,
            next_refresh_at=next_refresh_at,
            created_at=NOW - 1000,
            updated_at=NOW - 1000,
            invalid_reason="invalid_grant" if state is State.INVALIDATED else None,
        )
        for read_at in times:
            if not isinstance(policy.access_decision(ts, now=read_at), policy.Serve):
                continue
            entry = CachedAnswer(ts)
            for now in (*times, NOW + 150):
                if now < read_at:
                    continue
                serve = isinstance(policy.access_decision(ts, now=now), policy.Serve)
                assert entry.servable(now) == serve, (ts, read_at, now)
                if serve:  # and the same bytes as the database's way would send
                    assert entry.body(now) == render_json(token_json(ts, now))


def test_no_token_in_a_repr() -> None:
    ts = TokenSet(
        id="a",
        provider="idp",
        refresh_token=Secret("RT-s3cr3t"),
        access_token=Secret("AT-s3cr3t"),
        expires_at=NOW + 60,
        state=State.ACTIVE,
        version=1,
        next_refresh_at=NOW + 30,
        created_at=NOW,
        updated_at=NOW,
    )
    entry = CachedAnswer(ts)
    assert b"AT-s3cr3t" in entry.body(NOW)
    assert "s3cr3t" not in repr(entry)
