"""refresherd.store.postgres against a real PostgreSQL on loopback: what a fleet of daemons
sharing one database relies on (SKIP LOCKED claims, owners by advisory locks, one migration),
errors, and the values the store shares with SQLite (sealed tokens, export and load)."""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import anyio
import asyncpg
import pytest

from refresherd.encryption import PREFIX, TokenCipher, new_key_text
from refresherd.model import Secret, TokenSet
from refresherd.storage_health import StorageReason
from refresherd.store import (
    NewTokenSet,
    PostgresLocation,
    StoreError,
    TokenSetExists,
    TokenStore,
    open_store,
    postgres_location,
)
from refresherd.store.migrations import SCHEMA_VERSION
from refresherd.store.postgres import EXPORTER_LOCK, PostgresStore
from refresherd.store.sqlite import SqliteStore

NOW = 1_700_000_000.0
ME = "host-a-101-0a0a0a0a"
OTHER = "host-b-202-0b0b0b0b"
KEY = Secret(new_key_text())


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def location(postgres_url: str) -> PostgresLocation:
    return postgres_location(postgres_url)


@pytest.fixture
async def store(location: PostgresLocation) -> AsyncIterator[PostgresStore]:
    s = await PostgresStore.open(location)
    try:
        yield s
    finally:
        await s.close()


def new(token_set_id: str, *, due: float = NOW - 1) -> NewTokenSet:
    return NewTokenSet(
        id=token_set_id,
        provider="visma",
        refresh_token=Secret(f"RT-{token_set_id}-s3cr3t"),
        access_token=Secret(f"AT-{token_set_id}-s3cr3t"),
        expires_at=NOW + 3600,
        next_refresh_at=due,
        token_type="Bearer",
    )


async def fetch(location: PostgresLocation, sql: str, *args: Any) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(location.dsn.reveal())
    try:
        return list(await conn.fetch(sql, *args))
    finally:
        await conn.close()


# ---- schema ----------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_concurrent_opens_migrate_once(location: PostgresLocation) -> None:
    """Several daemons starting together on an empty database: one migrates, the others wait
    for it under the advisory lock and find the schema current."""
    stores: list[TokenStore] = []
    try:
        async with anyio.create_task_group() as tg:
            for _ in range(6):

                async def one() -> None:
                    stores.append(await open_store(location))

                tg.start_soon(one)
        assert len(stores) == 6
        for s in stores:
            assert await s.schema_version() == SCHEMA_VERSION
        await stores[0].add(new("a"), now=NOW)
        assert all([await s.get("a") is not None for s in stores])
    finally:
        for s in stores:
            await s.close()
    rows = await fetch(location, "SELECT version FROM refresherd_schema")
    assert [r[0] for r in rows] == [SCHEMA_VERSION]


@pytest.mark.anyio
async def test_a_newer_schema_is_refused_untouched(location: PostgresLocation) -> None:
    s = await PostgresStore.open(location)
    await s.close()
    await fetch(location, "UPDATE refresherd_schema SET version = $1", SCHEMA_VERSION + 1)
    with pytest.raises(StoreError) as info:
        await PostgresStore.open(location)
    message = str(info.value)
    assert location.display in message and "newer" in message
    rows = await fetch(location, "SELECT version FROM refresherd_schema")
    assert rows[0][0] == SCHEMA_VERSION + 1


# ---- a fleet: claims, owners ---------------------------------------------------------------


