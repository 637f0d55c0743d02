"""The store contract against real databases: schema, read contract, leases, journal, CAS.

Tests that take ``store`` or ``raw`` run on both backends (``store_location``: a SQLite file and
a fresh PostgreSQL database); the ones about SQLite's files, pragmas and opening errors take
``db_path`` and run on SQLite only (tests/test_pgstore.py has PostgreSQL's own).
"""

from __future__ import annotations

import os
import shutil
import sqlite3
import stat
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import anyio
import pytest
from conftest import database_at_version

from refresherd.model import Attempt, Secret, State, TokenSet, rfc3339
from refresherd.store import (
    READ_CONTRACT_VIEW,
    ClaimRefused,
    Location,
    NewTokenSet,
    PostgresLocation,
    StoreError,
    TokenSetExists,
    TokenStore,
    open_store,
)
from refresherd.store.migrations import MIGRATIONS, POSTGRES, SCHEMA_VERSION, SQLITE
from refresherd.store.sqlite import MAKE_DUE_WRITTEN_AFTER, SqliteStore

NOW = 1_700_000_000.0
ME = "host-a-101-0a0a0a0a"
OTHER = "host-b-202-0b0b0b0b"
CONTRACT_COLUMNS = [
    "id",
    "provider",
    "access_token",
    "token_type",
    "scope",
    "expires_at",
    "expires_at_rfc3339",
    "state",
    "updated_at",
]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "refresherd.db"


@pytest.fixture
async def sqlite_store(db_path: Path) -> AsyncIterator[SqliteStore]:
    s = await SqliteStore.open(db_path)
    try:
        yield s
    finally:
        await s.close()


@pytest.fixture
async def store(store_location: Location) -> AsyncIterator[TokenStore]:
    s = await open_store(store_location)
    try:
        yield s
    finally:
        await s.close()


class RawDatabase:
    """The database as an application (or an operator) sees it, beside the store: plain SQL
    on a connection of its own. SQL without parameters, valid on both backends."""

    def __init__(self, location: Location) -> None:
        self.location = location
        self.backend = "postgresql" if isinstance(location, PostgresLocation) else "sqlite"

    async def fetch(self, sql: str) -> tuple[list[str], list[dict[str, Any]]]:
        """The column names and the rows of a query."""
        if isinstance(self.location, PostgresLocation):
            import asyncpg

            conn = await asyncpg.connect(self.location.dsn.reveal())
            try:
                statement = await conn.prepare(sql)
                columns = [a.name for a in statement.get_attributes()]
                rows = [dict(r) for r in await statement.fetch()]
            finally:
                await conn.close()
            return columns, rows
        with plain(self.location) as conn:
            cur = conn.execute(sql)
            columns = [d[0] for d in cur.description or ()]
            return columns, [dict(r) for r in cur.fetchall()]

    async def execute(self, sql: str) -> None:
        if isinstance(self.location, PostgresLocation):
            import asyncpg

            conn = await asyncpg.connect(self.location.dsn.reveal())
            try:
                await conn.execute(sql)
            finally:
                await conn.close()
            return
        with plain(self.location) as conn:
            conn.executescript(sql)

    async def value(self, sql: str) -> Any:
        _, rows = await self.fetch(sql)
        return next(iter(rows[0].values())) if rows else None

    async def row(self, token_set_id: str) -> dict[str, Any]:
        _, rows = await self.fetch(f"SELECT * FROM token_sets WHERE id = '{token_set_id}'")
        assert len(rows) == 1, token_set_id
        return rows[0]

    async def tables(self) -> list[str]:
        if self.backend == "postgresql":
            sql = "SELECT tablename FROM pg_tables WHERE schemaname = 'public'"
        else:
            sql = "SELECT name FROM sqlite_master WHERE type = 'table'"
        _, rows = await self.fetch(sql)
        return sorted(next(iter(r.values())) for r in rows)


@pytest.fixture
def raw(store_location: Location) -> RawDatabase:
    return RawDatabase(store_location)


def refresh_value(token_set_id: str) -> str:
    return f"RT-{token_set_id}-s3cr3t-refresh"


def access_value(token_set_id: str) -> str:
    return f"AT-{token_set_id}-s3cr3t-access"


def new(
    token_set_id: str,
    *,
    provider: str = "visma",
    due: float = NOW + 3000,
    access: bool = True,
    expires_at: float | None = NOW + 3600,
    scope: str | None = "openid offline_access",
) -> NewTokenSet:
    return NewTokenSet(
        id=token_set_id,
        provider=provider,
        refresh_token=Secret(refresh_value(token_set_id)),
        access_token=Secret(access_value(token_set_id)) if access else None,
        expires_at=expires_at if access else None,
        next_refresh_at=due,
        token_type="Bearer" if access else None,
        scope=scope,
    )


@contextmanager
def plain(path: Path) -> Iterator[sqlite3.Connection]:
    """A plain sqlite3 connection, as an application reading the database would open one."""
    conn = sqlite3.connect(path, timeout=30, isolation_level=None)
    conn.row_factory = sqlite3.Row
    try:
        yield conn
    finally:
        conn.close()


def raw_row(path: Path, token_set_id: str) -> dict[str, Any]:
    with plain(path) as conn:
        row = conn.execute("SELECT * FROM token_sets WHERE id = ?", (token_set_id,)).fetchone()
    assert row is not None
    return dict(row)


def assert_no_secret(text: str) -> None:
    assert "s3cr3t" not in text, text


async def leased(
    store: TokenStore, token_set_id: str, owner: str = ME, until: float = NOW + 60
) -> TokenSet:
    claimed = await store.claim(token_set_id, owner=owner, now=NOW, lease_until=until)
    assert isinstance(claimed, TokenSet), claimed
    return claimed


async def record_first_failure(
    store: TokenStore,
    token_set_id: str,
    state: State = State.INVALIDATED,
    *,
    error: str = "invalid_grant",
    invalid_reason: str | None = None,
    next_refresh_at: float = NOW,
    now: float = NOW,
    resolve_attempt: bool = True,
) -> bool:
    """``record_failure`` for the first failure of a set ``leased`` by ME (version 1); an
    invalidated set's reason is invalid_grant unless ``invalid_reason`` names another."""
    if invalid_reason is None and state is State.INVALIDATED:
        invalid_reason = "invalid_grant"
    return await store.record_failure(
        token_set_id,
        owner=ME,
        expected_version=1,
        state=state,
        next_refresh_at=next_refresh_at,
        error=error,
        failures=1,
        invalid_reason=invalid_reason,
        now=now,
        resolve_attempt=resolve_attempt,
    )


# ---- lifecycle: schema, files, pragmas --------------------------------------------------------


def test_every_schema_version_exists_in_both_dialects() -> None:
    # Version n has the same tables and columns in SQLite and PostgreSQL (refresherd migrate
    # compares them): a migration written for one dialect only would leave the other behind.
    assert len(SQLITE) == len(POSTGRES) == SCHEMA_VERSION
    assert [m.version for m in MIGRATIONS] == list(range(1, SCHEMA_VERSION + 1))
    for migration in MIGRATIONS:
        assert migration.sqlite.strip() and migration.postgres.strip(), migration.version


