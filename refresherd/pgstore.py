"""The PostgreSQL store: the same contract as :class:`refresherd.store.Store`, for a fleet.

Several daemons on several hosts share one database. What SQLite gets from one writer at a
time, PostgreSQL gets from row locks and READ COMMITTED: every conditional write (claim,
journal, grant, failure, lease renewal) keeps all its conditions in the ``UPDATE``'s ``WHERE``,
which PostgreSQL re-checks on the latest committed version of a row it had to wait for, so each
one is a compare-and-swap. Batched claims take rows ``FOR UPDATE SKIP LOCKED``: daemons
claiming together never get the same row and never wait for each other.

- Connections: an asyncpg pool (``pool_size``); each write is one autocommit statement (or one
  short transaction) on its own connection, so concurrent writes commit in parallel and the
  server flushes their WAL together (group commit, with no batching of ours to fail together).
- Writes are shielded from cancellation, as in store.py: one that may have committed is never
  abandoned half-way. ``command_timeout`` bounds them instead (an unreachable server).
- Owners: a session-level advisory lock on a dedicated connection, held for the life of
  :meth:`PostgresStore.owner`; the server drops it when that session ends, however it ends.
- Errors are StoreError with a StorageReason (storage_health.classify_postgres); a message names
  the database by its URL without the password and carries only PostgreSQL's primary message,
  never its DETAIL (which quotes row values, tokens included).
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import re
import secrets
import socket
import time
from collections.abc import AsyncIterator, Iterable, Iterator, Sequence
from contextlib import asynccontextmanager
from typing import Any, Final, TypeAlias
from urllib.parse import parse_qsl, unquote, urlsplit

import anyio
import asyncpg

from refresherd.encryption import EncryptionError, TokenCipher
from refresherd.model import Attempt, Secret, State, TokenSet
from refresherd.ownership import new_owner_id
from refresherd.storage_health import classify_postgres
from refresherd.store import _row_plain, _row_to_token_set, _table_columns
from refresherd.store_contract import (
    JOURNAL_SEND_SQL,
    SERIES_MISSED_SQL,
    ClaimRefused,
    HookDelivery,
    NewTokenSet,
    PostgresLocation,
    Row,
    StoreError,
    TokenSetExists,
    check_keys,
    claim_refusal,
    first_conflict,
)

__all__ = ["MIGRATIONS", "SCHEMA_VERSION", "PostgresStore"]

DEFAULT_POOL_SIZE: Final = 10
CONNECT_TIMEOUT: Final = 10.0
# A statement that has not answered by then fails (StorageReason.UNAVAILABLE): a shielded write
# must not wait for ever on a server that is gone. Bulk loads get BULK_TIMEOUT instead.
COMMAND_TIMEOUT: Final = 30.0
BULK_TIMEOUT: Final = 3600.0
# Waiting for a row lock longer than this is an error (LOCKED), as SQLite's busy timeout is.
LOCK_TIMEOUT_MS: Final = 5000
DEADLOCK_RETRIES: Final = 3
# How often the owner connection is checked, and how long a check may take before the owner
# registration counts as lost.
OWNER_CHECK_INTERVAL: Final = 5.0
OWNER_CHECK_TIMEOUT: Final = 10.0
# Advisory lock keys are (class, key) pairs of int4; refresherd's classes, picked at random.
MIGRATION_LOCK: Final = (0x52464401, 0)
OWNER_LOCK_CLASS: Final = 0x52464402
_CHUNK: Final = 5000

# A connection of our own or one lent by the pool: the same methods.
_Conn: TypeAlias = (
    "asyncpg.Connection[asyncpg.Record] | asyncpg.pool.PoolConnectionProxy[asyncpg.Record]"
)

# Each entry moves the schema from version i to i+1 (the one row of refresherd_schema). The
# numbering matches store.MIGRATIONS (version n has the same tables and columns in both), so
# that ``refresherd migrate`` can compare them; PostgreSQL's own bookkeeping (owners, the
# change counter) comes with version 1. Never edit a released entry: append a new one.
MIGRATIONS: Final[tuple[str, ...]] = (
    """
    CREATE TABLE token_sets (
        -- "C": ids sort by their bytes, as in SQLite (keyset pagination, export order).
        id text COLLATE "C" PRIMARY KEY NOT NULL,
        provider text NOT NULL,
        access_token text,
        refresh_token text NOT NULL,
        token_type text,
        scope text,
        expires_at double precision,
        state text NOT NULL DEFAULT 'active'
            CHECK (state IN ('active', 'failing', 'invalidated')),
        version bigint NOT NULL DEFAULT 1,
        next_refresh_at double precision NOT NULL,
        created_at double precision NOT NULL,
        updated_at double precision NOT NULL,
        last_refresh_at double precision,
        last_error text,
        failures integer NOT NULL DEFAULT 0,
        invalid_reason text,
        lease_owner text,
        lease_until double precision,
        attempt_version bigint,
        attempt_started_at double precision,
        attempt_owner text,
        attempt_sends integer
    );
    CREATE INDEX token_sets_due ON token_sets (next_refresh_at) WHERE state <> 'invalidated';
    CREATE INDEX token_sets_leased ON token_sets (lease_owner) WHERE lease_owner IS NOT NULL;
    CREATE INDEX token_sets_journal ON token_sets (attempt_started_at)
        WHERE attempt_started_at IS NOT NULL;
    -- The read contract for applications that read access tokens straight from the database.
    -- Columns are only ever added to this view, never renamed or removed.
    CREATE VIEW refresherd_access_tokens AS
        SELECT id, provider, access_token, token_type, scope, expires_at,
               to_char(to_timestamp(expires_at) AT TIME ZONE 'UTC',
                       'YYYY-MM-DD"T"HH24:MI:SS"Z"') AS expires_at_rfc3339,
               state, updated_at
        FROM token_sets;
    -- Lease owners: each holds the session-level advisory lock (OWNER_LOCK_CLASS, lock_key)
    -- for as long as it lives; the lock free means the owner is gone.
    CREATE TABLE refresherd_owners (
        owner text PRIMARY KEY NOT NULL,
        lock_key integer NOT NULL UNIQUE,
        host text NOT NULL,
        pid integer NOT NULL,
        started_at double precision NOT NULL
    );
    -- The change signal (data_version): every statement that writes token_sets advances it.
    -- A sequence is not transactional and takes no row lock, so writers never queue on it.
    CREATE SEQUENCE refresherd_changes;
    CREATE FUNCTION refresherd_note_change() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        PERFORM nextval('refresherd_changes');
        RETURN NULL;
    END
    $$;
    CREATE TRIGGER token_sets_changed AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE
        ON token_sets FOR EACH STATEMENT EXECUTE FUNCTION refresherd_note_change();
    """,
    """
    ALTER TABLE token_sets ADD COLUMN refresh_expires_at double precision;
    """,
    """
    ALTER TABLE token_sets ADD COLUMN refresh_token_usage text
        CHECK (refresh_token_usage IN ('one_time', 'reuse'));
    ALTER TABLE token_sets ADD COLUMN grace_period double precision;
    ALTER TABLE token_sets ADD COLUMN refresh_token_lifetime double precision;
    """,
    """
    ALTER TABLE token_sets ADD COLUMN refresh_token_idle_lifetime double precision;
    ALTER TABLE token_sets ADD COLUMN refresh_mode text
        CHECK (refresh_mode IN ('access_token', 'keep_alive'));
    ALTER TABLE token_sets ADD COLUMN expiry_warned_for double precision;
    """,
    """
    CREATE TABLE hook_deliveries (
        id bigint GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
        event_id text NOT NULL,
        target text NOT NULL CHECK (target IN ('webhook', 'command')),
        event_type text NOT NULL,
        payload text NOT NULL,
        created_at double precision NOT NULL,
        attempts integer NOT NULL DEFAULT 0,
        next_attempt_at double precision NOT NULL,
        last_error text,
        delivered_at double precision,
        given_up_at double precision,
        UNIQUE (event_id, target)
    );
    CREATE INDEX hook_deliveries_due ON hook_deliveries (next_attempt_at)
        WHERE delivered_at IS NULL AND given_up_at IS NULL;
    """,
    """
    CREATE TABLE storage_probe (
        id integer PRIMARY KEY CHECK (id = 1),
        probed_at double precision NOT NULL,
        owner text NOT NULL
    );
    """,
    """
    CREATE INDEX token_sets_written ON token_sets (updated_at) WHERE state <> 'invalidated';
    """,
    """
    -- As in store.py's migration 8: events queued by whoever observes them, expanded into
    -- hook_deliveries by a daemon with [hooks]; invalidations counted by the statement that
    -- makes them (a row trigger), seeded with the sets invalidated before.
    CREATE TABLE hook_events (
        id bigint GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
        event_id text NOT NULL UNIQUE,
        event_type text NOT NULL,
        payload text NOT NULL,
        created_at double precision NOT NULL
    );
    CREATE INDEX hook_events_created ON hook_events (created_at);
    CREATE TABLE invalidation_counts (
        provider text COLLATE "C" NOT NULL,
        reason text COLLATE "C" NOT NULL,
        count bigint NOT NULL,
        PRIMARY KEY (provider, reason)
    );
    INSERT INTO invalidation_counts (provider, reason, count)
        SELECT provider, coalesce(invalid_reason, 'unknown'), count(*) FROM token_sets
        WHERE state = 'invalidated' GROUP BY provider, coalesce(invalid_reason, 'unknown');
    CREATE FUNCTION refresherd_count_invalidation() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        INSERT INTO invalidation_counts AS c (provider, reason, count)
            VALUES (NEW.provider, coalesce(NEW.invalid_reason, 'unknown'), 1)
            ON CONFLICT (provider, reason) DO UPDATE SET count = c.count + 1;
        RETURN NULL;
    END
    $$;
    CREATE TRIGGER token_sets_invalidated AFTER UPDATE OF state ON token_sets FOR EACH ROW
        WHEN (NEW.state = 'invalidated' AND OLD.state <> 'invalidated')
        EXECUTE FUNCTION refresherd_count_invalidation();
    """,
    """
    -- store.MIGRATIONS[8]: sends settled as not processed, apart from those that may have been.
    ALTER TABLE token_sets ADD COLUMN attempt_settled integer;
    """,
)
SCHEMA_VERSION: Final = len(MIGRATIONS)

_REFRESH_EXPIRY: Final = (
    "coalesce(refresh_expires_at, created_at + coalesce(refresh_token_lifetime,"
    " :lifetime::double precision))"
)
_INSERT_COLUMNS: Final = (
    "id",
    "provider",
    "access_token",
    "refresh_token",
    "token_type",
    "scope",
    "expires_at",
    "next_refresh_at",
    "refresh_expires_at",
    "refresh_token_usage",
    "grace_period",
    "refresh_token_lifetime",
    "refresh_token_idle_lifetime",
    "refresh_mode",
    "created_at",
    "updated_at",
)
_COLUMNS: Final = ", ".join(_INSERT_COLUMNS)
_INSERT: Final = (
    f"INSERT INTO token_sets ({_COLUMNS})"
    f" VALUES ({', '.join(f'${i}' for i in range(1, len(_INSERT_COLUMNS) + 1))})"
)
# import_stream's staging table: the inserted columns, with where each came from, in order.
_STAGING: Final = (
    "CREATE TEMP TABLE import_staging (ord bigint NOT NULL, source text NOT NULL,"
    " id text NOT NULL, provider text, access_token text, refresh_token text, token_type text,"
    " scope text, expires_at double precision, next_refresh_at double precision,"
    " refresh_expires_at double precision, refresh_token_usage text,"
    " grace_period double precision, refresh_token_lifetime double precision,"
    " refresh_token_idle_lifetime double precision, refresh_mode text,"
    " created_at double precision, updated_at double precision) ON COMMIT DROP"
)

# An owner row no token set names, as lease holder or as the owner of a journaled attempt
# (refresher._sent_elsewhere asks whether that one lives): only such a row may be forgotten.
_UNREFERENCED: Final = (
    "NOT EXISTS (SELECT 1 FROM token_sets WHERE lease_owner = o.owner)"
    " AND NOT EXISTS (SELECT 1 FROM token_sets WHERE attempt_started_at IS NOT NULL"
    " AND attempt_owner = o.owner)"
)

# ":name" parameters, but not "::type" casts.
_PARAM: Final = re.compile(r"(?<![:\w]):([A-Za-z_]\w*)")


@functools.lru_cache(maxsize=512)
def _compile(sql: str) -> tuple[str, tuple[str, ...]]:
    """``:name`` placeholders to asyncpg's ``$n``, and the names in ``$n`` order."""
    names: list[str] = []

    def number(match: re.Match[str]) -> str:
        name = match.group(1)
        if name not in names:
            names.append(name)
        return f"${names.index(name) + 1}"

    return _PARAM.sub(number, sql), tuple(names)