@pytest.mark.anyio
async def test_four_daemons_claiming_together_never_share_a_row(
    location: PostgresLocation,
) -> None:
    stores = [await PostgresStore.open(location, pool_size=4) for _ in range(4)]
    try:
        ids = [f"ts-{i:04d}" for i in range(400)]
        await stores[0].add_many([new(i, due=NOW - n) for n, i in enumerate(ids)], now=NOW)
        claimed: dict[str, list[str]] = {}

        async def daemon(store: PostgresStore, owner: str) -> None:
            got: list[str] = []

            async def worker() -> None:
                while ids_left := await store.claim_due(
                    owner=owner, now=NOW, lease_until=NOW + 60, limit=5
                ):
                    got.extend(ids_left)

            async with anyio.create_task_group() as tg:
                for _ in range(3):
                    tg.start_soon(worker)
            claimed[owner] = got

        async with anyio.create_task_group() as tg:
            for n, s in enumerate(stores):
                tg.start_soon(daemon, s, f"host-{n}-1-0000000{n}")
        every = [i for got in claimed.values() for i in got]
        assert sorted(every) == ids  # each row once: none twice, none left
        rows = await fetch(location, "SELECT id, lease_owner FROM token_sets")
        owner_of = {r["id"]: r["lease_owner"] for r in rows}
        for owner, got in claimed.items():
            assert all(owner_of[i] == owner for i in got)
    finally:
        for s in stores:
            await s.close()


@pytest.mark.anyio
async def test_two_daemons_never_claim_the_same_hook_delivery(location: PostgresLocation) -> None:
    first = await PostgresStore.open(location)
    second = await PostgresStore.open(location)
    try:
        for n in range(100):
            await first.enqueue_hook(
                event_id=f"e{n}", event_type="t", payload="{}", targets=["webhook"], now=NOW
            )
        claimed: list[int] = []

        async def dispatcher(store: PostgresStore) -> None:
            while batch := await store.claim_hook_deliveries(now=NOW, until=NOW + 30, limit=3):
                claimed.extend(d.id for d in batch)

        async with anyio.create_task_group() as tg:
            for store in (first, second, first, second):
                tg.start_soon(dispatcher, store)
        assert len(claimed) == 100 and len(set(claimed)) == 100
    finally:
        await first.close()
        await second.close()


@pytest.mark.anyio
async def test_claim_due_skips_a_row_another_session_has_locked(
    store: PostgresStore, location: PostgresLocation
) -> None:
    """SKIP LOCKED: a row another daemon is claiming right now is passed over, not waited for
    (waiting would end in a lock timeout, a StoreError)."""
    await store.add_many([new("a", due=NOW - 30), new("b", due=NOW - 20)], now=NOW)
    conn = await asyncpg.connect(location.dsn.reveal())
    try:
        async with conn.transaction():
            await conn.execute("SELECT id FROM token_sets WHERE id = 'a' FOR UPDATE")
            got = await store.claim_due(owner=ME, now=NOW, lease_until=NOW + 60, limit=10)
            assert got == ["b"]
    finally:
        await conn.close()
    assert await store.claim_due(owner=ME, now=NOW, lease_until=NOW + 60, limit=10) == ["a"]


@pytest.mark.anyio
async def test_an_owner_is_alive_while_its_session_lives(
    store: PostgresStore, location: PostgresLocation
) -> None:
    other = await PostgresStore.open(location)
    try:
        async with store.owner("daemon-a") as me:
            assert me.startswith("daemon-a-")
            assert await other.owner_alive(me) is True
            assert await store.owner_alive(me) is True  # from another of our own sessions
            with anyio.move_on_after(0.2) as scope:
                await store.owner_lost()
            assert scope.cancelled_caught  # it holds: owner_lost does not return
            await store.add(new("a"), now=NOW)
            await store.claim("a", owner=me, now=NOW, lease_until=NOW + 600)
        # An exit with a lease left behind: the lock is given back and the row stays, so the
        # owner reads as gone and its lease can be taken over at once.
        assert await other.owner_alive(me) is False
        assert await other.clear_leases_of([me]) == 1
        # An exit that leaves a journaled attempt behind (its lease released, the IdP's answer
        # not definitive): a successor asks whether the attempt's owner lives, and must hear
        # "gone", not "unknown", or it would leave the attempt to it for ever.
        async with store.owner("daemon-b") as journaling:
            await store.claim("a", owner=journaling, now=NOW, lease_until=NOW + 600)
            await store.begin_attempt(
                "a", owner=journaling, version=1, now=NOW, keep_since=NOW - 30
            )
            await store.release("a", owner=journaling)
        assert await other.owner_alive(journaling) is False
        # A clean exit (nothing names it) leaves no row behind; nor do gone owners that nothing
        # names once another owner registers (pruning), while a named one stays.
        async with store.owner(None) as tidy:
            pass
        async with other.owner(None):
            rows = await fetch(location, "SELECT owner FROM refresherd_owners")
            names = {r[0] for r in rows}
            assert tidy not in names and me not in names
            assert journaling in names
        # Never a guess: an owner nobody ever registered counts as alive.
        assert await other.owner_alive("host-x-1-deadbeef") is True
    finally:
        await other.close()


