"""The SQLite store: one host, one file, the shared statements of sql.py on SQLite.

One aiosqlite connection per process, in autocommit mode; every multi-statement change runs in
``BEGIN IMMEDIATE`` under an in-process lock so coroutines never interleave transactions.
WAL with ``synchronous=FULL``: a commit that returned is on disk, which is what lets the
refresher promise "persisted before used or reported". Single writes share commits (group
commit, :meth:`SqliteStore._write`); gauges and listings read on a second connection, token
reads (``read``) and the token cache's change feed on a third (:class:`SqliteChangeFeed`). Lease
owners, and the one daemon that exports the database's figures, hold an flock next to the
database (refresherd.ownership).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import sqlite3
import time
from collections import deque
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Iterable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import aiosqlite
import anyio

from refresherd.encryption import TokenCipher
from refresherd.model import TokenSet
from refresherd.ownership import OwnerLock, is_alive, owners_dir, take_exporter_lock
from refresherd.storage_health import classify
from refresherd.store.contract import (
    NewTokenSet,
    Row,
    StoreError,
    TokenSetExists,
    location_problem,
)
from refresherd.store.migrations import SQLITE, split_sql
from refresherd.store.rows import INSERT_COLUMNS, INSERT_COLUMNS_SQL, table_columns
from refresherd.store.sql import SQLITE as SQLITE_OPERATIONS
from refresherd.store.sql import SqlStore, make_due_written_after_sql

__all__ = ["BUSY_TIMEOUT_MS", "JOURNAL_SIZE_LIMIT", "SqliteChangeFeed", "SqliteStore"]

BUSY_TIMEOUT_MS: Final = 5000
# A checkpoint that a long-lived reader held back lets the WAL grow; once it completes, the
# next writer truncates the file back to this size instead of keeping its peak for ever.
JOURNAL_SIZE_LIMIT: Final = 4 * 1024 * 1024
# Group commits SQLite's thread runs back to back in one drain (see SqliteStore._write): no
# more than this many, and none started after this many seconds, before the store lock is let
# go, so that reads and transactions get their turn under steady writes (and while every batch
# waits out a busy timeout on a database another process holds, one batch per turn, as before).
DRAIN_BATCHES: Final = 8
DRAIN_SECONDS: Final = 0.05
# More changed token sets than this since the last catch-up: forget the whole cache rather
# than read them all (a rekey, a mass invalidation).
CHANGES_PER_CATCH_UP: Final = 10_000
# Start-up's look for rows written ahead of a wall clock stepped back (sql.py).
MAKE_DUE_WRITTEN_AFTER: Final = make_due_written_after_sql(SQLITE_OPERATIONS)

_COLUMNS: Final = INSERT_COLUMNS_SQL
# A hook delivery as enqueue_hook and expand_events queue it (an event queued already is kept).
_INSERT_DELIVERY: Final = (
    "INSERT OR IGNORE INTO hook_deliveries (event_id, target, event_type, payload, created_at,"
    " next_attempt_at) VALUES (?, ?, ?, ?, ?, ?)"
)
# A new token set (add_many, import_stream's staging), its values in INSERT_COLUMNS order.
_INSERT: Final = (
    f"INSERT INTO {{table}} ({_COLUMNS}) VALUES ({', '.join('?' * len(INSERT_COLUMNS))})"
)

# import_stream's staging table: the inserted columns, with the key that catches a repeated id,
# and where each row was read (for the error that names an id stored already).
_STAGING: Final = (
    "CREATE TEMP TABLE import_staging (id TEXT PRIMARY KEY NOT NULL, provider, access_token,"
    " refresh_token, token_type, scope, expires_at, next_refresh_at, refresh_expires_at,"
    " refresh_token_usage, grace_period, refresh_token_lifetime, refresh_token_idle_lifetime,"
    " refresh_mode, created_at, updated_at, source TEXT NOT NULL)"
)
_STAGE: Final = (
    f"INSERT INTO temp.import_staging ({_COLUMNS}, source)"
    f" VALUES ({', '.join('?' * (len(INSERT_COLUMNS) + 1))})"
)


# sqlite3 quotes a column's raw text in a decode error ("Could not decode to UTF-8 column 'x'
# with text '...'"): for a token column that text is a secret, and StoreError messages are logged.
_QUOTED_TEXT: Final = re.compile(r"with text '.*'", re.DOTALL)


def _sqlite_error(path: Path, exc: sqlite3.Error) -> StoreError:
    message = _QUOTED_TEXT.sub("with text [redacted]", str(exc))
    return StoreError(f"database {path}: {message}", reason=classify(exc))


def _exists(path: Path) -> bool:
    """Like Path.exists, except that a path we may not look at raises (PermissionError)
    instead of passing for absent: "does not exist" would send an operator the wrong way."""
    try:
        os.stat(path)
    except FileNotFoundError:
        return False
    return True


def _create_private_file(path: Path) -> None:
    """Create the database file 0600 before SQLite does; its -wal/-shm inherit that mode."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    except FileExistsError:
        return
    os.close(fd)


