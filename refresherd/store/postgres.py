"""The PostgreSQL store: the shared statements of sql.py on PostgreSQL, for a fleet.

Several daemons on several hosts share one database. What SQLite gets from one writer at a
time, PostgreSQL gets from row locks and READ COMMITTED: every conditional write (claim,
journal, grant, failure, lease renewal) keeps all its conditions in the ``UPDATE``'s ``WHERE``,
which PostgreSQL re-checks on the latest committed version of a row it had to wait for, so each
one is a compare-and-swap. Batched claims take rows ``FOR UPDATE SKIP LOCKED``: daemons
claiming together never get the same row and never wait for each other.

- Connections: an asyncpg pool (``pool_size``); each write is one autocommit statement (or one
  short transaction) on its own connection, so concurrent writes commit in parallel and the
  server flushes their WAL together (group commit, with no batching of ours to fail together).
- Writes are shielded from cancellation, as in sqlite.py: one that may have committed is never
  abandoned half-way. ``command_timeout`` bounds them instead (an unreachable server).
- Owners: a session-level advisory lock on a dedicated connection, held for the life of
  :meth:`PostgresStore.owner`; the server drops it when that session ends, however it ends.
  The exporter role (:meth:`PostgresStore.hold_exporter`) is one more advisory lock on that
  same session, so it ends with it.
- Errors are StoreError with a StorageReason (storage_health.classify_postgres); a message names
  the database by its URL without the password and carries only PostgreSQL's primary message,
  never its DETAIL (which quotes row values, tokens included).
"""

from __future__ import annotations

import contextlib
import functools
import re
import secrets
import socket
import time
from collections.abc import (
    AsyncIterable,
    AsyncIterator,
    Awaitable,
    Callable,
    Iterable,
    Iterator,
    Sequence,
)
from contextlib import asynccontextmanager
from typing import Any, Final, TypeAlias
from urllib.parse import parse_qsl, unquote, urlsplit

import anyio
import asyncpg

from refresherd.encryption import TokenCipher
from refresherd.model import TokenSet
from refresherd.ownership import new_owner_id
from refresherd.storage_health import classify_postgres
from refresherd.store.contract import NewTokenSet, Row, StoreError, TokenSetExists
from refresherd.store.location import PostgresLocation
from refresherd.store.migrations import POSTGRES
from refresherd.store.rows import INSERT_COLUMNS, INSERT_COLUMNS_SQL, table_columns
from refresherd.store.sql import POSTGRES as POSTGRES_OPERATIONS
from refresherd.store.sql import SqlStore

__all__ = ["DEFAULT_POOL_SIZE", "PostgresChangeFeed", "PostgresStore"]

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
EXPORTER_LOCK: Final = (0x52464403, 0)

# A connection of our own or one lent by the pool: the same methods.
_Conn: TypeAlias = (
    "asyncpg.Connection[asyncpg.Record] | asyncpg.pool.PoolConnectionProxy[asyncpg.Record]"
)