@pytest.mark.anyio
async def test_a_dead_owner_is_dead_to_every_probe_at_once(
    store: PostgresStore, location: PostgresLocation
) -> None:
    """A fleet's refreshes ask about one dead owner all at once (each of its journaled sets,
    and every daemon's reaper). No probe may make it look alive to another: a set left to a
    "live" owner waits past its grace window, and its token is then spent for nothing."""
    other = await PostgresStore.open(location)
    try:
        async with store.owner("daemon-a") as gone:
            await store.add(new("a"), now=NOW)
            await store.claim("a", owner=gone, now=NOW, lease_until=NOW + 600)
        answers: list[bool] = []

        async def probe(s: PostgresStore) -> None:
            for _ in range(20):
                answers.append(await s.owner_alive(gone))

        async with anyio.create_task_group() as tg:
            for s in (store, other) * 8:
                tg.start_soon(probe, s)
        assert answers == [False] * 320
    finally:
        await other.close()


@pytest.mark.anyio
async def test_owner_lost_checks_that_the_lock_is_still_held(store: PostgresStore) -> None:
    """Besides the connection's end, a periodic check: the session must still answer and still
    hold its lock. Here the lock goes while the connection stays (no termination to hear)."""
    store.owner_check_interval = 0.02
    async with store.owner(None):
        with anyio.move_on_after(0.3) as scope:
            await store.owner_lost()  # many checks, each finding the lock held
        assert scope.cancelled_caught
        conn = store._owner_conn
        assert conn is not None
        await conn.execute("SELECT pg_advisory_unlock_all()")
        with anyio.fail_after(30):
            await store.owner_lost()


@pytest.mark.anyio
async def test_a_terminated_owner_session_is_dead_to_others_and_lost_to_itself(
    store: PostgresStore, location: PostgresLocation
) -> None:
    """The owner's connection is cut (pg_terminate_backend, as a failover or a network fault
    would): other daemons see the owner dead at once, and the owner hears it has lost its
    registration, so it stops before anyone takes over its leases."""
    other = await PostgresStore.open(location)
    try:
        async with store.owner("daemon-a") as me:
            await store.add(new("a"), now=NOW)
            await store.claim("a", owner=me, now=NOW, lease_until=NOW + 600)
            assert await other.owner_alive(me) is True
            killed = await fetch(
                location,
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                " WHERE application_name = $1",
                f"refresherd owner {me}",
            )
            assert [r[0] for r in killed] == [True]
            with anyio.fail_after(30):
                await store.owner_lost()
            # The server ends the session (and its lock) as it terminates it; poll, no timing.
            with anyio.fail_after(30):
                while await other.owner_alive(me):
                    await anyio.sleep(0.05)
            # Its row stays while a lease names it: a dead owner, not an unknown one.
            assert await other.owner_alive(me) is False
            assert await other.clear_leases_of([me]) == 1
    finally:
        await other.close()