@dataclass(slots=True, eq=False)
class _PendingWrite:
    sql: str
    params: dict[str, Any]
    rows: list[sqlite3.Row] = field(default_factory=list)
    error: BaseException | None = None
    done: bool = False
    # Resolved on the event loop when the write is done, or when its writer is to lead the
    # next drain (SqliteStore._write). A bare future, not an anyio.Event: two of these per
    # refresh, and anyio's event (backend lookup, wrapped asyncio.Event) was a measurable share
    # of the daemon's CPU. The store is asyncio-bound anyway (aiosqlite).
    wake: asyncio.Future[None] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )


def _fail_all(batch: list[_PendingWrite], exc: BaseException) -> None:
    for item in batch:
        item.rows = []
        item.error = exc
        item.done = True


def _wake(item: _PendingWrite) -> None:
    if not item.wake.done():
        item.wake.set_result(None)


def _wake_all(batch: list[_PendingWrite]) -> None:
    for item in batch:
        _wake(item)


def _drain(
    conn: sqlite3.Connection,
    pending: deque[_PendingWrite],
    notify: Callable[[list[_PendingWrite]], object],
) -> int:
    """On SQLite's thread: commit what is pending, batch after batch while writes keep coming
    (at most DRAIN_BATCHES, none started after DRAIN_SECONDS), each batch handed back to the
    event loop (``notify``, thread-safe) the moment it is committed. Returns how many batches
    committed something.

    The event loop appends to ``pending`` meanwhile; deque appends and pops are atomic."""
    commits = 0
    deadline = time.monotonic() + DRAIN_SECONDS
    for n in range(DRAIN_BATCHES):
        if n and time.monotonic() > deadline:
            break
        batch: list[_PendingWrite] = []
        while pending:
            batch.append(pending.popleft())
        if not batch:
            break
        try:
            _run_batch(conn, batch)
        except BaseException as exc:
            _fail_all([i for i in batch if not i.done], exc)
            notify(batch)
            raise
        if any(item.error is None for item in batch):
            commits += 1
        notify(batch)
    return commits


def _run_batch(conn: sqlite3.Connection, batch: list[_PendingWrite]) -> None:
    """On SQLite's thread: ``batch`` in one transaction (or one autocommit statement)."""
    if len(batch) == 1:
        item = batch[0]
        try:
            item.rows = conn.execute(item.sql, item.params).fetchall()
        except sqlite3.Error as exc:
            item.error = exc
        item.done = True
        return
    try:
        conn.execute("BEGIN IMMEDIATE")
    except sqlite3.Error as exc:
        _fail_all(batch, exc)
        return
    for item in batch:
        try:
            item.rows = conn.execute(item.sql, item.params).fetchall()
        except sqlite3.Error as exc:
            item.error = exc
            if not conn.in_transaction:
                _fail_all(batch, exc)
                return
    try:
        conn.execute("COMMIT")
    except sqlite3.Error as exc:
        with contextlib.suppress(sqlite3.Error):
            conn.execute("ROLLBACK")
        _fail_all(batch, exc)
        return
    for item in batch:
        item.done = True


def _open_probe(path: Path) -> sqlite3.Connection:
    """The change feed's probe: read-only, no busy wait, usable from the event loop's thread."""
    conn = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False)
    try:
        conn.execute("PRAGMA busy_timeout = 0")
        conn.execute("PRAGMA query_only = 1")
    except BaseException:
        conn.close()
        raise
    return conn