def _bind(sql: str, params: dict[str, Any]) -> tuple[str, list[Any]]:
    text, names = _compile(sql)
    return text, [params[n] for n in names]


def _passwords(dsn: str) -> list[str]:
    """Every form the DSN's password could take in a message (raw, and percent-decoded)."""
    found: list[str] = []
    try:
        parts = urlsplit(dsn)
        if parts.password:
            found += [parts.password, unquote(parts.password)]
        for key, value in parse_qsl(parts.query, keep_blank_values=True):
            if key.lower() == "password" and value:
                found.append(value)
    except ValueError:
        pass
    return [p for p in found if p]


def _describe(exc: BaseException) -> str:
    """What went wrong, without anything that may quote a value: a server error's primary
    message only (its DETAIL quotes rows), and an argument error without the argument."""
    if isinstance(exc, asyncpg.PostgresError):
        # The server's errors carry ``message``; the driver's own (an argument it cannot
        # encode) only their text, which quotes the argument: cut before it.
        message = str(getattr(exc, "message", None) or (exc.args[0] if exc.args else ""))
        if message.startswith("invalid input for query argument"):
            message = message.split(":", 1)[0]
        return message.splitlines()[0] if message.strip() else type(exc).__name__
    if isinstance(exc, TimeoutError):
        return "no answer in time"
    if isinstance(exc, OSError):
        return exc.strerror or str(exc) or type(exc).__name__
    text = str(exc).splitlines()[0] if str(exc) else ""
    return text or type(exc).__name__


class _InputFailed(Exception):
    """import_stream's input raised ``error`` (a bad line): it reaches the caller as it is,
    not as a database error, once the transaction is rolled back."""

    def __init__(self, error: Exception) -> None:
        super().__init__(str(error))
        self.error = error


_DRIVER_ERRORS: Final = (
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
    asyncpg.exceptions.InternalClientError,
    OSError,
    TimeoutError,
)