@pytest.mark.anyio
async def test_the_exporter_lock_is_taken_once_and_goes_with_the_owner_session(
    store: PostgresStore, location: PostgresLocation
) -> None:
    """The exporter role is an advisory lock on the owner's session. Asked every gauge cycle,
    it is never taken twice (a session's advisory locks stack: one unlock would not free a lock
    taken twice); and when that session is cut, its holder says False at once and another
    daemon takes the role."""
    other = await PostgresStore.open(location)
    try:
        async with store.owner("daemon-a"), other.owner("daemon-b"):
            for _ in range(5):
                assert await store.hold_exporter() is True
            assert await other.hold_exporter() is False
            conn = store._owner_conn
            assert conn is not None
            # One unlock frees it: it was held once, not five times.
            assert await conn.fetchval("SELECT pg_advisory_unlock($1, $2)", *EXPORTER_LOCK)
            assert await other.hold_exporter() is True
            assert await store.hold_exporter() is False  # b has it now: a asks, does not take
            assert await other.hold_exporter() is True

            # b's owner session is cut (a failover, a network fault): b knows it lost the
            # role, and a takes it.
            killed = await fetch(
                location,
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                " WHERE application_name LIKE 'refresherd owner daemon-b-%'",
            )
            assert [r[0] for r in killed] == [True]
            with anyio.fail_after(30):
                while await store.hold_exporter() is False:
                    await anyio.sleep(0.05)
            with anyio.fail_after(30):
                await other.owner_lost()
            try:
                lost = await other.hold_exporter()
            except StoreError:
                lost = False  # a check on the cut connection may fail rather than answer
            assert lost is False
    finally:
        await other.close()


# ---- errors --------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_connection_errors_never_show_the_password(postgres_url: str) -> None:
    # URL-safe, so that the URLs below are well formed whatever the random part holds.
    password = "pw-s3cr3t-" + secrets.token_hex(6)
    server = urlsplit(postgres_url)
    host, port = server.hostname, server.port or 5432
    urls = {
        # nobody listens there
        f"postgresql://postgres:{password}@127.0.0.1:1/refresherd",
        # a database that does not exist
        f"postgresql://postgres:{password}@{host}:{port}/no_such_db_here",
        # the password as a parameter
        f"postgresql://postgres@{host}:{port}/no_such_db_here?password={password}",
    }
    for url in urls:
        location = postgres_location(url)
        assert password not in location.display and password not in repr(location)
        with pytest.raises(StoreError) as info:
            await open_store(location)
        text = f"{info.value}\n{info.value!r}\n{info.value.__cause__!r}"
        assert password not in text
        assert location.display in str(info.value)
        # A server that checks passwords refuses this one first (readonly: not ours to use);
        # one that trusts loopback answers that the database does not exist (unavailable).
        expected = {StorageReason.UNAVAILABLE}
        if ":1/" not in url:
            expected.add(StorageReason.READONLY)
        assert info.value.reason in expected, str(info.value)


@pytest.mark.anyio
async def test_server_errors_carry_neither_row_values_nor_the_detail(
    store: PostgresStore, location: PostgresLocation
) -> None:
    """PostgreSQL's DETAIL quotes the failing row ("Failing row contains (…)"), tokens
    included: only the primary message reaches a StoreError."""
    await fetch(
        location,
        "ALTER TABLE token_sets ADD CONSTRAINT short_tokens CHECK (length(refresh_token) < 20)",
    )
    with pytest.raises(StoreError) as info:
        await store.add(new("long-enough-to-fail"), now=NOW)
    assert not isinstance(info.value, TokenSetExists)
    assert "short_tokens" in str(info.value)
    assert "s3cr3t" not in str(info.value) and "s3cr3t" not in repr(info.value)
    assert info.value.__cause__ is None and info.value.__suppress_context__


# ---- values shared with SQLite: sealed tokens, export and load ---------------------------------


@pytest.mark.anyio
async def test_sealed_values_round_trip_and_compare_and_swap(location: PostgresLocation) -> None:
    cipher = TokenCipher(KEY)
    store = await PostgresStore.open(location, cipher=cipher)
    try:
        await store.add_many([new("a"), new("b")], now=NOW)
        claimed = await store.claim("a", owner=ME, now=NOW, lease_until=NOW + 60)
        assert isinstance(claimed, TokenSet)
        assert claimed.refresh_token.reveal() == "RT-a-s3cr3t"
        grant: dict[str, Any] = {
            "owner": ME,
            "expected_version": 1,
            "access_token": Secret("AT-a2-s3cr3t"),
            "refresh_token": Secret("RT-a2-s3cr3t"),
            "token_type": "Bearer",
            "scope": None,
            "expires_at": NOW + 7200,
            "next_refresh_at": NOW + 7000,
            "now": NOW + 1,
        }
        # The compare opens the stored value: a token that is not the stored one is refused.
        assert await store.save_grant("a", sent_refresh_token=Secret("RT-x"), **grant) is None
        saved = await store.save_grant("a", sent_refresh_token=Secret("RT-a-s3cr3t"), **grant)
        assert saved is not None and saved.refresh_token.reveal() == "RT-a2-s3cr3t"
        assert await store.sealed_key_ids() == {cipher.current_id}
    finally:
        await store.close()
    rows = await fetch(location, "SELECT access_token, refresh_token FROM token_sets")
    for row in rows:
        assert row["refresh_token"].startswith(PREFIX) and row["access_token"].startswith(PREFIX)
        assert "s3cr3t" not in row["refresh_token"] + row["access_token"]
    with pytest.raises(StoreError, match="token values are encrypted"):
        await PostgresStore.open(location)