class SqliteChangeFeed:
    """:class:`~refresherd.store.contract.ChangeFeed` on SQLite: ``PRAGMA data_version`` on
    the probe tells whether any other connection (another process's, or this one's writer)
    has committed since the last catch-up; the catch-up reads the rows of
    ``token_set_changes`` after the last one seen."""

    def __init__(
        self,
        probe: sqlite3.Connection,
        read: Callable[[str, dict[str, Any]], Awaitable[list[sqlite3.Row]]],
    ) -> None:
        self._probe = probe
        self._read = read
        # data_version as sampled before the last catch-up's read (None: unknown).
        self._seen: int | None = None
        # The last row of the log seen (0: the log was empty, its first row is 1).
        self._last = 0
        # Looked, and found quiet, in this turn of the event loop (see quiet).
        self._quiet_this_turn = False

    def __repr__(self) -> str:
        return f"<SqliteChangeFeed after {self._last}>"

    def _data_version(self) -> int | None:
        try:
            return int(self._probe.execute("PRAGMA data_version").fetchall()[0][0])
        except sqlite3.Error:
            return None

    async def start(self) -> None:
        seen = self._data_version()
        rows = await self._read("SELECT max(seq) FROM token_set_changes", {})
        self._last = int(rows[0][0] or 0)
        self._seen = seen

    def quiet(self) -> bool:
        if self._quiet_this_turn:
            return True
        seen = self._seen
        if seen is None or self._data_version() != seen:
            return False
        # Quiet for the rest of this turn of the event loop too: every request handled in it
        # was sent before this turn's poll returned, and so before this look; the next turn
        # looks again (call_soon runs first in it, before anything its poll brings).
        self._quiet_this_turn = True
        asyncio.get_running_loop().call_soon(self._next_turn)
        return True

    def _next_turn(self) -> None:
        self._quiet_this_turn = False

    async def catch_up(self) -> frozenset[str] | None:
        # Sampled first: a commit after this point moves it again, so the next look catches
        # up again, and one before it is in the rows read below.
        seen = self._data_version()
        self._quiet_this_turn = False
        last = self._last
        rows = await self._read(
            "SELECT seq, id FROM token_set_changes WHERE seq >= :last ORDER BY seq LIMIT :limit",
            {"last": last, "limit": CHANGES_PER_CATCH_UP + 1},
        )
        first = rows[0][0] if rows else None
        # The row last seen is read again: gone, it was pruned, with what came after it.
        pruned = (first != last) if last else (first is not None and first != 1)
        if rows:
            self._last = int(rows[-1][0])
        self._seen = seen
        if pruned or len(rows) > CHANGES_PER_CATCH_UP:
            return None
        return frozenset(r[1] for r in rows if r[0] != last)


class _Transaction:
    """Statements in SqliteStore._atomic's transaction (the store lock held)."""

    def __init__(self, conn: aiosqlite.Connection) -> None:
        self._conn = conn

    async def fetch(self, sql: str, params: dict[str, Any]) -> list[sqlite3.Row]:
        async with self._conn.execute(sql, params) as cur:
            return list(await cur.fetchall())

    async def execute_many(self, sql: str, rows: Iterable[Sequence[Any]]) -> None:
        await self._conn.executemany(sql, rows)