_COLUMNS: Final = INSERT_COLUMNS_SQL
_INSERT: Final = (
    f"INSERT INTO token_sets ({_COLUMNS})"
    f" VALUES ({', '.join(f'${i}' for i in range(1, len(INSERT_COLUMNS) + 1))})"
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
# (Refresher._sent_elsewhere asks whether that one lives): only such a row may be forgotten.
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


# The channel migration 10's triggers notify, with a token set's id ('' for everything).
ANSWERS_CHANNEL: Final = "refresherd_token_answers"
# More changed ids than this noted between two catch-ups: forget the whole cache instead.
CHANGES_PER_CATCH_UP: Final = 10_000


class PostgresChangeFeed:
    """:class:`~refresherd.store.contract.ChangeFeed` on PostgreSQL: a session of its own
    LISTENs to migration 10's notifications. PostgreSQL delivers them asynchronously, so
    :meth:`quiet` is never true: :meth:`catch_up` runs a round trip on that session, before
    whose answer the server has sent every notification of every transaction that committed
    before it was asked (a listening session's notifications are sent before its next
    ReadyForQuery), and asyncpg runs our callback (call_soon) before the waiting task
    resumes. Concurrent readers share a catch-up (web/token_cache.py). A lost session is
    opened again, and everything counts as changed."""

    def __init__(
        self,
        connect: Callable[[], Awaitable[asyncpg.Connection[asyncpg.Record]]],
        errors: Callable[[], contextlib.AbstractContextManager[None]],
    ) -> None:
        self._connect = connect
        self._errors = errors
        self._conn: asyncpg.Connection[asyncpg.Record] | None = None
        self._changed: set[str] = set()
        self._everything = True  # nothing is known before the first LISTEN

    def __repr__(self) -> str:
        return f"<PostgresChangeFeed {len(self._changed)} changed>"

    def _notified(self, conn: _Conn, pid: int, channel: str, payload: object) -> None:
        if (
            not isinstance(payload, str)
            or not payload
            or len(self._changed) >= CHANGES_PER_CATCH_UP
        ):
            self._everything = True
            self._changed.clear()
        elif not self._everything:
            self._changed.add(payload)

    def _lost(self, conn: object) -> None:
        self._everything = True

    async def _listening(self) -> asyncpg.Connection[asyncpg.Record]:
        conn = self._conn
        if conn is None or conn.is_closed():
            self._conn = None
            conn = await self._connect()
            try:
                conn.add_termination_listener(self._lost)
                await conn.add_listener(ANSWERS_CHANNEL, self._notified)
            except BaseException:
                conn.terminate()
                raise
            self._conn = conn
            self._everything = True
        return conn

    def quiet(self) -> bool:
        return False

    async def catch_up(self) -> frozenset[str] | None:
        with self._errors():
            conn = await self._listening()
            await conn.fetchval("SELECT 1")
        everything, self._everything = self._everything, False
        changed = frozenset(self._changed)
        self._changed.clear()
        return None if everything else changed

    async def aclose(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            try:
                with anyio.move_on_after(OWNER_CHECK_TIMEOUT):
                    await conn.close()
            finally:
                if not conn.is_closed():
                    conn.terminate()


class _Transaction:
    """Statements in PostgresStore._atomic's transaction (one pooled connection)."""

    def __init__(self, conn: _Conn) -> None:
        self._conn = conn

    async def fetch(self, sql: str, params: dict[str, Any]) -> list[asyncpg.Record]:
        text, args = _bind(sql, params)
        return list(await self._conn.fetch(text, *args))


class PostgresStore(SqlStore):
    """The store on PostgreSQL; see the module docstring and :class:`TokenStore`."""

    ops = POSTGRES_OPERATIONS

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
            await store._prepare(verify_keys=verify_keys)
        except BaseException:
            pool.terminate()
            raise
        return store

    async def _setup(self) -> None:
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
                for index in self._versions_to_run(current):
                    await conn.execute(POSTGRES[index])
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

    async def hold_exporter(self) -> bool:
        """True while this process exports the database's figures; becomes it if none is.

        The role is a session-level advisory lock (EXPORTER_LOCK) on the owner's connection:
        the server drops it when that session ends, however it ends, and the next daemon to ask
        takes it. A session's advisory locks stack (each take needs its own unlock), so it is
        never taken twice: the one statement asks pg_locks whether this session holds it and
        only tries to take it if not. With the owner connection gone, or a check that fails,
        the answer is False (a StoreError for the failure): a session that may have ended
        cannot know it still holds anything, and two exporters would double every sum, while
        none only leaves a gap until the next check."""
        conn = self._owner_conn
        if conn is None or conn.is_closed() or self._owner_gone.is_set():
            return False
        async with self._owner_check:  # one statement at a time on the owner connection
            try:
                held = await conn.fetchval(
                    "SELECT CASE WHEN EXISTS (SELECT 1 FROM pg_locks WHERE locktype = 'advisory'"
                    " AND pid = pg_backend_pid() AND classid = $1::int::oid"
                    " AND objid = $2::int::oid AND objsubid = 2 AND granted)"
                    " THEN true ELSE pg_try_advisory_lock($1::int, $2::int) END",
                    *EXPORTER_LOCK,
                )
            except _DRIVER_ERRORS as exc:
                raise self._error(exc, "cannot tell whether this daemon is the exporter") from None
        return bool(held) and self._owner_conn is conn and not self._owner_gone.is_set()

    async def read(self, token_set_id: str) -> TokenSet | None:
        """get(): every read here runs on a pooled connection of its own already."""
        return await self.get(token_set_id)

    @asynccontextmanager
    async def change_feed(self) -> AsyncIterator[PostgresChangeFeed]:
        async def connect() -> asyncpg.Connection[asyncpg.Record]:
            return await asyncpg.connect(
                self._location.dsn.reveal(),
                timeout=CONNECT_TIMEOUT,
                command_timeout=COMMAND_TIMEOUT,
                server_settings={"application_name": "refresherd token cache"},
            )

        feed = PostgresChangeFeed(connect, self._errors)
        try:
            yield feed
        finally:
            with anyio.CancelScope(shield=True), contextlib.suppress(*_DRIVER_ERRORS):
                await feed.aclose()

    async def schema_version(self) -> int:
        return int(await self._value("SELECT version FROM refresherd_schema"))

    async def ping(self) -> None:
        """Raise StoreError unless the database answers a read."""
        await self._value("SELECT version FROM refresherd_schema")

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

    @asynccontextmanager
    async def _atomic(self) -> AsyncIterator[_Transaction]:
        """SqlStore._atomic: a transaction on one pooled connection, shielded."""
        with anyio.CancelScope(shield=True), self._errors():
            async with self._pool.acquire() as conn, conn.transaction():
                yield _Transaction(conn)

    async def add_many(self, items: Iterable[NewTokenSet], *, now: float) -> int:
        """Insert all or nothing. An id that exists already (or twice) raises TokenSetExists."""
        items = list(items)
        if not items:
            return 0
        rows = [self._insert_values(n, now) for n in items]
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
            message = await self._conflict([n.id for n in items], self._read)
        if message is None:
            raise duplicate
        raise TokenSetExists(message)

    async def import_stream(
        self, chunks: AsyncIterable[Sequence[tuple[str, NewTokenSet]]], *, now: float
    ) -> int:
        """Insert all or nothing, from an input of any size, in bounded memory.

        One transaction: the rows are copied chunk by chunk (COPY) into a temporary staging
        table as ``chunks`` yields them, with where each was read; a bad input line, raised by
        ``chunks``, rolls it all back. Then an id repeated in the input, or stored already, is
        named (TokenSetExists, with its ``where``), and one ``INSERT … SELECT`` moves the rows
        in; only that takes locks on token_sets.

        Cancelled (Ctrl-C) at any point before the commit, nothing is imported: the statement
        running is cancelled on the server and the transaction rolled back. The commit is one
        step.
        """
        try:
            with self._errors():
                async with self._pool.acquire() as conn:
                    transaction = conn.transaction()
                    await transaction.start()
                    try:
                        await conn.execute(_STAGING)
                        count = await self._stage(conn, chunks, now)
                        await self._move_staged(conn)
                    except BaseException:
                        with anyio.CancelScope(shield=True), contextlib.suppress(*_DRIVER_ERRORS):
                            await transaction.rollback()
                        raise
                    with anyio.CancelScope(shield=True):
                        await transaction.commit()
        except _InputFailed as failed:
            raise failed.error from None
        return count

    async def _stage(
        self,
        conn: _Conn,
        chunks: AsyncIterable[Sequence[tuple[str, NewTokenSet]]],
        now: float,
    ) -> int:
        columns = ["ord", "source", *INSERT_COLUMNS]
        count = 0
        iterator = aiter(chunks)
        while True:
            try:
                chunk = await anext(iterator)
            except StopAsyncIteration:
                return count
            except Exception as exc:  # a bad input line, raised by ``chunks``
                raise _InputFailed(exc) from exc
            records = [
                (count + i, where, *self._insert_values(n, now))
                for i, (where, n) in enumerate(chunk)
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
            "SELECT s.id, s.source FROM import_staging s JOIN token_sets t ON t.id = s.id"
            " ORDER BY s.ord LIMIT 1"
        )
        taken = await conn.fetchrow(taken_sql, timeout=BULK_TIMEOUT)
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
                taken = await conn.fetchrow(taken_sql, timeout=BULK_TIMEOUT)
                if taken is None:
                    raise
        raise TokenSetExists(
            f"{taken['source']}: token set {taken['id']!r} exists already (remove it first)"
        )

    async def _claim_due(
        self, whole_rows: bool, excluding: str, params: dict[str, Any]
    ) -> list[asyncpg.Record]:
        """Rows another daemon is claiming right now are skipped, not waited for (SKIP
        LOCKED); the lease conditions are checked again on the row as locked."""
        return await self._write(
            "WITH due AS (SELECT id FROM token_sets WHERE state <> 'invalidated'"
            " AND next_refresh_at <= :now AND (lease_owner IS NULL OR lease_until < :now)"
            f"{excluding} ORDER BY next_refresh_at LIMIT :limit FOR UPDATE SKIP LOCKED)"
            " UPDATE token_sets t SET lease_owner = :owner, lease_until = :until FROM due"
            " WHERE t.id = due.id AND t.state <> 'invalidated'"
            " AND (t.lease_owner IS NULL OR t.lease_until < :now)"
            f" RETURNING {'t.*' if whole_rows else 't.id, t.next_refresh_at'}",
            params,
        )

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

    async def _enqueue_hook(
        self, event_id: str, event_type: str, payload: str, targets: Sequence[str], now: float
    ) -> None:
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

    async def _claim_hook_rows(self, params: dict[str, Any]) -> list[asyncpg.Record]:
        """Deliveries another daemon is claiming right now are skipped (SKIP LOCKED)."""
        return await self._write(
            "WITH due AS (SELECT id FROM hook_deliveries WHERE delivered_at IS NULL"
            " AND given_up_at IS NULL AND next_attempt_at <= :now"
            " ORDER BY next_attempt_at LIMIT :limit FOR UPDATE SKIP LOCKED)"
            " UPDATE hook_deliveries h SET next_attempt_at = :until, attempts = h.attempts + 1"
            " FROM due WHERE h.id = due.id AND h.delivered_at IS NULL"
            " AND h.given_up_at IS NULL AND h.next_attempt_at <= :now"
            " RETURNING h.id, h.event_id, h.target, h.event_type, h.payload, h.created_at,"
            " h.attempts",
            params,
        )

    async def _expand_events(
        self, targets: Sequence[str], event_types: Sequence[str], now: float, limit: int
    ) -> int:
        """In one statement; events another daemon is expanding right now are skipped (SKIP
        LOCKED), so each is taken once."""
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

    async def load_rows(self, table: str, rows: AsyncIterator[list[Row]]) -> int:
        """Insert rows as ``export_rows`` yields them, all or nothing, into an empty table;
        the id sequence of hook_deliveries or hook_events then continues after the largest id."""
        columns, _ = table_columns(table)
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