@pytest.mark.anyio
async def test_a_database_moved_between_backends_opens_with_the_same_key(
    location: PostgresLocation, tmp_path: Path
) -> None:
    """export_rows / load_rows copy values as stored: a sealing names its row and column, not
    the database, so SQLite -> PostgreSQL -> SQLite keeps every token readable under the same
    key, and the hook queue's ids continue after the largest one moved."""
    cipher = TokenCipher(KEY)
    source = await SqliteStore.open(tmp_path / "source.db", cipher=cipher)
    target = await PostgresStore.open(location, cipher=cipher)
    back = await SqliteStore.open(tmp_path / "back.db", cipher=cipher)
    try:
        await source.add_many([new(f"ts-{i:04d}") for i in range(1500)], now=NOW)
        await source.enqueue_hook(
            event_id="e1", event_type="t", payload="{}", targets=["webhook", "command"], now=NOW
        )
        for table in ("token_sets", "hook_deliveries"):
            await target.load_rows(table, source.export_rows(table, batch=400))
        with pytest.raises(StoreError, match="not empty"):
            await target.load_rows("token_sets", source.export_rows("token_sets"))
        got = await target.get("ts-0042")
        assert got is not None and got.refresh_token.reveal() == "RT-ts-0042-s3cr3t"
        await target.enqueue_hook(
            event_id="e2", event_type="t", payload="{}", targets=["webhook"], now=NOW
        )
        assert await target.pending_hooks() == 3
        for table in ("token_sets", "hook_deliveries"):
            await back.load_rows(table, target.export_rows(table, batch=333))
        for table in ("token_sets", "hook_deliveries"):
            exported = [r async for chunk in source.export_rows(table) for r in chunk]
            returned = [r async for chunk in back.export_rows(table) for r in chunk]
            assert returned[: len(exported)] == exported
        again = await back.get("ts-1499")
        assert again is not None and again.access_token == Secret("AT-ts-1499-s3cr3t")
    finally:
        for s in (source, target, back):
            await s.close()


@pytest.mark.anyio
async def test_concurrent_grants_are_each_committed_when_they_return(
    store: PostgresStore, location: PostgresLocation
) -> None:
    await store.add_many([new(f"s{i}") for i in range(64)], now=NOW)
    seen: dict[str, str] = {}
    reader = await asyncpg.create_pool(location.dsn.reveal(), min_size=1, max_size=4)
    try:

        async def one(i: int) -> None:
            saved = await store.save_grant(
                f"s{i}",
                owner=ME,
                expected_version=1,
                sent_refresh_token=Secret(f"RT-s{i}-s3cr3t"),
                access_token=Secret(f"AT-s{i}-2"),
                refresh_token=Secret(f"RT-s{i}-2"),
                token_type="Bearer",
                scope=None,
                expires_at=NOW + 3600,
                next_refresh_at=NOW + 3000,
                now=NOW,
            )
            assert saved is not None
            # Committed the moment it returns: another session sees it.
            seen[f"s{i}"] = await reader.fetchval(
                "SELECT refresh_token FROM token_sets WHERE id = $1", f"s{i}"
            )

        async with anyio.create_task_group() as tg:
            for i in range(64):
                tg.start_soon(one, i)
    finally:
        await reader.close()
    assert seen == {f"s{i}": f"RT-s{i}-2" for i in range(64)}