class PostgresStore:
    """The store on PostgreSQL; see the module docstring and :class:`TokenStore`."""

    def __init__(
        self,
        location: PostgresLocation,
        pool: asyncpg.Pool[asyncpg.Record],
        cipher: TokenCipher | None = None,
    ) -> None:
        self._location = location
        self._pool = pool
        self.cipher = cipher
        self._secrets = _passwords(location.dsn.reveal())
        # The dedicated connection that holds our owner lock (owner()), and its watch.
        self._owner_conn: asyncpg.Connection[asyncpg.Record] | None = None
        self._owner_key: int | None = None
        self._owner_gone = anyio.Event()
        self._owner_check = anyio.Lock()
        self.owner_check_interval = OWNER_CHECK_INTERVAL

    def __repr__(self) -> str:
        return f"<PostgresStore {self._location.display}>"

    # ---- lifecycle -------------------------------------------------------------------------

    @classmethod
    async def open(
        cls,
        location: PostgresLocation,
        *,
        create: bool = True,
        cipher: TokenCipher | None = None,
        verify_keys: bool = True,
        pool_size: int = DEFAULT_POOL_SIZE,
    ) -> PostgresStore:
        """Connect, and migrate the schema (``create`` is for SQLite files: a PostgreSQL
        database is never created here, only migrated). ``verify_keys``: see open_store."""
        del create
        secret_forms = _passwords(location.dsn.reveal())
        try:
            pool = await asyncpg.create_pool(
                location.dsn.reveal(),
                min_size=1,
                max_size=max(1, pool_size),
                timeout=CONNECT_TIMEOUT,
                command_timeout=COMMAND_TIMEOUT,
                server_settings={
                    "application_name": "refresherd",
                    "lock_timeout": str(LOCK_TIMEOUT_MS),
                },
            )
        except (*_DRIVER_ERRORS, ValueError) as exc:
            message = _describe(exc)
            for secret in secret_forms:
                message = message.replace(secret, "***")
            raise StoreError(
                f"database {location.display}: cannot connect: {message}",
                reason=classify_postgres(exc),
            ) from None
        store = cls(location, pool, cipher)
        try:
            await store._migrate()
            if verify_keys:
                await store._check_keys()
        except BaseException:
            pool.terminate()
            raise
        return store

    async def _migrate(self) -> None:
        """Bring the schema to SCHEMA_VERSION, once, however many daemons start together: the
        whole migration runs under a transaction-level advisory lock."""
        with anyio.CancelScope(shield=True), self._errors():
            async with self._pool.acquire() as conn, conn.transaction():
                await conn.execute("SET LOCAL lock_timeout = '60s'")
                await conn.execute("SELECT pg_advisory_xact_lock($1, $2)", *MIGRATION_LOCK)
                await conn.execute(
                    "CREATE TABLE IF NOT EXISTS refresherd_schema ("
                    " id integer PRIMARY KEY CHECK (id = 1), version integer NOT NULL)"
                )
                await conn.execute(
                    "INSERT INTO refresherd_schema (id, version) VALUES (1, 0)"
                    " ON CONFLICT (id) DO NOTHING"
                )
                current = int(await conn.fetchval("SELECT version FROM refresherd_schema"))
                if current > SCHEMA_VERSION:
                    raise StoreError(
                        f"database {self.location}: schema version {current} is newer than "
                        f"this refresherd understands ({SCHEMA_VERSION}); upgrade refresherd"
                    )
                for index in range(current, SCHEMA_VERSION):
                    await conn.execute(MIGRATIONS[index])
                    await conn.execute("UPDATE refresherd_schema SET version = $1", index + 1)

    async def close(self) -> None:
        with anyio.CancelScope(shield=True):
            try:
                with anyio.move_on_after(10):
                    await self._pool.close()
                    return
                self._pool.terminate()
            except _DRIVER_ERRORS:
                self._pool.terminate()

    @property
    def location(self) -> str:
        """The database's URL without its password."""
        return self._location.display

    # ---- owners ----------------------------------------------------------------------------

    @asynccontextmanager
    async def owner(self, name: str | None) -> AsyncIterator[str]:
        """Hold an owner identity for the life of the context; yields the owner id leases are
        taken under. The identity is a session-level advisory lock held by a dedicated
        connection, recorded in refresherd_owners; the server releases it when that session
        ends (the process died, or its connection was cut), which :meth:`owner_alive` tells
        other daemons and :meth:`owner_lost` tells us. Needs a direct connection (or session
        pooling): a transaction-pooling proxy would hand the session to others."""
        owner = new_owner_id(name)
        try:
            conn = await asyncpg.connect(
                self._location.dsn.reveal(),
                timeout=CONNECT_TIMEOUT,
                command_timeout=OWNER_CHECK_TIMEOUT,
                server_settings={"application_name": f"refresherd owner {owner}"[:63]},
            )
        except (*_DRIVER_ERRORS, ValueError) as exc:
            raise self._error(exc, "cannot register the lease owner") from None
        try:
            with self._errors():
                key = await self._take_owner_lock(conn, owner)
            self._owner_conn, self._owner_key = conn, key
            self._owner_gone = anyio.Event()
            conn.add_termination_listener(self._on_owner_terminated)
            await self._prune_owners(owner)
            yield owner
        finally:
            with anyio.CancelScope(shield=True):
                self._owner_conn = None
                conn.remove_termination_listener(self._on_owner_terminated)
                # Our row stays while a lease or a journaled attempt names us: with the lock
                # gone, other daemons then see us as dead, not unknown (which reads as alive:
                # our attempt would never be continued, our lease never taken over).
                with contextlib.suppress(*_DRIVER_ERRORS):
                    await self._pool.execute(
                        f"DELETE FROM refresherd_owners o WHERE owner = $1 AND {_UNREFERENCED}",
                        owner,
                    )
                try:
                    with anyio.move_on_after(OWNER_CHECK_TIMEOUT):
                        await conn.close()
                finally:
                    if not conn.is_closed():
                        conn.terminate()

    async def _take_owner_lock(self, conn: asyncpg.Connection[asyncpg.Record], owner: str) -> int:
        """Lock a fresh key and record it with ``owner``; a key some row (a live owner, or a
        dead one whose leases are still around) has already is never reused."""
        while True:
            key = secrets.randbits(31)
            if not await conn.fetchval(
                "SELECT pg_try_advisory_lock($1, $2)", OWNER_LOCK_CLASS, key
            ):
                continue
            row = await conn.fetchval(
                "INSERT INTO refresherd_owners (owner, lock_key, host, pid, started_at)"
                " VALUES ($1, $2, $3, $4, $5) ON CONFLICT DO NOTHING RETURNING lock_key",
                owner,
                key,
                socket.gethostname()[:200],
                _pid(owner),
                time.time(),
            )
            if row is not None:
                return key
            await conn.fetchval("SELECT pg_advisory_unlock($1, $2)", OWNER_LOCK_CLASS, key)

    async def _prune_owners(self, me: str) -> None:
        """Forget owners that are gone and named by no token set (housekeeping, best effort)."""
        with anyio.CancelScope(shield=True), contextlib.suppress(*_DRIVER_ERRORS):
            async with self._pool.acquire() as conn:
                rows = await conn.fetch(
                    "SELECT owner, lock_key FROM refresherd_owners o WHERE owner <> $1"
                    f" AND {_UNREFERENCED} LIMIT 100",
                    me,
                )
                for row in rows:
                    if await self._lock_is_free(conn, row["lock_key"]):
                        await conn.execute(
                            f"DELETE FROM refresherd_owners o WHERE owner = $1 AND {_UNREFERENCED}",
                            row["owner"],
                        )

    @staticmethod
    async def _lock_is_free(conn: Any, key: int) -> bool:
        """Does no session hold the owner lock ``key``? Read from pg_locks, not tried: a probe
        that took the lock, even for a moment, would make a dead owner look alive to every
        other probe meanwhile (many refreshes of a fleet ask about one dead owner at once)."""
        held = await conn.fetchval(
            "SELECT EXISTS (SELECT 1 FROM pg_locks WHERE locktype = 'advisory'"
            " AND database = (SELECT oid FROM pg_database WHERE datname = current_database())"
            " AND classid = $1::bigint::oid AND objid = $2::bigint::oid AND objsubid = 2"
            " AND granted)",
            OWNER_LOCK_CLASS,
            key,
        )
        return not held

    def _on_owner_terminated(self, conn: object) -> None:
        self._owner_gone.set()

    async def owner_alive(self, owner: str) -> bool:
        """False only when ``owner``'s advisory lock is provably free (its session ended); an
        unknown owner, or any error, counts as alive: never take over on a guess."""
        free = False
        try:
            with anyio.CancelScope(shield=True):
                async with self._pool.acquire() as conn:
                    key = await conn.fetchval(
                        "SELECT lock_key FROM refresherd_owners WHERE owner = $1", owner
                    )
                    if key is not None:
                        free = await self._lock_is_free(conn, int(key))
        except _DRIVER_ERRORS:
            return True
        return not free

    async def live_owners(self) -> set[str]:
        """Registered owners whose advisory lock is held (their session lives)."""
        with self._errors():
            rows = await self._read("SELECT owner FROM refresherd_owners")
        return {r[0] for r in rows if await self.owner_alive(r[0])}

    async def owner_lost(self) -> None:
        """Return once our owner connection is gone (closed, terminated, or not answering
        within OWNER_CHECK_TIMEOUT, or no longer holding its lock): from then on other daemons
        may take over our leases. Never returns while it holds, nor outside :meth:`owner`."""
        while True:
            with anyio.move_on_after(self.owner_check_interval):
                await self._owner_gone.wait()
                return
            conn, key = self._owner_conn, self._owner_key
            if conn is None or key is None:
                continue
            async with self._owner_check:
                try:
                    held = await conn.fetchval(
                        "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory'"
                        " AND pid = pg_backend_pid() AND classid = $1::oid AND objid = $2::oid"
                        " AND objsubid = 2 AND granted",
                        OWNER_LOCK_CLASS,
                        key,
                        timeout=OWNER_CHECK_TIMEOUT,
                    )
                except _DRIVER_ERRORS:
                    held = 0
            if not held and self._owner_conn is conn:
                return

    # ---- encryption at rest ----------------------------------------------------------------

    def _token_set(self, row: asyncpg.Record) -> TokenSet:
        # store.py's mapping: an asyncpg Record is indexed by column name as sqlite3.Row is.
        return _row_to_token_set(row, self.cipher)  # type: ignore[arg-type]

    def _seal(self, value: str, row_id: str, column: str) -> str:
        if self.cipher is None:
            return value
        return self.cipher.seal(value, row_id=row_id, column=column)

    def _insert_row(self, n: NewTokenSet, now: float) -> tuple[Any, ...]:
        """A new token set as the values of _INSERT_COLUMNS, its tokens sealed if so set."""
        access = n.access_token.reveal() if n.access_token else None
        return (
            n.id,
            n.provider,
            None if access is None else self._seal(access, n.id, "access_token"),
            self._seal(n.refresh_token.reveal(), n.id, "refresh_token"),
            n.token_type,
            n.scope,
            n.expires_at,
            n.next_refresh_at,
            n.refresh_expires_at,
            n.refresh_token_usage.value if n.refresh_token_usage else None,
            n.grace_period,
            n.refresh_token_lifetime,
            n.refresh_token_idle_lifetime,
            n.refresh_mode.value if n.refresh_mode else None,
            now,
            now,
        )

    async def sealed_key_ids(self) -> set[str]:
        """The ids of the keys that token values in the database are sealed under."""
        rows = await self._read(
            "SELECT DISTINCT substr(refresh_token, 8, 16) FROM token_sets"
            " WHERE refresh_token LIKE 'enc:v1:%'"
            " UNION SELECT DISTINCT substr(access_token, 8, 16) FROM token_sets"
            " WHERE access_token LIKE 'enc:v1:%'"
        )
        return {r[0] for r in rows}

    async def _check_keys(self) -> None:
        """Refuse to start with a key set that cannot open every stored value."""
        key_ids = None if self.cipher is None else self.cipher.key_ids
        check_keys(self.location, await self.sealed_key_ids(), key_ids)

    async def rekey(self, *, batch: int = 200) -> int:
        """Seal every token value that is plaintext or sealed under an older key with the
        current key, batch by batch; returns how many token sets changed. Each row is
        compare-and-swapped on its stored values, so a refresh that lands meanwhile wins."""
        cipher = self.cipher
        if cipher is None:
            raise StoreError("rekey needs [encryption] key_file in the config")
        changed = 0
        after = ""
        while True:
            rows = await self._read(
                "SELECT id, access_token, refresh_token FROM token_sets WHERE id > :after"
                " ORDER BY id LIMIT :limit",
                {"after": after, "limit": batch},
            )
            if not rows:
                return changed
            after = rows[-1][0]
            updates = []
            for row_id, access, refresh in rows:
                if cipher.is_current(refresh) and (access is None or cipher.is_current(access)):
                    continue
                plain = _row_plain(cipher, row_id, access, refresh)
                updates.append(
                    (
                        row_id,
                        None
                        if plain[0] is None
                        else cipher.seal(plain[0], row_id=row_id, column="access_token"),
                        cipher.seal(plain[1], row_id=row_id, column="refresh_token"),
                        access,
                        refresh,
                    )
                )
            if updates:
                changed += await self._rekey_batch(updates)

    async def _rekey_batch(self, updates: list[tuple[Any, ...]]) -> int:
        done = 0
        with anyio.CancelScope(shield=True), self._errors():
            async with self._pool.acquire() as conn, conn.transaction():
                for row in updates:
                    hit = await conn.fetchval(
                        "UPDATE token_sets SET access_token = $2, refresh_token = $3"
                        " WHERE id = $1 AND refresh_token = $5"
                        " AND access_token IS NOT DISTINCT FROM $4 RETURNING id",
                        *row,
                    )
                    done += hit is not None
        return done

    # ---- health and housekeeping -----------------------------------------------------------

    async def schema_version(self) -> int:
        return int(await self._value("SELECT version FROM refresherd_schema"))

    async def ping(self) -> None:
        """Raise StoreError unless the database answers a read."""
        await self._value("SELECT version FROM refresherd_schema")

    async def probe_write(self, *, owner: str, now: float) -> None:
        """One harmless committed write (the storage_probe row); StoreError if it fails."""
        await self._write(
            "INSERT INTO storage_probe (id, probed_at, owner) VALUES (1, :now, :owner)"
            " ON CONFLICT (id) DO UPDATE SET probed_at = excluded.probed_at,"
            " owner = excluded.owner",
            {"now": now, "owner": owner},
        )

    async def checkpoint(self) -> tuple[int, int]:
        """SQLite's WAL checkpoint has no counterpart here (the server checkpoints): (0, 0)."""
        return 0, 0

    def wal_bytes(self) -> int:
        """SQLite's -wal file has no counterpart here (the server manages its WAL): 0."""
        return 0

    async def data_version(self) -> int:
        """Changes whenever any session (this one included) writes token_sets: the sequence
        a statement-level trigger advances. It moves at the writing statement, a moment before
        its commit, so it only ever wakes a sleeper early; a sleeper that looked in between
        sees the change at its next poll at the latest."""
        return int(await self._value("SELECT last_value FROM refresherd_changes"))

    # ---- helpers ---------------------------------------------------------------------------

    def _error(self, exc: BaseException, doing: str | None = None) -> StoreError:
        message = _describe(exc)
        for secret in self._secrets:
            message = message.replace(secret, "***")
        prefix = f"database {self.location}: " + (f"{doing}: " if doing else "")
        return StoreError(prefix + message, reason=classify_postgres(exc))

    @contextlib.contextmanager
    def _errors(self) -> Iterator[None]:
        """Driver and server errors as StoreError; the cause is not chained (it quotes rows)."""
        try:
            yield
        except StoreError:
            raise
        except _DRIVER_ERRORS as exc:
            raise self._error(exc) from None

    async def _write(self, sql: str, params: dict[str, Any]) -> list[asyncpg.Record]:
        """One statement, committed before returning, shielded from cancellation: a write the
        server may already have committed must not be abandoned half-way by its caller. Each
        runs on its own pooled connection: concurrent writes commit together (group commit)."""
        text, args = _bind(sql, params)
        with anyio.CancelScope(shield=True), self._errors():
            for attempt in range(DEADLOCK_RETRIES + 1):
                try:
                    rows = await self._pool.fetch(text, *args)
                    break
                except asyncpg.DeadlockDetectedError:
                    # The server rolled this statement back to break a cycle of row locks
                    # between multi-row writes (leases, expiry marks): nothing of it was
                    # committed, so running it again is safe.
                    if attempt == DEADLOCK_RETRIES:
                        raise
        return list(rows)

    async def _read(self, sql: str, params: dict[str, Any] | None = None) -> list[asyncpg.Record]:
        text, args = _bind(sql, params or {})
        with self._errors():
            return list(await self._pool.fetch(text, *args))

    async def _value(self, sql: str, params: dict[str, Any] | None = None) -> Any:
        rows = await self._read(sql, params)
        return rows[0][0] if rows else None

    # ---- token sets: add, read, remove -----------------------------------------------------

    async def add(self, new: NewTokenSet, *, now: float) -> None:
        await self.add_many([new], now=now)

    async def add_many(self, items: Iterable[NewTokenSet], *, now: float) -> int:
        """Insert all or nothing. An id that exists already (or twice) raises TokenSetExists."""
        items = list(items)
        if not items:
            return 0
        rows = [self._insert_row(n, now) for n in items]
        with anyio.CancelScope(shield=True):
            try:
                async with self._pool.acquire() as conn, conn.transaction():
                    await conn.executemany(_INSERT, rows, timeout=BULK_TIMEOUT)
            except asyncpg.UniqueViolationError as exc:
                duplicate = self._error(exc)
            except _DRIVER_ERRORS as exc:
                raise self._error(exc) from None
            else:
                return len(rows)
            message = await self._conflict([n.id for n in items])
        if message is None:
            raise duplicate
        raise TokenSetExists(message)

    async def _conflict(self, ids: Sequence[str]) -> str | None:
        """Name the first of ``ids`` that is stored already or repeats an earlier one."""
        stored: set[str] = set()
        for start in range(0, len(ids), 10_000):
            rows = await self._read(
                "SELECT id FROM token_sets WHERE id = ANY(:ids::text[])",
                {"ids": list(ids[start : start + 10_000])},
            )
            stored.update(r[0] for r in rows)
        return first_conflict(ids, stored)

    async def import_stream(self, items: Iterable[tuple[str, NewTokenSet]], *, now: float) -> int:
        """Insert all or nothing, from an iterable of any size, in bounded memory.

        One transaction: the rows are copied chunk by chunk (COPY) into a temporary staging
        table, with where each was read; a bad input line, raised by ``items``, rolls it all
        back. Then an id repeated in the input, or stored already, is named (TokenSetExists,
        the repeat with its ``where``), and one ``INSERT … SELECT`` moves the rows in; only
        that takes locks on token_sets.
        """
        try:
            with self._errors():
                async with self._pool.acquire() as conn:
                    transaction = conn.transaction()
                    await transaction.start()
                    try:
                        await conn.execute(_STAGING)
                        count = await self._stage(conn, items, now)
                        with anyio.CancelScope(shield=True):
                            await self._move_staged(conn)
                            await transaction.commit()
                    except BaseException:
                        with anyio.CancelScope(shield=True), contextlib.suppress(*_DRIVER_ERRORS):
                            await transaction.rollback()
                        raise
        except _InputFailed as failed:
            raise failed.error from None
        return count

    async def _stage(
        self,
        conn: _Conn,
        items: Iterable[tuple[str, NewTokenSet]],
        now: float,
    ) -> int:
        columns = ["ord", "source", *_INSERT_COLUMNS]
        count = 0
        iterator = iter(items)
        while True:
            try:
                chunk = list(itertools.islice(iterator, _CHUNK))
            except Exception as exc:  # a bad input line, raised by ``items``
                raise _InputFailed(exc) from exc
            if not chunk:
                return count
            records = [
                (count + i, where, *self._insert_row(n, now)) for i, (where, n) in enumerate(chunk)
            ]
            await conn.copy_records_to_table(
                "import_staging", records=records, columns=columns, timeout=BULK_TIMEOUT
            )
            count += len(chunk)

    async def _move_staged(self, conn: _Conn) -> None:
        repeated = await conn.fetchrow(
            "SELECT id, source FROM (SELECT id, source, ord, row_number() OVER"
            " (PARTITION BY id ORDER BY ord) AS n FROM import_staging) s"
            " WHERE n = 2 ORDER BY ord LIMIT 1",
            timeout=BULK_TIMEOUT,
        )
        if repeated is not None:
            raise TokenSetExists(
                f"{repeated['source']}: token set {repeated['id']!r} appears twice in the input"
            )
        taken_sql = (
            "SELECT s.id FROM import_staging s JOIN token_sets t ON t.id = s.id"
            " ORDER BY s.ord LIMIT 1"
        )
        taken = await conn.fetchval(taken_sql, timeout=BULK_TIMEOUT)
        if taken is None:
            try:
                async with conn.transaction():  # a savepoint: a racing insert is named below
                    await conn.execute(
                        f"INSERT INTO token_sets ({_COLUMNS})"
                        f" SELECT {_COLUMNS} FROM import_staging",
                        timeout=BULK_TIMEOUT,
                    )
                return
            except asyncpg.UniqueViolationError:
                taken = await conn.fetchval(taken_sql, timeout=BULK_TIMEOUT)
                if taken is None:
                    raise
        raise TokenSetExists(f"token set {taken!r} exists already (remove it first)")

    async def get(self, token_set_id: str) -> TokenSet | None:
        rows = await self._read("SELECT * FROM token_sets WHERE id = :id", {"id": token_set_id})
        return self._token_set(rows[0]) if rows else None

    async def page(self, *, after: str | None = None, limit: int = 500) -> list[TokenSet]:
        """Token sets in id order after ``after``: keyset pagination, never all in memory."""
        if after is None:
            rows = await self._read(
                "SELECT * FROM token_sets ORDER BY id LIMIT :limit", {"limit": limit}
            )
        else:
            rows = await self._read(
                "SELECT * FROM token_sets WHERE id > :after ORDER BY id LIMIT :limit",
                {"after": after, "limit": limit},
            )
        return [self._token_set(r) for r in rows]

    async def iterate(self, *, page_size: int = 500) -> AsyncIterator[TokenSet]:
        after: str | None = None
        while True:
            batch = await self.page(after=after, limit=page_size)
            for token_set in batch:
                yield token_set
            if len(batch) < page_size:
                return
            after = batch[-1].id

    async def remove(self, token_set_id: str) -> bool:
        rows = await self._write(
            "DELETE FROM token_sets WHERE id = :id RETURNING id", {"id": token_set_id}
        )
        return bool(rows)

    async def refresh_expiry_soonest(self, lifetimes: dict[str, float | None]) -> dict[str, float]:
        """Per provider, the soonest absolute refresh-token expiry among live token sets
        (store.Store.refresh_expiry_soonest)."""
        result: dict[str, float] = {}
        for provider, lifetime in lifetimes.items():
            value = await self._value(
                f"SELECT min({_REFRESH_EXPIRY}) FROM token_sets"
                " WHERE provider = :provider AND state <> 'invalidated'",
                {"provider": provider, "lifetime": lifetime},
            )
            if value is not None:
                result[provider] = float(value)
        return result

    async def refresh_expiring(
        self, provider: str, *, lifetime: float | None, until: float, limit: int = 500
    ) -> list[tuple[TokenSet, float]]:
        """A provider's live token sets whose absolute refresh-token expiry is at or before
        ``until`` and not yet warned about at that expiry, soonest first, with that expiry."""
        rows = await self._read(
            f"SELECT * FROM (SELECT *, {_REFRESH_EXPIRY} AS refresh_expiry FROM token_sets"
            " WHERE provider = :provider AND state <> 'invalidated') AS t"
            " WHERE refresh_expiry <= :until"
            " AND (expiry_warned_for IS NULL OR refresh_expiry <> expiry_warned_for)"
            " ORDER BY refresh_expiry LIMIT :limit",
            {"provider": provider, "lifetime": lifetime, "until": until, "limit": limit},
        )
        return [(self._token_set(r), float(r["refresh_expiry"])) for r in rows]

    async def refresh_expiring_counts(
        self, lifetimes: dict[str, float | None], *, until: float
    ) -> dict[str, int]:
        result: dict[str, int] = {}
        for provider, lifetime in lifetimes.items():
            value = await self._value(
                "SELECT count(*) FROM token_sets WHERE provider = :provider"
                f" AND state <> 'invalidated' AND {_REFRESH_EXPIRY} <= :until",
                {"provider": provider, "lifetime": lifetime, "until": until},
            )
            result[provider] = int(value or 0)
        return result

    async def mark_expiry_warned(self, warned: Sequence[tuple[str, float]]) -> None:
        """Remember, for each ``(token set id, absolute expiry)``, that the warning for that
        expiry was given: one statement for the whole batch."""
        if not warned:
            return
        await self._write(
            "UPDATE token_sets SET expiry_warned_for = w.expiry"
            " FROM unnest(:ids::text[], :expiries::double precision[]) AS w(id, expiry)"
            " WHERE token_sets.id = w.id",
            {"ids": [w[0] for w in warned], "expiries": [w[1] for w in warned]},
        )

    async def counts(self) -> dict[tuple[str, str], int]:
        rows = await self._read(
            "SELECT provider, state, count(*) FROM token_sets GROUP BY provider, state"
        )
        return {(r[0], r[1]): int(r[2]) for r in rows}

    async def expired_counts(self, *, now: float) -> dict[str, int]:
        rows = await self._read(
            "SELECT provider, count(*) FROM token_sets"
            " WHERE state <> 'invalidated' AND expires_at < :now GROUP BY provider",
            {"now": now},
        )
        return {r[0]: int(r[1]) for r in rows}

    # ---- scheduling and leases -------------------------------------------------------------

    async def next_due_at(
        self, *, now: float, exclude_providers: Sequence[str] = ()
    ) -> float | None:
        """Earliest planned refresh among sets no live lease holds, or None."""
        value = await self._value(
            "SELECT min(next_refresh_at) FROM token_sets WHERE state <> 'invalidated'"
            " AND (lease_owner IS NULL OR lease_until < :now)"
            " AND provider <> ALL(:excluded::text[])",
            {"now": now, "excluded": list(exclude_providers)},
        )
        return float(value) if value is not None else None

    async def claim_due(
        self,
        *,
        owner: str,
        now: float,
        lease_until: float,
        limit: int,
        exclude_providers: Sequence[str] = (),
    ) -> list[str]:
        """Lease up to ``limit`` due token sets in one statement; returns their ids, most
        overdue first. Rows another daemon is claiming right now are skipped, not waited for
        (SKIP LOCKED); the lease conditions are checked again on the row as locked."""
        rows = await self._claim_due(
            "t.id, t.next_refresh_at", owner, now, lease_until, limit, exclude_providers
        )
        return [r[0] for r in sorted(rows, key=lambda r: (r[1], r[0]))]

    async def claim_due_sets(
        self,
        *,
        owner: str,
        now: float,
        lease_until: float,
        limit: int,
        exclude_providers: Sequence[str] = (),
    ) -> list[TokenSet]:
        """:meth:`claim_due`, returning each leased set as its row stands after the update
        (store.Store.claim_due_sets: what :meth:`claim` returns), most overdue first."""
        rows = await self._claim_due("t.*", owner, now, lease_until, limit, exclude_providers)
        return sorted(
            (self._token_set(r) for r in rows), key=lambda ts: (ts.next_refresh_at, ts.id)
        )

    async def _claim_due(
        self,
        returning: str,
        owner: str,
        now: float,
        lease_until: float,
        limit: int,
        exclude_providers: Sequence[str],
    ) -> list[asyncpg.Record]:
        if limit <= 0:
            return []
        return await self._write(
            "WITH due AS (SELECT id FROM token_sets WHERE state <> 'invalidated'"
            " AND next_refresh_at <= :now AND (lease_owner IS NULL OR lease_until < :now)"
            " AND provider <> ALL(:excluded::text[])"
            " ORDER BY next_refresh_at LIMIT :limit FOR UPDATE SKIP LOCKED)"
            " UPDATE token_sets t SET lease_owner = :owner, lease_until = :until FROM due"
            " WHERE t.id = due.id AND t.state <> 'invalidated'"
            " AND (t.lease_owner IS NULL OR t.lease_until < :now)"
            f" RETURNING {returning}",
            {
                "owner": owner,
                "now": now,
                "until": lease_until,
                "limit": limit,
                "excluded": list(exclude_providers),
            },
        )

    async def make_due_written_after(self, *, now: float, limit: float) -> int:
        """Make due now every set last written at a wall time after ``limit`` (> ``now``):
        written before the wall clock was stepped back (store.Store.make_due_written_after)."""
        rows = await self._write(
            "UPDATE token_sets SET next_refresh_at = :now WHERE state <> 'invalidated'"
            " AND updated_at > :limit AND next_refresh_at > :now RETURNING id",
            {"now": now, "limit": limit},
        )
        return len(rows)

    async def claim(
        self, token_set_id: str, *, owner: str, now: float, lease_until: float
    ) -> TokenSet | ClaimRefused:
        """Lease one token set and return it as it is *now*, read under the lease."""
        rows = await self._write(
            "UPDATE token_sets SET lease_owner = :owner, lease_until = :until"
            " WHERE id = :id AND state <> 'invalidated'"
            " AND (lease_owner IS NULL OR lease_owner = :owner OR lease_until < :now)"
            " RETURNING *",
            {"id": token_set_id, "owner": owner, "until": lease_until, "now": now},
        )
        if rows:
            return self._token_set(rows[0])
        return claim_refusal(await self.get(token_set_id))

    async def renew_lease(self, token_set_id: str, *, owner: str, lease_until: float) -> bool:
        rows = await self._write(
            "UPDATE token_sets SET lease_until = :until WHERE id = :id AND lease_owner = :owner"
            " RETURNING id",
            {"id": token_set_id, "owner": owner, "until": lease_until},
        )
        return bool(rows)

    async def release(self, token_set_id: str, *, owner: str) -> None:
        await self._write(
            "UPDATE token_sets SET lease_owner = NULL, lease_until = NULL"
            " WHERE id = :id AND lease_owner = :owner",
            {"id": token_set_id, "owner": owner},
        )

    async def release_all(self, *, owner: str) -> int:
        rows = await self._write(
            "UPDATE token_sets SET lease_owner = NULL, lease_until = NULL"
            " WHERE lease_owner = :owner RETURNING id",
            {"owner": owner},
        )
        return len(rows)

    async def lease_holders(self, *, now: float) -> set[str]:
        rows = await self._read(
            "SELECT DISTINCT lease_owner FROM token_sets"
            " WHERE lease_owner IS NOT NULL AND lease_until >= :now",
            {"now": now},
        )
        return {r[0] for r in rows}

    async def clear_leases_of(self, owners: Iterable[str]) -> int:
        """Drop the leases of owners known to be dead (owner_alive said so)."""
        owners = list(owners)
        if not owners:
            return 0
        rows = await self._write(
            "UPDATE token_sets SET lease_owner = NULL, lease_until = NULL"
            " WHERE lease_owner = ANY(:owners::text[]) RETURNING id",
            {"owners": owners},
        )
        return len(rows)

    async def max_set_grace_period(self) -> float:
        """The largest per-set grace period (0 if none), as store.Store's."""
        value = await self._value("SELECT max(grace_period) FROM token_sets")
        return float(value) if value is not None else 0.0

    async def unresolved_attempts(self, *, since: float) -> list[tuple[str, str]]:
        """``(id, owner)`` of every journaled attempt started at or after ``since``, oldest
        first (crash recovery: whose grace window may still be open, and who sent it)."""
        rows = await self._read(
            "SELECT id, attempt_owner FROM token_sets WHERE attempt_started_at IS NOT NULL"
            " AND attempt_started_at >= :since AND state <> 'invalidated'"
            " ORDER BY attempt_started_at",
            {"since": since},
        )
        return [(r[0], r[1] or "") for r in rows]

    # ---- the refresh itself: journal, grant, failure ---------------------------------------

    async def begin_attempt(
        self,
        token_set_id: str,
        *,
        owner: str,
        version: int,
        now: float,
        keep_since: float | None,
    ) -> Attempt | None:
        """Journal a send of version ``version``'s refresh token, durably, before it leaves
        (store.Store.begin_attempt: a series inside its grace window is continued)."""
        rows = await self._write(
            "UPDATE token_sets SET"
            + JOURNAL_SEND_SQL
            + " next_refresh_at = least(next_refresh_at, :now)"
            " WHERE id = :id AND version = :version AND lease_owner = :owner"
            " AND lease_until >= :now AND state <> 'invalidated'"
            " AND NOT (" + SERIES_MISSED_SQL + ")"
            " RETURNING attempt_version, attempt_started_at, attempt_owner, attempt_sends,"
            " attempt_settled",
            {
                "id": token_set_id,
                "owner": owner,
                "version": version,
                "now": now,
                "keep_since": keep_since,
            },
        )
        if not rows:
            return None
        r = rows[0]
        return Attempt(version=r[0], started_at=r[1], owner=r[2], sends=r[3], settled=r[4] or 0)

    async def settle_send(self, token_set_id: str, *, version: int, started_at: float) -> None:
        """Note that one send of the series (``version``, ``started_at``) was answered in a way
        that proves the IdP did not process it. Keyed on the series, so that it never settles a
        send of a series another process has started since."""
        await self._write(
            "UPDATE token_sets SET attempt_settled = coalesce(attempt_settled, 0) + 1"
            " WHERE id = :id AND attempt_version = :version AND attempt_started_at = :started_at"
            " AND attempt_sends > coalesce(attempt_settled, 0)",
            {"id": token_set_id, "version": version, "started_at": started_at},
        )

    async def save_grant(
        self,
        token_set_id: str,
        *,
        owner: str,
        expected_version: int,
        sent_refresh_token: Secret,
        access_token: Secret,
        refresh_token: Secret,
        token_type: str | None,
        scope: str | None,
        expires_at: float | None,
        next_refresh_at: float,
        now: float,
        refresh_expires_at: float | None = None,
    ) -> TokenSet | None:
        """Compare-and-swap the new grant in, on the version and the refresh token we sent
        (store.Store.save_grant). None: the set moved on (or was removed) meanwhile."""
        sql = (
            "UPDATE token_sets SET access_token = :access, refresh_token = :refresh,"
            " token_type = :token_type, scope = coalesce(:scope, scope),"
            " expires_at = :expires_at,"
            " refresh_expires_at = coalesce(:refresh_expires_at, refresh_expires_at),"
            " state = 'active', version = version + 1, next_refresh_at = :next,"
            " updated_at = :now, last_refresh_at = :now, last_error = NULL, failures = 0,"
            " invalid_reason = NULL, attempt_version = NULL, attempt_started_at = NULL,"
            " attempt_owner = NULL, attempt_sends = NULL, attempt_settled = NULL,"
            " lease_owner = CASE WHEN lease_owner = :owner THEN NULL ELSE lease_owner END,"
            " lease_until = CASE WHEN lease_owner = :owner THEN NULL ELSE lease_until END"
            " WHERE id = :id AND version = :version AND refresh_token = :sent RETURNING *"
        )
        params = {
            "id": token_set_id,
            "owner": owner,
            "version": expected_version,
            "sent": sent_refresh_token.reveal(),
            "refresh_expires_at": refresh_expires_at,
            "access": self._seal(access_token.reveal(), token_set_id, "access_token"),
            "refresh": self._seal(refresh_token.reveal(), token_set_id, "refresh_token"),
            "token_type": token_type,
            "scope": scope,
            "expires_at": expires_at,
            "next": next_refresh_at,
            "now": now,
        }
        if self.cipher is None:
            rows = await self._write(sql, params)
        else:
            rows = await self._sealed_compare_and_swap(sql, params, sent_refresh_token)
        return self._token_set(rows[0]) if rows else None

    async def _sealed_compare_and_swap(
        self, sql: str, params: dict[str, Any], sent: Secret
    ) -> list[asyncpg.Record]:
        """save_grant's statement when values are sealed: a nonce makes every sealing differ,
        so the stored refresh token is read with its row locked, opened and compared here, and
        the statement then compares on its stored form, all in one transaction."""
        assert self.cipher is not None
        text, names = _compile(sql)
        rows: list[asyncpg.Record] = []
        with anyio.CancelScope(shield=True), self._errors():
            async with self._pool.acquire() as conn, conn.transaction():
                stored_form = await conn.fetchval(
                    "SELECT refresh_token FROM token_sets WHERE id = $1 FOR UPDATE", params["id"]
                )
                if stored_form is not None:
                    try:
                        stored = self.cipher.open(
                            stored_form, row_id=params["id"], column="refresh_token"
                        )
                    except EncryptionError as exc:
                        raise StoreError(str(exc)) from None
                    if stored == sent.reveal():
                        args = [stored_form if n == "sent" else params[n] for n in names]
                        rows = list(await conn.fetch(text, *args))
        return rows

    async def record_failure(
        self,
        token_set_id: str,
        *,
        owner: str,
        expected_version: int,
        state: State,
        next_refresh_at: float,
        error: str,
        failures: int,
        invalid_reason: str | None,
        now: float,
        resolve_attempt: bool,
    ) -> bool:
        """Record a failed refresh and release our lease, only while we hold it
        (store.Store.record_failure). ``resolve_attempt`` clears the journal."""
        rows = await self._write(
            "UPDATE token_sets SET state = :state, next_refresh_at = :next,"
            " last_error = :error, failures = :failures, invalid_reason = :reason,"
            " updated_at = :now,"
            " attempt_version = CASE WHEN :resolve THEN NULL ELSE attempt_version END,"
            " attempt_started_at = CASE WHEN :resolve THEN NULL ELSE attempt_started_at END,"
            " attempt_sends = CASE WHEN :resolve THEN NULL ELSE attempt_sends END,"
            " attempt_settled = CASE WHEN :resolve THEN NULL ELSE attempt_settled END,"
            " attempt_owner = CASE WHEN :resolve THEN NULL ELSE attempt_owner END,"
            " lease_owner = NULL, lease_until = NULL"
            " WHERE id = :id AND version = :version AND lease_owner = :owner RETURNING id",
            {
                "id": token_set_id,
                "owner": owner,
                "version": expected_version,
                "state": state.value,
                "next": next_refresh_at,
                "error": error[:500],
                "failures": failures,
                "reason": invalid_reason,
                "now": now,
                "resolve": resolve_attempt,
            },
        )
        return bool(rows)

    async def defer(self, token_set_id: str, *, owner: str, next_refresh_at: float) -> None:
        """Release our lease and move the planned time, changing nothing else (circuit open)."""
        await self._write(
            "UPDATE token_sets SET next_refresh_at = greatest(next_refresh_at, :next),"
            " lease_owner = NULL, lease_until = NULL WHERE id = :id AND lease_owner = :owner",
            {"id": token_set_id, "owner": owner, "next": next_refresh_at},
        )

    # ---- the hook queue (refresherd.hooks) ----------------------------------------------------

    async def enqueue_hook(
        self,
        *,
        event_id: str,
        event_type: str,
        payload: str,
        targets: Sequence[str],
        now: float,
    ) -> None:
        """Queue one event for each target, due at once; an event id queued already is kept."""
        await self._write(
            "INSERT INTO hook_deliveries (event_id, target, event_type, payload, created_at,"
            " next_attempt_at) SELECT :event_id, target, :event_type, :payload, :now, :now"
            " FROM unnest(:targets::text[]) AS target"
            " ON CONFLICT (event_id, target) DO NOTHING",
            {
                "event_id": event_id,
                "event_type": event_type,
                "payload": payload,
                "now": now,
                "targets": list(targets),
            },
        )

    async def claim_hook_deliveries(
        self, *, now: float, until: float, limit: int
    ) -> list[HookDelivery]:
        """Due deliveries, claimed until ``until`` with their attempt counted; deliveries
        another daemon is claiming right now are skipped (SKIP LOCKED)."""
        rows = await self._write(
            "WITH due AS (SELECT id FROM hook_deliveries WHERE delivered_at IS NULL"
            " AND given_up_at IS NULL AND next_attempt_at <= :now"
            " ORDER BY next_attempt_at LIMIT :limit FOR UPDATE SKIP LOCKED)"
            " UPDATE hook_deliveries h SET next_attempt_at = :until, attempts = h.attempts + 1"
            " FROM due WHERE h.id = due.id AND h.delivered_at IS NULL"
            " AND h.given_up_at IS NULL AND h.next_attempt_at <= :now"
            " RETURNING h.id, h.event_id, h.target, h.event_type, h.payload, h.created_at,"
            " h.attempts",
            {"now": now, "until": until, "limit": limit},
        )
        return sorted((HookDelivery(*tuple(r)) for r in rows), key=lambda d: (d.created_at, d.id))

    async def hook_delivered(self, delivery_id: int, *, now: float) -> None:
        await self._write(
            "UPDATE hook_deliveries SET delivered_at = :now, last_error = NULL WHERE id = :id",
            {"id": delivery_id, "now": now},
        )

    async def hook_failed(
        self, delivery_id: int, *, error: str, next_attempt_at: float | None, now: float
    ) -> None:
        """Record a failed attempt: due again at ``next_attempt_at``, or given up (None)."""
        await self._write(
            "UPDATE hook_deliveries SET last_error = :error,"
            " next_attempt_at = coalesce(:next::double precision, next_attempt_at),"
            " given_up_at = CASE WHEN :next::double precision IS NULL"
            " THEN :now::double precision ELSE NULL END"
            " WHERE id = :id",
            {"id": delivery_id, "error": error[:500], "next": next_attempt_at, "now": now},
        )

    async def next_hook_due(self) -> float | None:
        value = await self._value(
            "SELECT min(next_attempt_at) FROM hook_deliveries"
            " WHERE delivered_at IS NULL AND given_up_at IS NULL"
        )
        return None if value is None else float(value)

    async def pending_hooks(self) -> int:
        value = await self._value(
            "SELECT count(*) FROM hook_deliveries"
            " WHERE delivered_at IS NULL AND given_up_at IS NULL"
        )
        return int(value or 0)

    # ---- token-set events (refresherd.events): queued by anyone, expanded by a dispatcher ---

    async def enqueue_event(
        self, *, event_id: str, event_type: str, payload: str, now: float
    ) -> None:
        """Queue one event for whichever daemon delivers hooks; an event id queued already is
        kept."""
        await self._write(
            "INSERT INTO hook_events (event_id, event_type, payload, created_at)"
            " VALUES (:event_id, :event_type, :payload, :now) ON CONFLICT (event_id) DO NOTHING",
            {"event_id": event_id, "event_type": event_type, "payload": payload, "now": now},
        )

    async def expand_events(
        self, *, targets: Sequence[str], event_types: Sequence[str], now: float, limit: int
    ) -> int:
        """As Store.expand_events, in one statement; events another daemon is expanding right
        now are skipped (SKIP LOCKED), so each is taken once."""
        value = await self._write(
            "WITH taken AS (DELETE FROM hook_events WHERE id IN (SELECT id FROM hook_events"
            " ORDER BY id LIMIT :limit FOR UPDATE SKIP LOCKED)"
            " RETURNING event_id, event_type, payload, created_at),"
            " queued AS (INSERT INTO hook_deliveries (event_id, target, event_type, payload,"
            " created_at, next_attempt_at) SELECT t.event_id, target, t.event_type, t.payload,"
            " t.created_at, :now FROM taken t CROSS JOIN unnest(:targets::text[]) AS target"
            " WHERE cardinality(:types::text[]) = 0 OR t.event_type = ANY(:types::text[])"
            " ON CONFLICT (event_id, target) DO NOTHING RETURNING 1)"
            " SELECT (SELECT count(*) FROM taken), (SELECT count(*) FROM queued)",
            {"limit": limit, "now": now, "targets": list(targets), "types": list(event_types)},
        )
        return int(value[0][0])

    async def prune_events(self, *, before: float) -> tuple[int, int]:
        """As Store.prune_events."""
        events = await self._write(
            "WITH gone AS (DELETE FROM hook_events WHERE created_at < :before RETURNING 1)"
            " SELECT count(*) FROM gone",
            {"before": before},
        )
        deliveries = await self._write(
            "WITH gone AS (DELETE FROM hook_deliveries WHERE delivered_at < :before"
            " OR given_up_at < :before RETURNING 1) SELECT count(*) FROM gone",
            {"before": before},
        )
        return int(events[0][0]), int(deliveries[0][0])

    async def invalidation_counts(self) -> dict[tuple[str, str], int]:
        """Invalidations ever recorded in this database, by (provider, reason)."""
        rows = await self._read("SELECT provider, reason, count FROM invalidation_counts")
        return {(r[0], r[1]): int(r[2]) for r in rows}

    # ---- moving a whole database (refresherd migrate) -------------------------------------

    async def export_rows(self, table: str, *, batch: int = 1000) -> AsyncIterator[list[Row]]:
        columns, key = _table_columns(table)
        if "," in key:
            rows = await self._read(f"SELECT {', '.join(columns)} FROM {table} ORDER BY {key}")
            if rows:
                yield [tuple(r) for r in rows]
            return
        after: Any = None
        while True:
            where = "" if after is None else f" WHERE {key} > :after"
            rows = await self._read(
                f"SELECT {', '.join(columns)} FROM {table}{where} ORDER BY {key} LIMIT :limit",
                {"after": after, "limit": batch} if after is not None else {"limit": batch},
            )
            if not rows:
                return
            yield [tuple(r) for r in rows]
            if len(rows) < batch:
                return
            after = rows[-1][key]

    async def load_rows(self, table: str, rows: AsyncIterator[list[Row]]) -> int:
        """Insert rows as ``export_rows`` yields them, all or nothing, into an empty table;
        the id sequence of hook_deliveries or hook_events then continues after the largest id."""
        columns, _ = _table_columns(table)
        count = 0
        with self._errors():
            async with self._pool.acquire() as conn, conn.transaction():
                # No daemon writes meanwhile: the table is empty and must stay ours to fill.
                await conn.execute(f"LOCK TABLE {table} IN EXCLUSIVE MODE")
                if await conn.fetchval(f"SELECT EXISTS (SELECT 1 FROM {table})"):
                    raise StoreError(f"database {self.location}: table {table} is not empty")
                async for chunk in rows:
                    if chunk:
                        await conn.copy_records_to_table(
                            table, records=chunk, columns=list(columns), timeout=BULK_TIMEOUT
                        )
                    count += len(chunk)
                if table in ("hook_deliveries", "hook_events") and count:
                    await conn.execute(
                        f"SELECT setval(pg_get_serial_sequence('{table}', 'id'),"
                        f" (SELECT max(id) FROM {table}))"
                    )
                if table == "token_sets":
                    await self._record_gone_owners(conn)
        return count

    @staticmethod
    async def _record_gone_owners(conn: _Conn) -> None:
        """Owners the loaded rows name (leases, journaled attempts) were processes of the
        source database, all gone (migrate refuses while one lives). Recorded with a lock key
        nobody holds, they read as dead; unknown, they would read as alive for ever, and a
        journaled attempt of theirs would never be continued."""
        names = await conn.fetch(
            "SELECT lease_owner AS o FROM token_sets WHERE lease_owner IS NOT NULL"
            " UNION SELECT attempt_owner FROM token_sets WHERE attempt_owner IS NOT NULL"
        )
        for row in names:
            while not await conn.fetchval(
                "INSERT INTO refresherd_owners (owner, lock_key, host, pid, started_at)"
                " VALUES ($1, $2, 'migrated', $3, 0) ON CONFLICT DO NOTHING RETURNING true",
                row["o"],
                secrets.randbits(31),
                _pid(row["o"]),
            ):
                if await conn.fetchval(
                    "SELECT true FROM refresherd_owners WHERE owner = $1", row["o"]
                ):
                    break


def _pid(owner: str) -> int:
    """The pid part of an owner id (``<host>-<pid>-<hex>``)."""
    try:
        return int(owner.rsplit("-", 2)[-2])
    except (IndexError, ValueError):
        return 0