class SqliteStore(SqlStore):
    """The store in one SQLite file; see the module docstring and :class:`TokenStore`."""

    ops = SQLITE_OPERATIONS

    def __init__(
        self, path: Path, conn: aiosqlite.Connection, cipher: TokenCipher | None = None
    ) -> None:
        self.path = path
        self._conn = conn
        self._lock = anyio.Lock()
        # Writes waiting for the next group commit (see _write), and what it achieved: single
        # writes asked for and transactions committed (writes / commits = the group size).
        self._pending: deque[_PendingWrite] = deque()
        # True while a writer leads a drain of _pending on SQLite's thread (see _write).
        self._draining = False
        self.writes = 0
        self.commits = 0
        # Opened on first use by _report.
        self._report_conn: aiosqlite.Connection | None = None
        self._report_lock = anyio.Lock()
        # Token reads (read) and the change feed's catch-ups, opened on first use: a third
        # connection, so that a token read waits neither for a commit nor for a gauge's scan.
        self._reads_conn: aiosqlite.Connection | None = None
        self._reads_lock = anyio.Lock()
        # Seals the token columns when set (encryption at rest); None: plaintext.
        self.cipher = cipher
        # While owner() holds: our owner lock, and the exporter lock's descriptor once taken.
        self._owner_lock: OwnerLock | None = None
        self._exporter_fd: int | None = None

    @classmethod
    async def open(
        cls,
        path: Path,
        *,
        create: bool = True,
        cipher: TokenCipher | None = None,
        verify_keys: bool = True,
    ) -> SqliteStore:
        path = Path(path)
        try:
            if create:
                if (problem := location_problem(path)) is not None:
                    raise problem
                _create_private_file(path)
            elif not _exists(path):
                raise StoreError(f"database {path}: no such file")
            if not path.is_file():
                raise StoreError(f"database {path}: not a regular file")
            # Fail here rather than in aiosqlite.connect, whose worker thread would report the
            # failure to an event loop that may be gone by then ("Exception in thread" at exit).
            os.close(os.open(path, os.O_RDWR | os.O_CLOEXEC))
            conn = await aiosqlite.connect(str(path), isolation_level=None)
        except OSError as exc:
            raise StoreError(f"database {path}: cannot open: {exc.strerror or exc}") from exc
        except sqlite3.Error as exc:
            raise StoreError(f"database {path}: cannot open: {exc}") from exc
        conn.row_factory = sqlite3.Row
        store = cls(path, conn, cipher)
        try:
            await store._prepare(verify_keys=verify_keys)
        except BaseException:
            await conn.close()
            raise
        return store

    async def _setup(self) -> None:
        try:
            await self._conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
            mode = await self._switch_to_wal()
            if str(mode).lower() != "wal":
                raise StoreError(f"database {self.path}: cannot switch to WAL (got {mode})")
            await self._conn.execute("PRAGMA synchronous = FULL")
            await self._conn.execute(f"PRAGMA journal_size_limit = {JOURNAL_SIZE_LIMIT}")
            await self._migrate()
        except sqlite3.Error as exc:
            raise _sqlite_error(self.path, exc) from exc

    async def _switch_to_wal(self) -> Any:
        """``PRAGMA journal_mode = WAL``, retried while another connection holds a lock.

        Leaving rollback mode needs an exclusive lock, and SQLite answers SQLITE_BUSY at once,
        without its busy handler, when that would mean waiting on a connection that waits for
        us; two processes opening a new database together (daemon and CLI) meet exactly that.
        """
        deadline = anyio.current_time() + BUSY_TIMEOUT_MS / 1000
        delay = 0.005
        while True:
            try:
                return await self._fetch_value("PRAGMA journal_mode = WAL")
            except sqlite3.OperationalError as exc:
                busy = exc.sqlite_errorcode & 0xFF == sqlite3.SQLITE_BUSY
                if not busy or anyio.current_time() >= deadline:
                    raise
            await anyio.sleep(delay)
            delay = min(delay * 2, 0.1)

    async def _migrate(self) -> None:
        async with self._transaction():
            current = int(await self._fetch_value("PRAGMA user_version"))
            for index in self._versions_to_run(current):
                for statement in split_sql(SQLITE[index]):
                    await self._conn.execute(statement)
                await self._conn.execute(f"PRAGMA user_version = {index + 1}")

    async def close(self) -> None:
        self._release_exporter()
        try:
            for conn in (self._report_conn, self._reads_conn):
                if conn is not None:
                    await conn.close()
        finally:
            await self._conn.close()

    @property
    def location(self) -> str:
        return str(self.path)

    @asynccontextmanager
    async def owner(self, name: str | None) -> AsyncIterator[str]:
        """Hold an owner identity (an flock next to the database, refresherd.ownership) for
        the life of the context; yields the owner id leases are taken under."""
        lock = OwnerLock(self.path, name)
        owner = lock.acquire()
        self._owner_lock = lock
        try:
            yield owner
        finally:
            self._owner_lock = None
            self._release_exporter()
            lock.release()

    async def hold_exporter(self) -> bool:
        """True while this process is the one that exports the database's figures; becomes it
        if none is. An flock on ``<database>.owners/database-exporter``, taken without waiting
        and kept (the descriptor stays open) until owner() ends or the process dies, whichever
        way it dies: the kernel then lets the next daemon that asks take it."""
        if self._owner_lock is None:
            return False
        if self._exporter_fd is None:
            try:
                self._exporter_fd = take_exporter_lock(self.path)
            except OSError as exc:
                raise StoreError(
                    f"database {self.path}: cannot take the exporter lock: {exc.strerror or exc}"
                ) from exc
        return self._exporter_fd is not None

    def _release_exporter(self) -> None:
        if self._exporter_fd is not None:
            os.close(self._exporter_fd)
            self._exporter_fd = None

    async def owner_alive(self, owner: str) -> bool:
        return is_alive(self.path, owner)

    async def live_owners(self) -> set[str]:
        try:
            names = os.listdir(owners_dir(self.path))
        except FileNotFoundError:
            return set()
        except OSError as exc:
            raise StoreError(f"database {self.path}: cannot list its owners: {exc}") from exc
        owners = {n.removesuffix(".lock") for n in names if n.endswith(".lock")}
        return {o for o in owners if is_alive(self.path, o)}

    async def owner_lost(self) -> None:
        # The kernel holds an flock for as long as this process lives: it cannot be lost.
        await anyio.sleep_forever()

    async def schema_version(self) -> int:
        return int(await self._fetch_value("PRAGMA user_version"))

    async def ping(self) -> None:
        """Raise StoreError unless the database answers a read."""
        try:
            async with self._lock:
                await self._fetch_value("SELECT count(*) FROM sqlite_master")
        except sqlite3.Error as exc:
            raise _sqlite_error(self.path, exc) from exc

    async def checkpoint(self) -> tuple[int, int]:
        """A passive WAL checkpoint (never waits for readers or writers): returns the WAL's
        frames and how many of them are now in the database file."""
        rows = await self._read("PRAGMA wal_checkpoint(PASSIVE)")
        _, log_frames, checkpointed = rows[0]
        return int(log_frames), int(checkpointed)

    def wal_bytes(self) -> int:
        """The size of the -wal file now (0 if there is none)."""
        try:
            return os.stat(f"{self.path}-wal").st_size
        except FileNotFoundError:
            return 0

    async def data_version(self) -> int:
        """Changes whenever another connection commits (cheap cross-process change signal)."""
        rows = await self._read("PRAGMA data_version")
        return int(rows[0][0])

    async def _fetch_value(self, sql: str, params: Sequence[Any] | dict[str, Any] = ()) -> Any:
        async with self._conn.execute(sql, params) as cur:
            row = await cur.fetchone()
        return None if row is None else row[0]

    @asynccontextmanager
    async def _transaction(self) -> AsyncIterator[None]:
        """BEGIN IMMEDIATE … COMMIT; the caller must already hold ``self._lock`` or be setup."""
        await self._conn.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            with anyio.CancelScope(shield=True):
                await self._conn.execute("ROLLBACK")
            raise
        else:
            with anyio.CancelScope(shield=True):
                await self._conn.execute("COMMIT")

    @asynccontextmanager
    async def _atomic(self) -> AsyncIterator[_Transaction]:
        """SqlStore._atomic: under the store lock, BEGIN IMMEDIATE … COMMIT, shielded."""
        with anyio.CancelScope(shield=True):
            async with self._lock:
                try:
                    async with self._transaction():
                        yield _Transaction(self._conn)
                except sqlite3.Error as exc:
                    raise _sqlite_error(self.path, exc) from exc

    async def _write(self, sql: str, params: dict[str, Any]) -> list[sqlite3.Row]:
        """One statement, committed before returning, shielded from cancellation: a write that
        SQLite may already have committed must not be abandoned half-way by its caller.

        Group commit: writes queue up in ``_pending``; one writer at a time leads a drain, which
        holds the store lock and runs on SQLite's thread, committing all that is queued in one
        transaction (one fsync for many grants; one statement alone, no BEGIN, when there is
        just one), then what queued up meanwhile, and so on. Each writer waits on its own event,
        set when its batch is committed. So the next batch starts as soon as the previous one
        is on disk, not after the event loop has come round to it: a round trip to the loop
        between batches (with every writer of the batch resuming in between) left SQLite idle
        two thirds of the time and made each write wait for several batches.
        """
        item = _PendingWrite(sql, params)
        self._pending.append(item)
        self.writes += 1
        with anyio.CancelScope(shield=True):
            while not item.done:
                if self._draining:
                    await item.wake
                    if not item.done:
                        # Left over by the drain that ended (see below): lead the next one.
                        item.wake = asyncio.get_running_loop().create_future()
                    continue
                self._draining = True
                try:
                    async with self._lock:
                        await self._drain_pending()
                finally:
                    self._draining = False
                    # Queued after the drain's last look, or past its cap: the first of them
                    # leads the next drain.
                    if self._pending:
                        _wake(self._pending[0])
        if isinstance(item.error, sqlite3.Error):
            raise _sqlite_error(self.path, item.error) from item.error
        if item.error is not None:
            raise StoreError(f"database {self.path}: {item.error}") from item.error
        return item.rows

    async def _drain_pending(self) -> None:
        """Commit what is pending (the caller holds the lock); every write taken ends done,
        with rows or an error, and woken. An error that ends a transaction fails every write
        in it (none of them is committed); one that only undoes its own statement fails that
        write alone. An unexpected error fails all that is pending and leaves no transaction
        open."""
        loop = asyncio.get_running_loop()

        def notify(batch: list[_PendingWrite]) -> None:
            loop.call_soon_threadsafe(_wake_all, batch)

        try:
            # aiosqlite has no public "run this on the connection's thread"; its methods are
            # built on _execute, and 0.20-0.22 keep it stable. _drain touches nothing else.
            self.commits += await self._conn._execute(  # type: ignore[no-untyped-call]
                _drain, self._conn._conn, self._pending, notify
            )
        except BaseException as exc:
            left = list(self._pending)
            self._pending.clear()
            _fail_all(left, exc)
            _wake_all(left)
            with contextlib.suppress(Exception):
                if self._conn.in_transaction:
                    await self._conn.execute("ROLLBACK")
            raise

    async def _read(self, sql: str, params: dict[str, Any] | None = None) -> list[sqlite3.Row]:
        async with self._lock:
            try:
                return await self._rows(sql, params or {})
            except sqlite3.Error as exc:
                raise _sqlite_error(self.path, exc) from exc

    async def _rows(self, sql: str, params: dict[str, Any]) -> list[sqlite3.Row]:
        """A read on the main connection, by a caller that holds the store lock."""
        return list(await self._conn.execute_fetchall(sql, params))

    async def _report(self, sql: str, params: dict[str, Any] | None = None) -> list[sqlite3.Row]:
        """A read for gauges and listings, on a second connection (its own thread; WAL lets it
        read beside the writer), so that scanning many token sets never delays a claim or a
        grant on the main connection."""
        async with self._report_lock:
            try:
                if self._report_conn is None:
                    self._report_conn = await self._connect_read_only()
                return list(await self._report_conn.execute_fetchall(sql, params or {}))
            except sqlite3.Error as exc:
                raise _sqlite_error(self.path, exc) from exc

    async def _read_apart(self, sql: str, params: dict[str, Any]) -> list[sqlite3.Row]:
        """A read on the reads connection (its own thread; WAL lets it read beside the
        writer): no store lock, so reads never queue behind writes or each other's locks."""
        try:
            if self._reads_conn is None:
                async with self._reads_lock:
                    if self._reads_conn is None:
                        self._reads_conn = await self._connect_read_only()
            return list(await self._reads_conn.execute_fetchall(sql, params))
        except sqlite3.Error as exc:
            raise _sqlite_error(self.path, exc) from exc

    async def _connect_read_only(self) -> aiosqlite.Connection:
        conn = await aiosqlite.connect(str(self.path), isolation_level=None)
        try:
            conn.row_factory = sqlite3.Row
            await conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
            await conn.execute("PRAGMA query_only = 1")
        except BaseException:
            await conn.close()
            raise
        return conn

    async def read(self, token_set_id: str) -> TokenSet | None:
        rows = await self._read_apart(
            "SELECT * FROM token_sets WHERE id = :id", {"id": token_set_id}
        )
        return self._token_set(rows[0]) if rows else None

    @asynccontextmanager
    async def change_feed(self) -> AsyncIterator[SqliteChangeFeed]:
        """The change log (migration 10) read on the reads connection, with ``PRAGMA
        data_version`` on a probe connection of its own, asked on the event loop's thread: a
        look at the WAL index in shared memory, a few microseconds, never a wait (no busy
        timeout: a busy database reads as "may have changed")."""
        try:
            probe = await anyio.to_thread.run_sync(_open_probe, self.path)
        except sqlite3.Error as exc:
            raise _sqlite_error(self.path, exc) from exc
        try:
            feed = SqliteChangeFeed(probe, self._read_apart)
            await feed.start()
            yield feed
        finally:
            probe.close()

    async def add_many(self, items: Iterable[NewTokenSet], *, now: float) -> int:
        """Insert all or nothing. An id that exists already (or twice) raises TokenSetExists."""
        items = list(items)
        rows = [self._insert_values(n, now) for n in items]
        with anyio.CancelScope(shield=True):
            async with self._lock:
                try:
                    async with self._transaction():
                        await self._conn.executemany(_INSERT.format(table="token_sets"), rows)
                except sqlite3.IntegrityError as exc:
                    try:
                        message = await self._conflict([n.id for n in items], self._rows)
                    except sqlite3.Error:
                        message = None
                    if message is None:
                        raise _sqlite_error(self.path, exc) from exc
                    raise TokenSetExists(message) from exc
                except sqlite3.Error as exc:
                    raise _sqlite_error(self.path, exc) from exc
        return len(rows)

    async def import_stream(
        self, chunks: AsyncIterable[Sequence[tuple[str, NewTokenSet]]], *, now: float
    ) -> int:
        """Insert all or nothing, from an input of any size, in bounded memory.

        The rows go to a staging table in this connection's temporary database first (on disk
        when large, with no lock on the token database), chunk by chunk as ``chunks`` yields
        them (its caller reads and parses the next chunk meanwhile); a bad input line, raised
        by ``chunks``, leaves the database untouched. Then one ``INSERT … SELECT`` moves them
        in, holding the write lock only for that. Each item comes with where it was read (a
        line), for the error. Raises TokenSetExists naming the first id that is stored already
        or appears twice in the input, with its ``where``.

        Cancelled (Ctrl-C) at any point before the commit, nothing is imported: the statement
        running is interrupted and the transaction rolled back. The commit is one step.
        """
        # The lock for the whole import: its staging transaction must not meet another
        # coroutine's writes on this connection.
        async with self._lock:
            try:
                await self._conn.execute("DROP TABLE IF EXISTS temp.import_staging")
                await self._conn.execute(_STAGING)
                try:
                    count = await self._stage(chunks, now)
                    await self._move_staged()
                finally:
                    with anyio.CancelScope(shield=True):
                        await self._conn.execute("DROP TABLE IF EXISTS temp.import_staging")
            except sqlite3.Error as exc:
                raise _sqlite_error(self.path, exc) from exc
        return count

    async def _abandon(self) -> None:
        """Stop the statement running for a transaction that failed or was cancelled (SQLite's
        thread may still be in it), and roll the transaction back."""
        with anyio.CancelScope(shield=True):
            await self._conn.interrupt()
            # No transaction is left where its BEGIN itself failed: nothing to roll back.
            with contextlib.suppress(sqlite3.Error):
                await self._conn.execute("ROLLBACK")

    async def _move_staged(self) -> None:
        await self._conn.execute("BEGIN IMMEDIATE")
        try:
            await self._conn.execute(
                f"INSERT INTO main.token_sets ({_COLUMNS})"
                f" SELECT {_COLUMNS} FROM temp.import_staging"
            )
        except sqlite3.IntegrityError:
            await self._abandon()
            taken = await self._rows(
                "SELECT s.id, s.source FROM temp.import_staging s"
                " JOIN main.token_sets t ON t.id = s.id ORDER BY s.rowid LIMIT 1",
                {},
            )
            if not taken:
                raise
            token_set_id, where = taken[0]
            raise TokenSetExists(
                f"{where}: token set {token_set_id!r} exists already (remove it first)"
            ) from None
        except BaseException:
            await self._abandon()
            raise
        with anyio.CancelScope(shield=True):
            await self._conn.execute("COMMIT")

    async def _stage(
        self, chunks: AsyncIterable[Sequence[tuple[str, NewTokenSet]]], now: float
    ) -> int:
        """Insert ``chunks`` into the staging table, in one transaction of its own."""
        count = 0
        await self._conn.execute("BEGIN")
        try:
            async for chunk in chunks:
                try:
                    await self._conn.executemany(
                        _STAGE, [(*self._insert_values(n, now), where) for where, n in chunk]
                    )
                except sqlite3.IntegrityError:
                    # executemany stops at the failing row: the ones before it are in.
                    done = await self._fetch_value("SELECT count(*) FROM temp.import_staging")
                    where, repeated = chunk[done - count]
                    raise TokenSetExists(
                        f"{where}: token set {repeated.id!r} appears twice in the input"
                    ) from None
                count += len(chunk)
        except BaseException:
            await self._abandon()
            raise
        await self._conn.execute("COMMIT")
        return count

    async def _claim_due(
        self, whole_rows: bool, excluding: str, params: dict[str, Any]
    ) -> list[sqlite3.Row]:
        return await self._write(
            "UPDATE token_sets SET lease_owner = :owner, lease_until = :until"
            " WHERE id IN (SELECT id FROM token_sets WHERE state <> 'invalidated'"
            " AND next_refresh_at <= :now AND (lease_owner IS NULL OR lease_until < :now)"
            f"{excluding} ORDER BY next_refresh_at LIMIT :limit)"
            f" RETURNING {'*' if whole_rows else 'id, next_refresh_at'}",
            params,
        )

    async def mark_expiry_warned(self, warned: Sequence[tuple[str, float]]) -> None:
        """Remember, for each ``(token set id, absolute expiry)``, that the warning for that
        expiry was given: one transaction for the whole batch, not a commit per set."""
        if not warned:
            return
        async with self._atomic() as tx:
            await tx.execute_many(
                "UPDATE token_sets SET expiry_warned_for = ? WHERE id = ?",
                [(expires_at, token_set_id) for token_set_id, expires_at in warned],
            )

    # ---- the hook queue: SQLite has one writer at a time, and no DML in a WITH ----------------

    async def _enqueue_hook(
        self, event_id: str, event_type: str, payload: str, targets: Sequence[str], now: float
    ) -> None:
        async with self._atomic() as tx:
            await tx.execute_many(
                _INSERT_DELIVERY, [(event_id, t, event_type, payload, now, now) for t in targets]
            )

    async def _claim_hook_rows(self, params: dict[str, Any]) -> list[sqlite3.Row]:
        return await self._write(
            "UPDATE hook_deliveries SET next_attempt_at = :until, attempts = attempts + 1"
            " WHERE id IN (SELECT id FROM hook_deliveries WHERE delivered_at IS NULL"
            " AND given_up_at IS NULL AND next_attempt_at <= :now"
            " ORDER BY next_attempt_at LIMIT :limit)"
            " RETURNING id, event_id, target, event_type, payload, created_at, attempts",
            params,
        )

    async def _expand_events(
        self, targets: Sequence[str], event_types: Sequence[str], now: float, limit: int
    ) -> int:
        """The events taken and their deliveries queued in one transaction."""
        async with self._atomic() as tx:
            taken = await tx.fetch(
                "DELETE FROM hook_events WHERE id IN"
                " (SELECT id FROM hook_events ORDER BY id LIMIT :limit)"
                " RETURNING event_id, event_type, payload, created_at",
                {"limit": limit},
            )
            await tx.execute_many(
                _INSERT_DELIVERY,
                [
                    (e[0], target, e[1], e[2], e[3], now)
                    for e in taken
                    if not event_types or e[1] in event_types
                    for target in targets
                ],
            )
        return len(taken)

    async def load_rows(self, table: str, rows: AsyncIterator[list[Row]]) -> int:
        columns, _ = table_columns(table)
        sql = f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({', '.join('?' * len(columns))})"
        count = 0
        async with self._lock:
            try:
                async with self._transaction():
                    if await self._fetch_value(f"SELECT count(*) FROM {table}"):
                        raise StoreError(f"database {self.path}: table {table} is not empty")
                    async for chunk in rows:
                        await self._conn.executemany(sql, chunk)
                        count += len(chunk)
            except sqlite3.Error as exc:
                raise _sqlite_error(self.path, exc) from exc
        return count