@pytest.mark.anyio
async def test_a_read_only_database_is_readonly(
    store: PostgresStore, location: PostgresLocation
) -> None:
    """A standby, or a database set read-only: writing fails with READONLY."""
    await store.add(new("a"), now=NOW)
    name = location.display.rsplit("/", 1)[1]
    await fetch(location, f"ALTER DATABASE {name} SET default_transaction_read_only = on")
    # New sessions take the setting: a store opened now cannot even record its schema check.
    with pytest.raises(StoreError) as info:
        await PostgresStore.open(location)
    assert info.value.reason is StorageReason.READONLY, str(info.value)


@pytest.mark.anyio
async def test_a_row_lock_held_too_long_is_locked(
    store: PostgresStore, location: PostgresLocation
) -> None:
    await store.add(new("a"), now=NOW)
    conn = await asyncpg.connect(location.dsn.reveal())
    try:
        async with conn.transaction():
            await conn.execute("SELECT id FROM token_sets WHERE id = 'a' FOR UPDATE")
            # The store waits lock_timeout (postgres.LOCK_TIMEOUT_MS) for the row, then fails.
            with pytest.raises(StoreError) as info:
                await store.claim("a", owner=ME, now=NOW, lease_until=NOW + 60)
            assert info.value.reason is StorageReason.LOCKED, str(info.value)
    finally:
        await conn.close()
    assert isinstance(await store.claim("a", owner=ME, now=NOW, lease_until=NOW + 60), TokenSet)


@pytest.mark.anyio
async def test_a_write_the_server_aborts_to_break_a_deadlock_is_run_again(
    store: PostgresStore, location: PostgresLocation
) -> None:
    """Two multi-row writes locking rows in opposite orders: the server aborts one (40P01),
    which committed nothing; the store runs its statement again instead of pausing storage."""
    await store.add_many([new("a"), new("b")], now=NOW)
    for token_set_id in ("a", "b"):
        await store.claim(token_set_id, owner=ME, now=NOW, lease_until=NOW + 60)
    other = await asyncpg.connect(location.dsn.reveal())
    try:
        transaction = other.transaction()
        await transaction.start()
        await other.execute("UPDATE token_sets SET scope = 'other' WHERE id = 'b'")
        released: list[int] = []

        async def release() -> None:
            released.append(await store.release_all(owner=ME))

        async with anyio.create_task_group() as tg:
            tg.start_soon(release)
            # The store's statement holds "a" and waits for "b"...
            with anyio.fail_after(30):
                while not await fetch(
                    location,
                    "SELECT 1 FROM pg_stat_activity WHERE application_name = 'refresherd'"
                    " AND wait_event_type = 'Lock'",
                ):
                    await anyio.sleep(0.02)
            # ...and now the other session wants "a": a cycle, which the server breaks by
            # aborting the statement that waited first, the store's.
            await other.execute("UPDATE token_sets SET scope = 'other' WHERE id = 'a'")
            await transaction.commit()
        assert released == [2]
    finally:
        await other.close()
    rows = await fetch(location, "SELECT id, scope, lease_owner FROM token_sets ORDER BY id")
    assert [tuple(r) for r in rows] == [("a", "other", None), ("b", "other", None)]


def test_without_asyncpg_a_postgresql_database_is_a_clear_error() -> None:
    """refresherd installed without the postgresql extra: a message, not a traceback."""
    import subprocess
    import sys

    code = (
        "import sys; sys.modules['asyncpg'] = None\n"
        "import anyio\n"
        "from refresherd.store import StoreError, open_store, postgres_location\n"
        "async def main():\n"
        "    try:\n"
        "        await open_store(postgres_location('postgresql://u:pw-x@127.0.0.1/db'))\n"
        "    except StoreError as exc:\n"
        "        print(exc)\n"
        "anyio.run(main)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr
    assert "pip install 'refresherd[postgresql]'" in done.stdout
    assert "postgresql://u@127.0.0.1/db" in done.stdout and "pw-x" not in done.stdout