def test_choosing_a_store_loads_no_database_driver() -> None:
    # The config loader and check-config parse locations; only open_store loads a backend
    # (asyncpg is an optional extra), and only the one the location names.
    code = (
        "import sys, refresherd.config, refresherd.store\n"
        "loaded = {'aiosqlite', 'asyncpg', 'refresherd.store.sqlite',"
        " 'refresherd.store.postgres'}\n"
        "print(sorted(loaded & set(sys.modules)))"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert proc.stdout.strip() == "[]"


@pytest.mark.anyio
async def test_migrates_an_empty_database(db_path: Path) -> None:
    assert not db_path.exists()
    store = await SqliteStore.open(db_path)
    try:
        assert await store.schema_version() == SCHEMA_VERSION
        await store.ping()
    finally:
        await store.close()
    with plain(db_path) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        names = {r[0] for r in conn.execute("SELECT name FROM sqlite_master")}
    assert {"token_sets", READ_CONTRACT_VIEW, "token_sets_due"} <= names


@pytest.mark.anyio
async def test_the_start_up_clock_step_check_uses_an_index_not_a_scan(db_path: Path) -> None:
    # At a million sets a scan took 3 s of start-up, under the write lock.
    store = await SqliteStore.open(db_path)
    await store.close()
    with plain(db_path) as conn:
        plan = conn.execute(
            "EXPLAIN QUERY PLAN " + MAKE_DUE_WRITTEN_AFTER, {"now": 1.0, "limit": 3.0}
        ).fetchall()
    assert [row[3] for row in plan] == [
        "SEARCH token_sets USING INDEX token_sets_written (updated_at>?)"
    ]


@pytest.mark.anyio
async def test_reopen_is_idempotent_and_keeps_data(
    store_location: Location, raw: RawDatabase
) -> None:
    store = await open_store(store_location)
    await store.add(new("a"), now=NOW)
    await store.close()
    for _ in range(2):
        store = await open_store(store_location, create=False)
        try:
            assert await store.schema_version() == SCHEMA_VERSION
            ts = await store.get("a")
            assert ts is not None and ts.refresh_token.reveal() == refresh_value("a")
        finally:
            await store.close()
    # Each table once: the migrations ran once, not once per open.
    expected = [
        "connect_states",
        "hook_deliveries",
        "hook_events",
        "invalidation_counts",
        "storage_probe",
        "token_sets",
    ]
    if raw.backend == "postgresql":
        expected += ["refresherd_owners", "refresherd_schema"]
    else:
        expected += ["token_set_changes"]  # PostgreSQL tells the token cache by NOTIFY
    assert await raw.tables() == sorted(expected)


@pytest.mark.anyio
async def test_a_newer_schema_is_refused(db_path: Path) -> None:
    with plain(db_path) as conn:
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    with pytest.raises(StoreError) as info:
        await SqliteStore.open(db_path)
    message = str(info.value)
    assert str(db_path) in message
    assert "newer" in message and str(SCHEMA_VERSION + 1) in message
    # refused without touching it
    with plain(db_path) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION + 1
        assert conn.execute("SELECT count(*) FROM sqlite_master").fetchone()[0] == 0


@pytest.mark.anyio
async def test_files_are_private(sqlite_store: SqliteStore, db_path: Path) -> None:
    store = sqlite_store
    await store.add(new("a"), now=NOW)  # a write: the WAL file now exists
    for path in (db_path, Path(f"{db_path}-wal"), Path(f"{db_path}-shm")):
        assert path.exists(), path
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path


@pytest.mark.anyio
async def test_wal_mode_and_synchronous_full(sqlite_store: SqliteStore, db_path: Path) -> None:
    store = sqlite_store
    # journal_mode is a property of the file; synchronous is per connection (the store's own).
    with plain(db_path) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert await store._fetch_value("PRAGMA journal_mode") == "wal"
    assert await store._fetch_value("PRAGMA synchronous") == 2  # FULL


async def _open_into(path: Path, stores: list[SqliteStore], errors: list[StoreError]) -> None:
    try:
        stores.append(await SqliteStore.open(path))
    except StoreError as exc:
        errors.append(exc)


@pytest.mark.anyio
async def test_concurrent_opens_of_a_new_database(tmp_path: Path) -> None:
    """A daemon and a CLI command (or two daemons) opening a new database at the same time:
    leaving rollback-journal mode for WAL must wait for the other, not fail."""
    for trial in range(12):
        path = tmp_path / f"fresh-{trial}.db"
        stores: list[SqliteStore] = []
        errors: list[StoreError] = []
        try:
            async with anyio.create_task_group() as tg:
                for _ in range(8):
                    tg.start_soon(_open_into, path, stores, errors)
            assert errors == []
            for store in stores:
                assert await store.schema_version() == SCHEMA_VERSION
            await stores[0].add(new("a"), now=NOW)
            assert all([await s.get("a") is not None for s in stores])
        finally:
            for store in stores:
                await store.close()


@pytest.mark.anyio
async def test_missing_directory_is_a_store_error_naming_the_path(tmp_path: Path) -> None:
    path = tmp_path / "no" / "such" / "dir" / "refresherd.db"
    with pytest.raises(StoreError) as info:
        await SqliteStore.open(path)
    assert str(path) in str(info.value)
    assert not path.parent.exists()


@pytest.mark.anyio
async def test_missing_file_without_create_is_a_store_error(db_path: Path) -> None:
    with pytest.raises(StoreError) as info:
        await SqliteStore.open(db_path, create=False)
    assert str(db_path) in str(info.value)
    assert not db_path.exists()


@pytest.mark.anyio
async def test_a_file_that_is_not_a_database_is_a_store_error(db_path: Path) -> None:
    db_path.write_bytes(b"this is not an SQLite database, just some bytes\n" * 200)
    with pytest.raises(StoreError) as info:
        await SqliteStore.open(db_path)
    assert str(db_path) in str(info.value)


@pytest.mark.anyio
async def test_a_directory_is_not_a_database(tmp_path: Path) -> None:
    path = tmp_path / "a-directory.db"
    path.mkdir()
    with pytest.raises(StoreError) as info:
        await SqliteStore.open(path)
    assert str(path) in str(info.value)


# A process that may not touch the database: as root, drop to nobody first (root reads all).
# Everything is imported before that (anyio loads its event-loop backend on first run), so
# that the checkout may sit in a directory nobody cannot enter, such as one from mktemp -d.
UNPRIVILEGED_OPEN = r"""
import os, sys
from pathlib import Path
import anyio
from refresherd.store import StoreError
from refresherd.store.sqlite import SqliteStore

anyio.run(anyio.sleep, 0)
if os.geteuid() == 0:
    os.setgid(65534)
    os.setuid(65534)

async def main() -> None:
    try:
        store = await SqliteStore.open(Path(sys.argv[1]), create=sys.argv[2] == "create")
    except StoreError as exc:
        print(f"StoreError: {exc}")
    else:
        await store.close()
        print("opened")

anyio.run(main)
"""


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A directory that other users may pass through (pytest's tmp_path is 0700)."""
    base = Path(tempfile.mkdtemp(prefix="refresherd-test-"))
    base.chmod(0o711)
    try:
        yield base
    finally:
        for path in (base, *base.rglob("*")):
            path.chmod(0o700)
        shutil.rmtree(base)


@pytest.mark.parametrize("where", ["file", "directory"])
@pytest.mark.parametrize("mode", ["create", "existing"])
def test_a_database_we_may_not_open_is_a_clear_store_error(
    shared_dir: Path, where: str, mode: str
) -> None:
    """Run as the wrong user (a CLI command without sudo): one clear StoreError naming the path,
    not "does not exist", and no thread traceback at exit."""
    private = shared_dir / "private"
    private.mkdir(mode=0o700)
    db_path = (shared_dir if where == "file" else private) / "refresherd.db"
    with plain(db_path) as conn:
        conn.execute("CREATE TABLE t (x)")
    db_path.chmod(0o600)
    if os.geteuid() != 0:  # we are an ordinary user already: take our own access away
        (db_path if where == "file" else private).chmod(0)
    proc = subprocess.run(
        [sys.executable, "-c", UNPRIVILEGED_OPEN, str(db_path), mode],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(f"StoreError: database {db_path}: "), proc.stdout
    assert "Permission denied" in proc.stdout
    assert "does not exist" not in proc.stdout and "no such file" not in proc.stdout
    assert "Traceback" not in proc.stderr and "Exception in thread" not in proc.stderr


# ---- the read contract -------------------------------------------------------------------------


@pytest.mark.anyio
async def test_read_contract_view_with_plain_sql_while_open(
    store: TokenStore, raw: RawDatabase
) -> None:
    await store.add_many(
        [new("b", access=False), new("a", expires_at=NOW + 3600.75, scope=None)], now=NOW
    )
    columns, rows = await raw.fetch(f"SELECT * FROM {READ_CONTRACT_VIEW} ORDER BY id")
    assert columns == CONTRACT_COLUMNS
    assert rows == [
        {
            "id": "a",
            "provider": "visma",
            "access_token": access_value("a"),
            "token_type": "Bearer",
            "scope": None,
            "expires_at": NOW + 3600.75,
            "expires_at_rfc3339": rfc3339(NOW + 3600.75),
            "state": "active",
            "updated_at": NOW,
        },
        {
            "id": "b",
            "provider": "visma",
            "access_token": None,
            "token_type": None,
            "scope": "openid offline_access",
            "expires_at": None,
            "expires_at_rfc3339": None,
            "state": "active",
            "updated_at": NOW,
        },
    ]

    # A grant is visible to plain readers as soon as save_grant returns.
    ts = await leased(store, "a")
    await store.save_grant(
        "a",
        owner=ME,
        expected_version=ts.version,
        sent_refresh_token=ts.refresh_token,
        access_token=Secret("AT-new-s3cr3t"),
        refresh_token=Secret("RT-new-s3cr3t"),
        token_type="Bearer",
        scope=None,
        expires_at=NOW + 7200,
        next_refresh_at=NOW + 5000,
        now=NOW + 10,
    )
    _, rows = await raw.fetch(
        f"SELECT access_token, expires_at_rfc3339, updated_at FROM {READ_CONTRACT_VIEW}"
        " WHERE id = 'a'"
    )
    assert tuple(rows[0].values()) == ("AT-new-s3cr3t", rfc3339(NOW + 7200), NOW + 10)


# ---- add, get, page, iterate, remove, counts ---------------------------------------------------


@pytest.mark.anyio
async def test_add_and_get(store: TokenStore) -> None:
    assert await store.add_many([new("a"), new("b", access=False, due=NOW)], now=NOW) == 2
    a = await store.get("a")
    assert a is not None
    assert a.refresh_token == Secret(refresh_value("a"))
    assert a.access_token == Secret(access_value("a"))
    assert (a.state, a.version, a.failures) == (State.ACTIVE, 1, 0)
    assert (a.created_at, a.updated_at, a.next_refresh_at) == (NOW, NOW, NOW + 3000)
    assert (a.expires_at, a.token_type, a.scope) == (NOW + 3600, "Bearer", "openid offline_access")
    assert a.attempt is None and a.lease_owner is None and a.lease_until is None
    b = await store.get("b")
    assert b is not None and b.access_token is None and b.expires_at is None
    assert await store.get("c") is None
    for ts in (a, b):
        assert_no_secret(repr(ts))
        assert_no_secret(str(ts))


@pytest.mark.anyio
async def test_add_many_with_a_duplicate_inside_inserts_nothing(store: TokenStore) -> None:
    with pytest.raises(TokenSetExists) as info:
        await store.add_many([new("a"), new("b"), new("c"), new("b")], now=NOW)
    assert "'b'" in str(info.value)
    assert_no_secret(str(info.value))
    assert await store.page() == []


@pytest.mark.anyio
async def test_add_many_against_existing_rows_inserts_nothing(
    store: TokenStore, raw: RawDatabase
) -> None:
    await store.add(new("m"), now=NOW)
    before = await raw.row("m")
    with pytest.raises(TokenSetExists) as info:
        await store.add_many([new("a"), new("m"), new("z")], now=NOW + 1)
    assert "'m'" in str(info.value)
    assert "exists" in str(info.value)
    assert_no_secret(str(info.value))
    assert [ts.id for ts in await store.page()] == ["m"]
    assert await raw.row("m") == before


@pytest.mark.anyio
async def test_add_one_existing_names_it(store: TokenStore) -> None:
    await store.add(new("customer-7"), now=NOW)
    with pytest.raises(TokenSetExists) as info:
        await store.add(new("customer-7"), now=NOW)
    assert "customer-7" in str(info.value)
    assert_no_secret(str(info.value))
    assert isinstance(info.value, StoreError)


@pytest.mark.anyio
async def test_add_many_large_batch_with_one_conflict_at_the_end(store: TokenStore) -> None:
    await store.add(new("id-01199"), now=NOW)
    batch = [new(f"id-{i:05d}") for i in range(1200)]
    with pytest.raises(TokenSetExists) as info:
        await store.add_many(batch, now=NOW)
    assert "id-01199" in str(info.value)
    assert len(await store.page(limit=5000)) == 1


@pytest.mark.anyio
async def test_add_many_empty(store: TokenStore) -> None:
    assert await store.add_many([], now=NOW) == 0


@pytest.mark.anyio
async def test_keyset_pagination_over_1200_rows(store: TokenStore) -> None:
    ids = [f"ts-{i:05d}" for i in range(1200)]
    # inserted out of order; pages come in id order
    await store.add_many([new(i) for i in reversed(ids)], now=NOW)
    first = await store.page(limit=500)
    assert [t.id for t in first] == ids[:500]
    second = await store.page(after=first[-1].id, limit=500)
    assert [t.id for t in second] == ids[500:1000]
    third = await store.page(after=second[-1].id, limit=500)
    assert [t.id for t in third] == ids[1000:]
    assert await store.page(after=ids[-1]) == []
    # "after" need not be an existing id
    assert [t.id for t in await store.page(after="ts-00499x", limit=2)] == ids[500:502]

    seen = [t.id async for t in store.iterate(page_size=500)]
    assert seen == ids
    assert [t.id async for t in store.iterate(page_size=400)] == ids  # exact multiple
    assert [t.id async for t in store.iterate(page_size=7)] == ids


@pytest.mark.anyio
async def test_iterate_empty(store: TokenStore) -> None:
    assert [t async for t in store.iterate()] == []


@pytest.mark.anyio
async def test_listing_filters_by_state_and_provider_in_the_database(store: TokenStore) -> None:
    """``tokens list --state/--provider``: the database selects (every page full, never a
    page of rows thrown away); ``longest`` gives the table's column widths from the same
    selection."""
    sets = [new(f"v{i:03d}") for i in range(30)] + [
        new(f"okta-{i}", provider="okta") for i in (1, 2)
    ]
    await store.add_many(sets, now=NOW)
    failing = {"v003", "v017", "okta-2"}
    for token_set_id in sorted(failing | {"v020"}):
        await leased(store, token_set_id)
        assert await record_first_failure(
            store,
            token_set_id,
            State.INVALIDATED if token_set_id == "v020" else State.FAILING,
            next_refresh_at=NOW + 60,
            error="http_503: the IdP answered 503" if token_set_id != "v020" else "invalid_grant",
        )

    async def listed(**filters: list[str]) -> list[str]:
        return [t.id async for t in store.iterate(page_size=2, **filters)]

    everyone = [t.id for t in sorted(sets, key=lambda n: n.id)]
    assert await listed() == everyone
    assert await listed(states=["failing"]) == sorted(failing)
    assert await listed(states=["invalidated", "failing"]) == sorted(failing | {"v020"})
    assert await listed(providers=["okta"]) == ["okta-1", "okta-2"]
    assert await listed(providers=["okta"], states=["active"]) == ["okta-1"]
    assert await listed(providers=["nobody"]) == []
    # A page is full whatever the filter leaves out (keyset pagination over the selection).
    assert [t.id for t in await store.page(limit=2, states=["failing"])] == ["okta-2", "v003"]
    page = await store.page(after="v003", limit=5, states=["failing", "active"])
    assert [t.id for t in page] == ["v004", "v005", "v006", "v007", "v008"]

    widths = await store.longest(["id", "provider", "state", "last_error"])
    assert widths == {"id": 6, "provider": 5, "state": 11, "last_error": 30}
    assert await store.longest(["id", "last_error"], states=["active"], providers=["okta"]) == {
        "id": 6,
        "last_error": 0,
    }
    assert await store.longest(["id"], providers=["nobody"]) == {"id": 0}
    # Stored tokens: at least as long as the plain values (sealed ones are longer).
    assert (await store.longest(["refresh_token"]))["refresh_token"] >= len(refresh_value("okta-1"))
    with pytest.raises(ValueError, match="not a text column"):
        await store.longest(["id; DROP TABLE token_sets"])


@pytest.mark.anyio
async def test_remove(store: TokenStore) -> None:
    await store.add_many([new("a"), new("b")], now=NOW)
    assert await store.remove("a") is True
    assert await store.remove("a") is False
    assert await store.remove("never") is False
    assert await store.get("a") is None
    assert [t.id for t in await store.page()] == ["b"]


@pytest.mark.anyio
async def test_counts_by_provider_and_state(store: TokenStore) -> None:
    assert await store.counts() == {}
    await store.add_many(
        [new("a"), new("b"), new("c", provider="okta"), new("d", provider="okta")], now=NOW
    )
    await leased(store, "d")
    await record_first_failure(store, "d", error="invalid_grant: refused")
    assert await store.counts() == {
        ("visma", "active"): 2,
        ("okta", "active"): 1,
        ("okta", "invalidated"): 1,
    }


@pytest.mark.anyio
async def test_expired_counts_active_and_failing_sets_past_their_expiry(store: TokenStore) -> None:
    assert await store.expired_counts(now=NOW) == {}
    await store.add_many(
        [
            new("fresh", expires_at=NOW + 60),
            new("expired", expires_at=NOW - 1),
            new("failing", expires_at=NOW - 600),
            new("gone", expires_at=NOW - 600),
            new("unknown", access=False),  # no access token, no expiry: not "past expiry"
            new("okta-expired", provider="okta", expires_at=NOW - 5),
        ],
        now=NOW - 3600,
    )
    for token_set_id, state in (("failing", State.FAILING), ("gone", State.INVALIDATED)):
        await leased(store, token_set_id)
        assert await record_first_failure(
            store, token_set_id, state, next_refresh_at=NOW + 60, error="oauth_error: no"
        )
    assert await store.expired_counts(now=NOW) == {"visma": 2, "okta": 1}
    # The boundary: a token that expires exactly now is not yet past its expiry.
    assert await store.expired_counts(now=NOW - 5) == {"visma": 1}
    assert await store.expired_counts(now=NOW + 3600) == {"visma": 3, "okta": 1}


@pytest.mark.anyio
async def test_refresh_expiring_once_per_expiry(store: TokenStore) -> None:
    """The expiry watcher's queries: sets whose absolute refresh-token expiry (stated, or
    created + own lifetime, or created + the provider's) is within the horizon, soonest first,
    each until it is marked as warned at that very expiry."""
    day = 86400.0
    await store.add_many(
        [
            NewTokenSet(
                id=name,
                provider="visma",
                refresh_token=Secret(refresh_value(name)),
                access_token=None,
                expires_at=None,
                next_refresh_at=NOW,
                refresh_expires_at=stated,
                refresh_token_lifetime=own,
            )
            for name, stated, own in (
                ("stated", NOW + 2 * day, None),
                ("own", None, 1 * day),
                ("provider", None, None),
                ("far", NOW + 90 * day, None),
            )
        ],
        now=NOW,
    )
    until = NOW + 5 * day
    found = await store.refresh_expiring("visma", lifetime=3 * day, until=until)
    assert [(ts.id, expiry) for ts, expiry in found] == [
        ("own", NOW + day),
        ("stated", NOW + 2 * day),
        ("provider", NOW + 3 * day),
    ]
    assert await store.refresh_expiring_counts({"visma": 3 * day, "okta": None}, until=until) == {
        "visma": 3,
        "okta": 0,
    }
    # Without a provider lifetime, a set with neither a stated nor its own has no known expiry.
    found = await store.refresh_expiring("visma", lifetime=None, until=until, limit=1)
    assert [ts.id for ts, _ in found] == ["own"]
    await store.mark_expiry_warned([("own", NOW + day), ("stated", NOW + 2 * day)])
    found = await store.refresh_expiring("visma", lifetime=3 * day, until=until)
    assert [ts.id for ts, _ in found] == ["provider"]
    # Warned at another expiry than the one it has now: warned again.
    await store.mark_expiry_warned([("provider", NOW + 7 * day)])
    assert [
        ts.id for ts, _ in await store.refresh_expiring("visma", lifetime=3 * day, until=until)
    ] == ["provider"]
    assert (await store.get("own")).expiry_warned_for == NOW + day  # type: ignore[union-attr]
    await store.mark_expiry_warned([])


# ---- claims and leases -------------------------------------------------------------------------


@pytest.mark.anyio
async def test_claim_reads_the_row_under_the_lease(store: TokenStore, raw: RawDatabase) -> None:
    await store.add(new("a"), now=NOW)
    stale = await store.get("a")
    assert stale is not None
    # a sibling rotates the token between our read and our claim
    await raw.execute(
        "UPDATE token_sets SET refresh_token = 'RT-rotated-s3cr3t', version = 2 WHERE id = 'a'"
    )
    claimed = await store.claim("a", owner=ME, now=NOW, lease_until=NOW + 60)
    assert isinstance(claimed, TokenSet)
    assert claimed.version == 2
    assert claimed.refresh_token == Secret("RT-rotated-s3cr3t")
    assert (claimed.lease_owner, claimed.lease_until) == (ME, NOW + 60)
    row = await raw.row("a")
    assert (row["lease_owner"], row["lease_until"]) == (ME, NOW + 60)


@pytest.mark.anyio
async def test_a_second_owner_is_refused(store: TokenStore) -> None:
    await store.add(new("a"), now=NOW)
    await leased(store, "a", ME, until=NOW + 60)
    refused = await store.claim("a", owner=OTHER, now=NOW + 30, lease_until=NOW + 90)
    assert refused == ClaimRefused("leased", owner=ME, until=NOW + 60)
    # at the exact end of the lease it is still ours
    refused = await store.claim("a", owner=OTHER, now=NOW + 60, lease_until=NOW + 120)
    assert isinstance(refused, ClaimRefused) and refused.reason == "leased"
    # the holder may claim again (extends its own lease)
    again = await store.claim("a", owner=ME, now=NOW + 30, lease_until=NOW + 120)
    assert isinstance(again, TokenSet) and again.lease_until == NOW + 120


@pytest.mark.anyio
async def test_an_expired_lease_is_taken(store: TokenStore) -> None:
    await store.add(new("a"), now=NOW)
    await leased(store, "a", ME, until=NOW + 60)
    taken = await store.claim("a", owner=OTHER, now=NOW + 60.5, lease_until=NOW + 120)
    assert isinstance(taken, TokenSet)
    assert (taken.lease_owner, taken.lease_until) == (OTHER, NOW + 120)
    refused = await store.claim("a", owner=ME, now=NOW + 61, lease_until=NOW + 121)
    assert refused == ClaimRefused("leased", owner=OTHER, until=NOW + 120)


@pytest.mark.anyio
async def test_claim_not_found_and_invalidated(store: TokenStore) -> None:
    assert await store.claim("nope", owner=ME, now=NOW, lease_until=NOW + 60) == ClaimRefused(
        "not_found"
    )
    await store.add(new("a"), now=NOW)
    await leased(store, "a")
    await record_first_failure(store, "a")
    assert await store.claim("a", owner=ME, now=NOW, lease_until=NOW + 60) == ClaimRefused(
        "invalidated"
    )


@pytest.mark.anyio
async def test_concurrent_claims_from_two_stores_never_share_a_row(
    store_location: Location,
) -> None:
    first = await open_store(store_location)
    second = await open_store(store_location)
    try:
        await first.add_many([new(f"ts-{i:03d}", due=NOW - i) for i in range(60)], now=NOW)
        results: dict[str, list[str]] = {}
        single: dict[str, object] = {}

        async def batch(store: TokenStore, owner: str) -> None:
            got: list[str] = []
            while True:
                ids = await store.claim_due(owner=owner, now=NOW, lease_until=NOW + 60, limit=7)
                if not ids:
                    break
                got += ids
            results[owner] = got

        async def one(store: TokenStore, owner: str) -> None:
            single[owner] = await store.claim("solo", owner=owner, now=NOW, lease_until=NOW + 60)

        async with anyio.create_task_group() as tg:
            tg.start_soon(batch, first, ME)
            tg.start_soon(batch, second, OTHER)
        assert not set(results[ME]) & set(results[OTHER])
        assert sorted(results[ME] + results[OTHER]) == [f"ts-{i:03d}" for i in range(60)]

        await first.add(new("solo"), now=NOW)
        async with anyio.create_task_group() as tg:
            tg.start_soon(one, first, ME)
            tg.start_soon(one, second, OTHER)
        winners = [o for o, r in single.items() if isinstance(r, TokenSet)]
        assert len(winners) == 1
        loser = OTHER if winners == [ME] else ME
        assert single[loser] == ClaimRefused("leased", owner=winners[0], until=NOW + 60)
    finally:
        await first.close()
        await second.close()


async def _claim_due_fixture(store: TokenStore) -> None:
    await store.add_many(
        [
            new("a", due=NOW - 100),
            new("b", due=NOW - 50),
            new("c", due=NOW - 10),
            new("now", due=NOW),
            new("later", due=NOW + 100),
            new("leased", due=NOW - 200),
            new("expired-lease", due=NOW - 300),
            new("excluded", due=NOW - 400, provider="okta"),
            new("invalid", due=NOW - 500),
        ],
        now=NOW - 1000,
    )
    await leased(store, "leased", OTHER, until=NOW + 60)
    await leased(store, "expired-lease", OTHER, until=NOW - 1)
    await leased(store, "invalid")
    await record_first_failure(store, "invalid", next_refresh_at=NOW - 500, now=NOW - 999)


@pytest.mark.anyio
async def test_claim_due_most_overdue_first_within_limit(
    store: TokenStore, raw: RawDatabase
) -> None:
    await _claim_due_fixture(store)
    kw: dict[str, Any] = {"owner": ME, "now": NOW, "lease_until": NOW + 60}
    assert await store.claim_due(limit=0, exclude_providers=["okta"], **kw) == []
    assert await store.claim_due(limit=3, exclude_providers=["okta"], **kw) == [
        "expired-lease",
        "a",
        "b",
    ]
    for token_set_id in ("expired-lease", "a", "b"):
        row = await raw.row(token_set_id)
        assert (row["lease_owner"], row["lease_until"]) == (ME, NOW + 60)
    # our own leased rows are not handed out twice; the rest of what is due comes next
    assert await store.claim_due(limit=10, exclude_providers=["okta"], **kw) == ["c", "now"]
    assert await store.claim_due(limit=10, exclude_providers=["okta"], **kw) == []
    for token_set_id in ("later", "excluded", "invalid"):
        assert (await raw.row(token_set_id))["lease_owner"] is None
    assert (await raw.row("leased"))["lease_owner"] == OTHER
    # without the exclusion, the other provider's set is due too
    assert await store.claim_due(limit=10, **kw) == ["excluded"]


@pytest.mark.anyio
async def test_claim_due_sets_returns_each_set_as_claim_would(store: TokenStore) -> None:
    """The same selection and lease as claim_due, each set returned as read under the new
    lease: what claim returns, so the refresher can start from it without claiming again."""
    await _claim_due_fixture(store)
    kw: dict[str, Any] = {"owner": ME, "now": NOW, "lease_until": NOW + 60}
    assert await store.claim_due_sets(limit=0, **kw) == []
    sets = await store.claim_due_sets(limit=3, exclude_providers=["okta"], **kw)
    assert [ts.id for ts in sets] == ["expired-lease", "a", "b"]
    for ts in sets:
        assert (ts.lease_owner, ts.lease_until) == (ME, NOW + 60)
        assert ts == await store.get(ts.id)
        # Claiming it again (ours already) reads the same row.
        assert await store.claim(ts.id, owner=ME, now=NOW, lease_until=NOW + 60) == ts
    rest = await store.claim_due_sets(limit=10, exclude_providers=["okta"], **kw)
    assert [ts.id for ts in rest] == ["c", "now"]
    assert await store.claim_due_sets(limit=10, exclude_providers=["okta"], **kw) == []


@pytest.mark.anyio
async def test_claim_due_excludes_several_providers(store: TokenStore) -> None:
    await store.add_many(
        [new(f"{p}-1", provider=p, due=NOW - 1) for p in ("visma", "okta", "auth0", "keycloak")],
        now=NOW,
    )
    ids = await store.claim_due(
        owner=ME, now=NOW, lease_until=NOW + 60, limit=10, exclude_providers=["okta", "auth0"]
    )
    assert sorted(ids) == ["keycloak-1", "visma-1"]


@pytest.mark.anyio
async def test_make_due_written_after_moves_only_rows_written_on_a_clock_ahead(
    store: TokenStore, raw: RawDatabase
) -> None:
    """After the wall clock stepped back an hour: rows written on the old clock are due now;
    rows written since, rows due anyway and invalidated rows are left alone."""
    # "due" was planned so early that it is due on the new clock as well.
    await store.add_many([new("old", due=NOW + 3000), new("due", due=NOW - 3600)], now=NOW)
    await store.add_many([new("new", due=NOW + 30), new("dead", due=NOW + 3000)], now=NOW - 3600)
    await raw.execute(
        f"UPDATE token_sets SET state = 'invalidated', updated_at = {NOW!r} WHERE id = 'dead'"
    )
    stepped = NOW - 3600 + 10  # the clock now, an hour behind the one "old" was written with
    assert await store.make_due_written_after(now=stepped, limit=stepped + 2) == 1
    assert (await raw.row("old"))["next_refresh_at"] == stepped
    assert (await raw.row("due"))["next_refresh_at"] == NOW - 3600
    assert (await raw.row("new"))["next_refresh_at"] == NOW + 30
    assert (await raw.row("dead"))["next_refresh_at"] == NOW + 3000
    # Idempotent: several daemons noticing one step move nothing twice.
    assert await store.make_due_written_after(now=stepped, limit=stepped + 2) == 0


@pytest.mark.anyio
async def test_next_due_at(store: TokenStore) -> None:
    assert await store.next_due_at(now=NOW) is None
    await _claim_due_fixture(store)
    # "invalid" (NOW-500) never; "excluded" (NOW-400) unless excluded; "leased" (NOW-200) is
    # held by a live lease; "expired-lease" (NOW-300) is free again.
    assert await store.next_due_at(now=NOW) == NOW - 400
    assert await store.next_due_at(now=NOW, exclude_providers=["okta"]) == NOW - 300
    await leased(store, "expired-lease", ME, until=NOW + 60)
    assert await store.next_due_at(now=NOW, exclude_providers=["okta"]) == NOW - 100
    assert await store.next_due_at(now=NOW, exclude_providers=["visma", "okta"]) is None
    # once the other owner's lease has lapsed, its set counts again
    assert await store.next_due_at(now=NOW + 61, exclude_providers=["okta"]) == NOW - 300


@pytest.mark.anyio
async def test_renew_lease(store: TokenStore, raw: RawDatabase) -> None:
    await store.add(new("a"), now=NOW)
    await leased(store, "a", ME, until=NOW + 60)
    assert await store.renew_lease("a", owner=ME, lease_until=NOW + 120) is True
    assert (await raw.row("a"))["lease_until"] == NOW + 120
    assert await store.renew_lease("a", owner=OTHER, lease_until=NOW + 999) is False
    assert (await raw.row("a"))["lease_until"] == NOW + 120
    assert await store.renew_lease("missing", owner=ME, lease_until=NOW + 999) is False
    await store.release("a", owner=ME)
    assert await store.renew_lease("a", owner=ME, lease_until=NOW + 999) is False


@pytest.mark.anyio
async def test_release_release_all_clear_leases_of(store: TokenStore, raw: RawDatabase) -> None:
    await store.add_many([new(x) for x in "abcdef"], now=NOW)
    for token_set_id in "abc":
        await leased(store, token_set_id, ME)
    for token_set_id in "de":
        await leased(store, token_set_id, OTHER)
    await leased(store, "f", "third-303-0c0c0c0c")
    assert await store.lease_holders(now=NOW) == {ME, OTHER, "third-303-0c0c0c0c"}

    await store.release("a", owner=OTHER)  # not theirs: nothing happens
    assert (await raw.row("a"))["lease_owner"] == ME
    await store.release("a", owner=ME)
    row = await raw.row("a")
    assert (row["lease_owner"], row["lease_until"]) == (None, None)

    assert await store.release_all(owner=ME) == 2
    assert await store.release_all(owner=ME) == 0
    assert await store.lease_holders(now=NOW) == {OTHER, "third-303-0c0c0c0c"}

    assert await store.clear_leases_of([OTHER, "third-303-0c0c0c0c", "nobody"]) == 3
    assert await store.lease_holders(now=NOW) == set()
    assert all(t.lease_owner is None for t in await store.page())


@pytest.mark.anyio
async def test_lease_holders_only_live_leases(store: TokenStore) -> None:
    await store.add_many([new("a"), new("b")], now=NOW)
    await leased(store, "a", ME, until=NOW + 60)
    await leased(store, "b", OTHER, until=NOW - 1)
    assert await store.lease_holders(now=NOW) == {ME}


@pytest.mark.anyio
async def test_defer_moves_the_plan_later_and_releases(store: TokenStore, raw: RawDatabase) -> None:
    await store.add_many([new("a", due=NOW - 5), new("b", due=NOW + 500)], now=NOW)
    await leased(store, "a")
    await leased(store, "b")
    before = await raw.row("a")
    await store.defer("a", owner=ME, next_refresh_at=NOW + 300)
    await store.defer("b", owner=ME, next_refresh_at=NOW + 300)  # never earlier
    after = await raw.row("a")
    assert after["next_refresh_at"] == NOW + 300
    assert (after["lease_owner"], after["lease_until"]) == (None, None)
    changed = {k for k in before if before[k] != after[k]}
    assert changed == {"next_refresh_at", "lease_owner", "lease_until"}
    assert (await raw.row("b"))["next_refresh_at"] == NOW + 500
    # someone else's lease: untouched
    await leased(store, "a", OTHER)
    await store.defer("a", owner=ME, next_refresh_at=NOW + 900)
    assert (await raw.row("a"))["lease_owner"] == OTHER
    assert (await raw.row("a"))["next_refresh_at"] == NOW + 300


# ---- the exporter of the database-wide figures ---------------------------------------------------


async def eventually(check: Any, *, timeout: float = 10.0) -> None:
    """Poll an async check until it is true: PostgreSQL ends a closed session's locks a moment
    after the client has let go."""
    with anyio.fail_after(timeout):
        while not await check():
            await anyio.sleep(0.02)


@pytest.mark.anyio
async def test_one_owner_of_a_database_holds_the_exporter_role_until_its_registration_ends(
    store: TokenStore, store_location: Location
) -> None:
    """Two stores of one database, as two daemons have (on SQLite, two open files of one
    process conflict as two processes do): the first owner to ask is the exporter, for as long
    as it is registered; then the other one, at its next ask."""
    second = await open_store(store_location)
    try:
        assert await store.hold_exporter() is False  # no owner registration: never
        async with second.owner("daemon-b"):
            async with store.owner("daemon-a"):
                assert await store.hold_exporter() is True
                assert await second.hold_exporter() is False
                for _ in range(3):  # asked every gauge cycle: it stays, and stays alone
                    assert await store.hold_exporter() is True
                    assert await second.hold_exporter() is False
            assert await store.hold_exporter() is False
            await eventually(second.hold_exporter)
            assert await second.hold_exporter() is True
            async with store.owner("daemon-a-again"):
                assert await store.hold_exporter() is False
                assert await second.hold_exporter() is True
        # b's registration ended too: a's new one takes the role.
        async with store.owner("daemon-a-third"):
            await eventually(store.hold_exporter)
    finally:
        await second.close()


EXPORTER_HOLDER = """
import sys, anyio
from pathlib import Path
from refresherd.store.sqlite import SqliteStore

async def main() -> None:
    store = await SqliteStore.open(Path(sys.argv[1]))
    async with store.owner("holder"):
        print(await store.hold_exporter(), flush=True)
        await anyio.sleep(600)

anyio.run(main)
"""


@pytest.mark.anyio
async def test_sqlite_the_exporter_role_passes_on_when_its_holder_is_killed(
    sqlite_store: SqliteStore, db_path: Path
) -> None:
    holder = subprocess.Popen(
        [sys.executable, "-c", EXPORTER_HOLDER, str(db_path)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None
        assert holder.stdout.readline().strip() == "True"
        async with sqlite_store.owner("survivor"):
            assert await sqlite_store.hold_exporter() is False
            holder.kill()  # SIGKILL: no clean-up of its own, the kernel drops its flock
            holder.wait()
            assert await sqlite_store.hold_exporter() is True
            # The lock file is not an owner's: live_owners lists the survivor alone.
            assert {o.split("-")[0] for o in await sqlite_store.live_owners()} == {"survivor"}
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait()
        if holder.stdout is not None:
            holder.stdout.close()


# ---- the journal ---------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_begin_attempt_journals_and_continues_a_series(
    store: TokenStore, raw: RawDatabase
) -> None:
    await store.add(new("a"), now=NOW)
    await leased(store, "a")
    first = await store.begin_attempt("a", owner=ME, version=1, now=NOW, keep_since=NOW - 29)
    assert first == Attempt(version=1, started_at=NOW, owner=ME, sends=1)
    row = await raw.row("a")  # durable: another connection sees it
    assert (row["attempt_version"], row["attempt_started_at"], row["attempt_owner"]) == (
        1,
        NOW,
        ME,
    )
    assert row["attempt_sends"] == 1

    # inside the window: same series, same start, one more send
    second = await store.begin_attempt(
        "a", owner=ME, version=1, now=NOW + 5, keep_since=NOW + 5 - 29
    )
    assert second == Attempt(version=1, started_at=NOW, owner=ME, sends=2)
    assert (await store.get("a")).attempt == second  # type: ignore[union-attr]

    # the window has closed with sends the IdP may have processed: a missed window, and no
    # new series may start on that token
    kw: dict[str, Any] = {"owner": ME, "version": 1, "now": NOW + 40, "keep_since": NOW + 40 - 29}
    assert await store.begin_attempt("a", **kw) is None
    assert (await store.get("a")).attempt == second  # type: ignore[union-attr]

    # once both sends are settled (answers proving the IdP did not process them), the series
    # consumed nothing: a new one starts
    await store.settle_send("a", version=1, started_at=NOW)
    assert (await store.get("a")).attempt == Attempt(  # type: ignore[union-attr]
        version=1, started_at=NOW, owner=ME, sends=2, settled=1
    )
    assert await store.begin_attempt("a", **kw) is None  # one still unsettled
    await store.settle_send("a", version=1, started_at=NOW)
    await store.settle_send("a", version=1, started_at=NOW)  # never past the sends
    assert (await raw.row("a"))["attempt_settled"] == 2
    third = await store.begin_attempt("a", **kw)
    assert third == Attempt(version=1, started_at=NOW + 40, owner=ME, sends=1, settled=0)


@pytest.mark.anyio
async def test_a_settled_series_inside_its_window_starts_afresh(store: TokenStore) -> None:
    """Every send settled: the IdP never saw the token, so its window has not begun either."""
    await store.add(new("a"), now=NOW)
    await leased(store, "a")
    await store.begin_attempt("a", owner=ME, version=1, now=NOW, keep_since=NOW - 29)
    await store.settle_send("a", version=1, started_at=NOW)
    again = await store.begin_attempt(
        "a", owner=ME, version=1, now=NOW + 2, keep_since=NOW + 2 - 29
    )
    assert again == Attempt(version=1, started_at=NOW + 2, owner=ME, sends=1)
    # a settle keyed on the old series does not touch the new one
    await store.settle_send("a", version=1, started_at=NOW)
    assert (await store.get("a")).attempt == again  # type: ignore[union-attr]


@pytest.mark.anyio
async def test_begin_attempt_without_a_grace_window_always_starts_a_series(
    store: TokenStore,
) -> None:
    await store.add(new("a"), now=NOW)
    await leased(store, "a")
    for i in range(3):
        attempt = await store.begin_attempt("a", owner=ME, version=1, now=NOW + i, keep_since=None)
        assert attempt == Attempt(version=1, started_at=NOW + i, owner=ME, sends=1)


@pytest.mark.anyio
async def test_begin_attempt_refused_without_our_lease(store: TokenStore, raw: RawDatabase) -> None:
    await store.add(new("a"), now=NOW)
    kw: dict[str, Any] = {"version": 1, "now": NOW, "keep_since": NOW - 29}
    assert await store.begin_attempt("a", owner=ME, **kw) is None  # no lease at all
    await leased(store, "a", OTHER)
    assert await store.begin_attempt("a", owner=ME, **kw) is None  # someone else's
    assert (await raw.row("a"))["attempt_started_at"] is None
    assert await store.begin_attempt("missing", owner=ME, **kw) is None


@pytest.mark.anyio
async def test_begin_attempt_refused_when_the_version_moved(
    store: TokenStore, raw: RawDatabase
) -> None:
    await store.add(new("a"), now=NOW)
    await leased(store, "a")
    await raw.execute("UPDATE token_sets SET version = 2 WHERE id = 'a'")
    assert await store.begin_attempt("a", owner=ME, version=1, now=NOW, keep_since=NOW - 29) is None
    assert (await raw.row("a"))["attempt_started_at"] is None


@pytest.mark.anyio
async def test_begin_attempt_refused_when_invalidated(store: TokenStore, raw: RawDatabase) -> None:
    await store.add(new("a"), now=NOW)
    await leased(store, "a")
    # Invalidated behind our back while our lease stays in place (only possible by hand).
    await raw.execute("UPDATE token_sets SET state = 'invalidated' WHERE id = 'a'")
    assert await store.begin_attempt("a", owner=ME, version=1, now=NOW, keep_since=NOW - 29) is None


@pytest.mark.anyio
async def test_a_successor_continues_a_dead_owners_series(store: TokenStore) -> None:
    """Crash recovery: the journal outlives its owner, and the grace window is counted from the
    first send, whoever made it."""
    await store.add(new("a"), now=NOW)
    await leased(store, "a", OTHER)
    await store.begin_attempt("a", owner=OTHER, version=1, now=NOW, keep_since=NOW - 29)
    assert await store.unresolved_attempts(since=NOW - 29) == [("a", OTHER)]
    assert await store.clear_leases_of([OTHER]) == 1
    await leased(store, "a", ME)
    attempt = await store.begin_attempt(
        "a", owner=ME, version=1, now=NOW + 3, keep_since=NOW + 3 - 29
    )
    assert attempt == Attempt(version=1, started_at=NOW, owner=ME, sends=2)


@pytest.mark.anyio
async def test_unresolved_attempts_since(store: TokenStore) -> None:
    await store.add_many([new(x) for x in ("old", "mid", "new", "none", "dead")], now=NOW)
    for token_set_id, started in (("new", NOW), ("old", NOW - 100), ("mid", NOW - 10)):
        await leased(store, token_set_id)
        await store.begin_attempt(
            token_set_id, owner=ME, version=1, now=started, keep_since=float("inf")
        )
    await leased(store, "dead")
    await store.begin_attempt("dead", owner=ME, version=1, now=NOW - 5, keep_since=float("inf"))
    # Even with the journal kept, an invalidated set is not retried.
    await record_first_failure(store, "dead", resolve_attempt=False)

    async def ids(since: float) -> list[str]:
        attempts = await store.unresolved_attempts(since=since)
        assert {owner for _, owner in attempts} <= {ME}
        return [token_set_id for token_set_id, _ in attempts]

    assert await ids(NOW - 50) == ["mid", "new"]
    assert await ids(NOW - 10) == ["mid", "new"]
    assert await ids(NOW - 1000) == ["old", "mid", "new"]
    assert await ids(NOW + 1) == []


# ---- save_grant: compare-and-swap ----------------------------------------------------------------


async def _in_flight(store: TokenStore, token_set_id: str = "a") -> TokenSet:
    """A set that failed once, is leased by us and has a journaled attempt."""
    await store.add(new(token_set_id), now=NOW - 100)
    await leased(store, token_set_id)
    await store.begin_attempt(token_set_id, owner=ME, version=1, now=NOW - 50, keep_since=0)
    await store.record_failure(
        token_set_id,
        owner=ME,
        expected_version=1,
        state=State.FAILING,
        next_refresh_at=NOW,
        error="timeout: no answer",
        failures=3,
        invalid_reason=None,
        now=NOW - 40,
        resolve_attempt=False,
    )
    ts = await leased(store, token_set_id)
    await store.begin_attempt(token_set_id, owner=ME, version=1, now=NOW, keep_since=NOW - 29)
    current = await store.get(token_set_id)
    assert current is not None and current.attempt is not None
    assert current.state is State.FAILING and current.failures == 3
    return ts


async def _save(
    store: TokenStore,
    version: int,
    *,
    scope: str | None = None,
    owner: str = ME,
    read_back: bool = True,
) -> Any:
    return await store.save_grant(
        "a",
        owner=owner,
        expected_version=version,
        sent_refresh_token=Secret(refresh_value("a")),
        access_token=Secret("AT-granted-s3cr3t"),
        refresh_token=Secret("RT-granted-s3cr3t"),
        token_type="bearer",
        scope=scope,
        expires_at=NOW + 3605,
        next_refresh_at=NOW + 2900,
        now=NOW + 5,
        read_back=read_back,
    )


@pytest.mark.anyio
async def test_save_grant_with_a_stale_version_writes_nothing(
    store: TokenStore, raw: RawDatabase
) -> None:
    await _in_flight(store)
    before = await raw.row("a")
    assert await _save(store, version=2) is None
    assert await _save(store, version=0) is None
    assert await raw.row("a") == before
    assert await raw.value("SELECT count(*) FROM token_sets WHERE id != 'a'") == 0


@pytest.mark.anyio
async def test_save_grant_success(store: TokenStore, raw: RawDatabase) -> None:
    ts = await _in_flight(store)
    saved = await _save(store, version=ts.version)
    assert isinstance(saved, TokenSet)
    assert saved.version == ts.version + 1
    assert saved.refresh_token == Secret("RT-granted-s3cr3t")
    assert saved.access_token == Secret("AT-granted-s3cr3t")
    assert (saved.token_type, saved.scope) == ("bearer", "openid offline_access")  # scope kept
    assert (saved.expires_at, saved.next_refresh_at) == (NOW + 3605, NOW + 2900)
    assert (saved.state, saved.failures, saved.last_error, saved.invalid_reason) == (
        State.ACTIVE,
        0,
        None,
        None,
    )
    assert (saved.updated_at, saved.last_refresh_at, saved.created_at) == (
        NOW + 5,
        NOW + 5,
        NOW - 100,
    )
    assert saved.attempt is None
    assert (saved.lease_owner, saved.lease_until) == (None, None)
    assert saved == await store.get("a")
    row = await raw.row("a")
    assert row["refresh_token"] == "RT-granted-s3cr3t"
    assert all(
        row[c] is None
        for c in ("attempt_version", "attempt_started_at", "attempt_owner", "attempt_sends")
    )
    assert_no_secret(repr(saved))
    # the same version cannot be saved twice
    assert await _save(store, version=ts.version) is None


@pytest.mark.anyio
async def test_save_grant_without_reading_back_stores_the_same_and_says_only_that(
    store: TokenStore, raw: RawDatabase, tmp_path: Path
) -> None:
    """What a scheduled refresh stores with (nobody reads its result): the same compare-and-
    swap, the same row, True instead of the row; None when the set moved on."""
    ts = await _in_flight(store)
    assert await _save(store, version=ts.version + 1, read_back=False) is None
    assert await _save(store, version=ts.version, read_back=False) is True
    stored = await store.get("a")
    assert stored is not None and stored.version == ts.version + 1
    assert stored.refresh_token == Secret("RT-granted-s3cr3t")
    assert (stored.state, stored.attempt, stored.lease_owner) == (State.ACTIVE, None, None)
    assert await _save(store, version=ts.version, read_back=False) is None  # not twice
    # And with the token columns sealed (their compare-and-swap reads the stored form first).
    from refresherd.encryption import TokenCipher, new_key_text

    cipher = TokenCipher(Secret(new_key_text()))
    sealed = await SqliteStore.open(tmp_path / "sealed.db", cipher=cipher)
    try:
        ts = await _in_flight(sealed)
        assert await _save(sealed, version=ts.version, read_back=False) is True
        stored = await sealed.get("a")
        assert stored is not None and stored.refresh_token == Secret("RT-granted-s3cr3t")
        assert await _save(sealed, version=ts.version, read_back=False) is None
    finally:
        await sealed.close()


@pytest.mark.anyio
async def test_save_grant_keeps_a_lease_that_is_not_ours(store: TokenStore) -> None:
    """Our lease lapsed and another owner took the row while our request was out: the version
    still proves our grant is the newest, and their lease stays theirs."""
    ts = await _in_flight(store)
    taken = await store.claim("a", owner=OTHER, now=NOW + 1000, lease_until=NOW + 1060)
    assert isinstance(taken, TokenSet)
    saved = await _save(store, version=ts.version, scope="openid")
    assert saved is not None and saved.scope == "openid"
    assert (saved.lease_owner, saved.lease_until) == (OTHER, NOW + 1060)


@pytest.mark.anyio
async def test_save_grant_after_removal_is_none(store: TokenStore) -> None:
    ts = await _in_flight(store)
    assert await store.remove("a")
    assert await _save(store, version=ts.version) is None
    assert await store.get("a") is None


# ---- record_failure ---------------------------------------------------------------------------


async def _fail(store: TokenStore, *, version: int = 1, resolve: bool, **kw: Any) -> bool:
    args: dict[str, Any] = {
        "owner": ME,
        "expected_version": version,
        "state": State.FAILING,
        "next_refresh_at": NOW + 77,
        "error": "timeout: no answer within 10s",
        "failures": 4,
        "invalid_reason": None,
        "now": NOW + 1,
        "resolve_attempt": resolve,
    }
    args.update(kw)
    return await store.record_failure("a", **args)


@pytest.mark.anyio
async def test_record_failure_keeps_the_journal_unless_resolved(store: TokenStore) -> None:
    await store.add(new("a"), now=NOW)
    await leased(store, "a")
    attempt = await store.begin_attempt("a", owner=ME, version=1, now=NOW, keep_since=NOW - 29)
    assert await _fail(store, resolve=False) is True
    ts = await store.get("a")
    assert ts is not None
    assert ts.attempt == attempt
    assert (ts.state, ts.next_refresh_at, ts.failures) == (State.FAILING, NOW + 77, 4)
    assert (ts.last_error, ts.updated_at, ts.version) == (
        "timeout: no answer within 10s",
        NOW + 1,
        1,
    )
    assert (ts.lease_owner, ts.lease_until) == (None, None)
    assert ts.refresh_token == Secret(refresh_value("a"))  # tokens kept

    await leased(store, "a")
    assert await _fail(store, resolve=True, failures=5) is True
    ts = await store.get("a")
    assert ts is not None and ts.attempt is None and ts.failures == 5


@pytest.mark.anyio
async def test_record_failure_invalidates(store: TokenStore) -> None:
    await store.add(new("a"), now=NOW)
    await leased(store, "a")
    assert await _fail(
        store,
        resolve=True,
        state=State.INVALIDATED,
        invalid_reason="invalid_grant_after_unresolved_attempt",
    )
    ts = await store.get("a")
    assert ts is not None
    assert (ts.state, ts.invalid_reason) == (
        State.INVALIDATED,
        "invalid_grant_after_unresolved_attempt",
    )
    assert await store.next_due_at(now=NOW + 10_000) is None
    assert await store.claim_due(owner=ME, now=NOW + 10_000, lease_until=NOW + 1, limit=9) == []


@pytest.mark.anyio
async def test_record_failure_with_a_stale_version_writes_nothing(
    store: TokenStore, raw: RawDatabase
) -> None:
    await store.add(new("a"), now=NOW)
    await leased(store, "a")
    before = await raw.row("a")
    assert await _fail(store, version=2, resolve=True) is False
    assert await raw.row("a") == before


@pytest.mark.anyio
async def test_record_failure_bounds_the_error(store: TokenStore) -> None:
    await store.add(new("a"), now=NOW)
    await leased(store, "a")
    assert await _fail(store, resolve=False, error="x" * 5000) is True
    ts = await store.get("a")
    assert ts is not None
    assert ts.last_error == "x" * 500
    assert ts.lease_owner is None


@pytest.mark.anyio
async def test_record_failure_without_our_lease_writes_nothing(
    store: TokenStore, raw: RawDatabase
) -> None:
    """A worker whose lease lapsed (paused, storage trouble) must not overwrite the state or
    clear the journal of the worker that took over."""
    await store.add(new("a"), now=NOW)
    await leased(store, "a", OTHER)
    await store.begin_attempt("a", owner=OTHER, version=1, now=NOW, keep_since=NOW - 29)
    before = await raw.row("a")
    assert await _fail(store, resolve=True, state=State.INVALIDATED) is False
    assert await raw.row("a") == before


# ---- change signal -----------------------------------------------------------------------------


@pytest.mark.anyio
async def test_data_version_changes_after_another_connections_commit(
    store: TokenStore, raw: RawDatabase
) -> None:
    start = await store.data_version()
    await store.add(new("own"), now=NOW)
    if raw.backend == "sqlite":
        # SQLite: our own commits are not news (PostgreSQL's counter moves for every writer).
        assert await store.data_version() == start
    start = await store.data_version()
    await raw.execute(
        "INSERT INTO token_sets (id, provider, refresh_token, next_refresh_at, created_at,"
        " updated_at) VALUES ('ext', 'visma', 'RT-ext-s3cr3t', 0, 0, 0)"
    )
    changed = await store.data_version()
    assert changed != start
    assert await store.data_version() == changed
    other = await open_store(raw.location)
    try:
        await other.add(new("from-other-store"), now=NOW)
    finally:
        await other.close()
    assert await store.data_version() != changed
    assert {t.id for t in await store.page()} == {"own", "ext", "from-other-store"}


# ---- no secrets in errors ----------------------------------------------------------------------


@pytest.mark.anyio
async def test_store_errors_never_carry_token_values(store: TokenStore, raw: RawDatabase) -> None:
    await store.add(new("a"), now=NOW)
    ts = await leased(store, "a")
    messages: list[str] = []
    for batch in ([new("a")], [new("b"), new("b")]):
        with pytest.raises(TokenSetExists) as exists:
            await store.add_many(batch, now=NOW)
        messages += [str(exists.value), repr(exists.value)]
    # Writes that the database itself refuses (an operator's trigger, say): the bound token
    # values must not travel into the error.
    if raw.backend == "sqlite":
        await raw.execute(
            "CREATE TRIGGER no_writes BEFORE UPDATE ON token_sets"
            " BEGIN SELECT RAISE(ABORT, 'writes are frozen'); END;"
            "CREATE TRIGGER no_inserts BEFORE INSERT ON token_sets"
            " BEGIN SELECT RAISE(ABORT, 'inserts are frozen'); END;"
        )
    else:
        await raw.execute(
            "CREATE FUNCTION refuse() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN"
            " RAISE EXCEPTION '% are frozen', TG_ARGV[0]; END $$;"
            "CREATE TRIGGER no_writes BEFORE UPDATE ON token_sets"
            " FOR EACH ROW EXECUTE FUNCTION refuse('writes');"
            "CREATE TRIGGER no_inserts BEFORE INSERT ON token_sets"
            " FOR EACH ROW EXECUTE FUNCTION refuse('inserts');"
        )
    with pytest.raises(StoreError) as info:
        await store.save_grant(
            "a",
            owner=ME,
            expected_version=ts.version,
            sent_refresh_token=ts.refresh_token,
            access_token=Secret("AT-frozen-s3cr3t"),
            refresh_token=Secret("RT-frozen-s3cr3t"),
            token_type=None,
            scope=None,
            expires_at=None,
            next_refresh_at=NOW,
            now=NOW,
        )
    assert "writes are frozen" in str(info.value) and store.location in str(info.value)
    messages += [str(info.value), repr(info.value)]
    # a constraint failure that is not a duplicate id is a StoreError, not TokenSetExists
    with pytest.raises(StoreError) as insert:
        await store.add_many([new("fresh-1"), new("fresh-2")], now=NOW)
    assert not isinstance(insert.value, TokenSetExists)
    assert "inserts are frozen" in str(insert.value)
    messages += [str(insert.value), repr(insert.value)]
    for message in messages:
        assert_no_secret(message)
    assert await store.get("fresh-1") is None


@pytest.mark.anyio
async def test_hook_queue_claims_retries_and_finishes(store: TokenStore) -> None:
    await store.enqueue_hook(
        event_id="e1",
        event_type="token_set.invalidated",
        payload="{}",
        targets=["webhook", "command"],
        now=NOW,
    )
    # The same event queued again (a retried enqueue) is one delivery per target still.
    await store.enqueue_hook(
        event_id="e1",
        event_type="token_set.invalidated",
        payload="{}",
        targets=["webhook"],
        now=NOW,
    )
    assert await store.pending_hooks() == 2
    claimed = await store.claim_hook_deliveries(now=NOW, until=NOW + 30, limit=10)
    assert [(d.event_id, d.target, d.attempts) for d in claimed] == [
        ("e1", "webhook", 1),
        ("e1", "command", 1),
    ]
    # Claimed: invisible until the claim lapses (a dead dispatcher's claim does).
    assert await store.claim_hook_deliveries(now=NOW + 29, until=NOW + 60, limit=10) == []
    webhook, command = claimed
    await store.hook_delivered(webhook.id, now=NOW + 1)
    await store.hook_failed(command.id, error="exit status 3", next_attempt_at=NOW + 5, now=NOW + 1)
    assert await store.next_hook_due() == NOW + 5
    [again] = await store.claim_hook_deliveries(now=NOW + 5, until=NOW + 35, limit=10)
    assert (again.id, again.attempts) == (command.id, 2)
    await store.hook_failed(command.id, error="exit status 3", next_attempt_at=None, now=NOW + 6)
    assert await store.pending_hooks() == 0
    assert await store.next_hook_due() is None
    assert await store.claim_hook_deliveries(now=NOW + 1e6, until=NOW + 2e6, limit=10) == []


@pytest.mark.anyio
async def test_a_column_sqlite_cannot_decode_is_not_quoted_in_the_error(tmp_path: Path) -> None:
    """sqlite3 quotes the raw text of a column it cannot decode; for a token column that is a
    secret, and StoreError messages reach the log."""
    store = await SqliteStore.open(tmp_path / "t.db")
    try:
        await store.add(new("a"), now=NOW)
        secret = "rt-secret-" + "x" * 20
        with sqlite3.connect(tmp_path / "t.db") as conn:
            conn.execute(
                "UPDATE token_sets SET refresh_token = CAST(? AS TEXT) WHERE id = 'a'",
                (secret.encode() + b"\xff\xfe",),
            )
        with pytest.raises(StoreError) as caught:
            await store.get("a")
        assert secret not in str(caught.value) and "[redacted]" in str(caught.value)
    finally:
        await store.close()


@pytest.mark.anyio
async def test_events_are_taken_once_into_the_hook_queue_and_old_ones_pruned(
    store: TokenStore,
) -> None:
    """Events are queued with no targets (any process); a dispatcher takes them, oldest first,
    into one delivery per target of its own, dropping the types it does not want."""
    for event_id, event_type, at in (
        ("e1", "token_set.invalidated", NOW),
        ("e2", "refresh_token.expiring", NOW + 1),
        ("e1", "token_set.invalidated", NOW + 2),  # queued again: kept once
    ):
        await store.enqueue_event(event_id=event_id, event_type=event_type, payload="{}", now=at)
    assert await store.pending_hooks() == 0
    wanted = ["token_set.invalidated"]
    targets = ["webhook", "command"]
    assert await store.expand_events(targets=targets, event_types=wanted, now=NOW + 5, limit=1) == 1
    assert await store.expand_events(targets=targets, event_types=wanted, now=NOW + 5, limit=9) == 1
    assert await store.expand_events(targets=targets, event_types=wanted, now=NOW + 5, limit=9) == 0
    claimed = await store.claim_hook_deliveries(now=NOW + 5, until=NOW + 35, limit=10)
    # The give-up age counts from the event, not from when it was taken.
    assert sorted((d.event_id, d.target, d.created_at) for d in claimed) == [
        ("e1", "command", NOW),
        ("e1", "webhook", NOW),
    ]
    for delivery in claimed:
        await store.hook_delivered(delivery.id, now=NOW + 6)
    # An event no dispatcher takes, and finished deliveries, go once older than the limit.
    await store.enqueue_event(
        event_id="e3", event_type="token_set.recovered", payload="{}", now=NOW
    )
    assert await store.prune_events(before=NOW + 6) == (1, 0)
    assert await store.prune_events(before=NOW + 7) == (0, 2)
    assert await store.expand_events(targets=targets, event_types=(), now=NOW + 8, limit=9) == 0


@pytest.mark.anyio
async def test_invalidations_are_counted_in_the_database(store: TokenStore) -> None:
    """By the invalidating statement itself, whichever process runs it; never decreasing."""
    assert await store.invalidation_counts() == {}
    await store.add_many([new("a"), new("b"), new("c"), new("d", provider="okta")], now=NOW)
    for token_set_id, state, reason in (
        ("a", State.INVALIDATED, "invalid_grant"),
        ("b", State.FAILING, None),
        ("c", State.INVALIDATED, "grace_window_missed"),
        ("d", State.INVALIDATED, "invalid_grant"),
    ):
        await leased(store, token_set_id)
        assert await record_first_failure(
            store, token_set_id, state, error="refused", invalid_reason=reason
        )
    expected = {
        ("visma", "invalid_grant"): 1,
        ("visma", "grace_window_missed"): 1,
        ("okta", "invalid_grant"): 1,
    }
    assert await store.invalidation_counts() == expected
    # Removing an invalidated set (the customer is gone) does not uncount it.
    assert await store.remove("a")
    assert await store.invalidation_counts() == expected


@pytest.mark.anyio
async def test_the_migration_counts_the_sets_invalidated_before_it(tmp_path: Path) -> None:
    path = tmp_path / "tokens.db"
    conn = database_at_version(path, 7)  # the schema before invalidation_counts
    try:
        for n, (state, reason) in enumerate(
            [("invalidated", "invalid_grant"), ("invalidated", None), ("active", None)]
        ):
            conn.execute(
                "INSERT INTO token_sets (id, provider, refresh_token, state, invalid_reason,"
                " next_refresh_at, created_at, updated_at) VALUES (?, 'p', 'rt', ?, ?, 0, 0, 0)",
                (f"s{n}", state, reason),
            )
        conn.commit()
    finally:
        conn.close()
    store = await SqliteStore.open(path)
    try:
        assert await store.invalidation_counts() == {("p", "invalid_grant"): 1, ("p", "unknown"): 1}
    finally:
        await store.close()
