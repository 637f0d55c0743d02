"""The only module that speaks SQL: migrations, claims, leases, the journal, compare-and-swap.

One aiosqlite connection per process, in autocommit mode; every multi-statement change runs in
``BEGIN IMMEDIATE`` under an in-process lock so coroutines never interleave transactions.
WAL with ``synchronous=FULL``: a commit that returned is on disk, which is what lets the
refresher promise "persisted before used or reported".
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import itertools
import os
import re
import sqlite3
import stat
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import aiosqlite
import anyio

from refresherd.encryption import EncryptionError, TokenCipher
from refresherd.model import Attempt, RefreshMode, RefreshTokenUsage, Secret, State, TokenSet
from refresherd.ownership import OwnerLock, is_alive, owners_dir
from refresherd.storage_health import classify
from refresherd.store_contract import (
    HOOK_DELIVERY_COLUMNS,
    HOOK_EVENT_COLUMNS,
    INVALIDATION_COUNT_COLUMNS,
    JOURNAL_SEND_SQL,
    SERIES_MISSED_SQL,
    TOKEN_SET_COLUMNS,
    ClaimRefused,
    DatabaseMisconfigured,
    HookDelivery,
    NewTokenSet,
    Row,
    StoreError,
    TokenSetExists,
    check_keys,
    claim_refusal,
    first_conflict,
)

__all__ = [
    "ClaimRefused",
    "HookDelivery",
    "NewTokenSet",
    "Store",
    "StoreError",
    "TokenSetExists",
]

BUSY_TIMEOUT_MS: Final = 5000
# A checkpoint that a long-lived reader held back lets the WAL grow; once it completes, the
# next writer truncates the file back to this size instead of keeping its peak for ever.
JOURNAL_SIZE_LIMIT: Final = 4 * 1024 * 1024
# Group commits SQLite's thread runs back to back in one drain (see Store._write): no more than
# this many, and none started after this many seconds, before the store lock is let go, so
# that reads and transactions get their turn under steady writes (and while every batch waits
# out a busy timeout on a database another process holds, one batch per turn, as before).
DRAIN_BATCHES: Final = 8
DRAIN_SECONDS: Final = 0.05
READ_CONTRACT_VIEW: Final = "refresherd_access_tokens"
# Start-up's look for rows written ahead of a wall clock stepped back since. The index
# token_sets_written finds them (they are few); the unary + keeps the planner off the due-time
# index, which would visit almost every row.
MAKE_DUE_WRITTEN_AFTER: Final = (
    "UPDATE token_sets SET next_refresh_at = :now WHERE state != 'invalidated'"
    " AND updated_at > :limit AND +next_refresh_at > :now RETURNING id"
)
# Ids per ``IN (...)`` query: well below SQLite's bound-parameter limit.
_ID_CHUNK: Final = 500

# Each entry moves the schema from version i to i+1 (PRAGMA user_version). Never edit a
# released entry: append a new one.
MIGRATIONS: Final[tuple[str, ...]] = (
    """
    CREATE TABLE token_sets (
        id TEXT PRIMARY KEY NOT NULL,
        provider TEXT NOT NULL,
        access_token TEXT,
        refresh_token TEXT NOT NULL,
        token_type TEXT,
        scope TEXT,
        expires_at REAL,
        state TEXT NOT NULL DEFAULT 'active'
            CHECK (state IN ('active', 'failing', 'invalidated')),
        version INTEGER NOT NULL DEFAULT 1,
        next_refresh_at REAL NOT NULL,
        created_at REAL NOT NULL,
        updated_at REAL NOT NULL,
        last_refresh_at REAL,
        last_error TEXT,
        failures INTEGER NOT NULL DEFAULT 0,
        invalid_reason TEXT,
        lease_owner TEXT,
        lease_until REAL,
        attempt_version INTEGER,
        attempt_started_at REAL,
        attempt_owner TEXT,
        attempt_sends INTEGER
    ) STRICT;
    CREATE INDEX token_sets_due ON token_sets (next_refresh_at) WHERE state != 'invalidated';
    CREATE INDEX token_sets_leased ON token_sets (lease_owner) WHERE lease_owner IS NOT NULL;
    CREATE INDEX token_sets_journal ON token_sets (attempt_started_at)
        WHERE attempt_started_at IS NOT NULL;
    -- The read contract for applications that read access tokens straight from the database.
    -- Columns are only ever added to this view, never renamed or removed.
    CREATE VIEW refresherd_access_tokens AS
        SELECT id, provider, access_token, token_type, scope, expires_at,
               strftime('%Y-%m-%dT%H:%M:%SZ', expires_at, 'unixepoch') AS expires_at_rfc3339,
               state, updated_at
        FROM token_sets;
    """,
    """
    -- The refresh token's absolute expiry where known (from the IdP's response or the token
    -- set's import); the provider's configured lifetime counts from created_at otherwise.
    ALTER TABLE token_sets ADD COLUMN refresh_expires_at REAL;
    """,
    """
    -- Per-token-set policy: an IdP setting change applies only to token sets authorized after
    -- it, so a set may carry its own values. NULL means: the provider's configured value.
    ALTER TABLE token_sets ADD COLUMN refresh_token_usage TEXT
        CHECK (refresh_token_usage IN ('one_time', 'reuse'));
    ALTER TABLE token_sets ADD COLUMN grace_period REAL;
    ALTER TABLE token_sets ADD COLUMN refresh_token_lifetime REAL;
    """,
    """
    -- Sliding lifetime and keep-alive mode per token set (NULL: the provider's), and when the
    -- absolute refresh-token expiry the "expiring soon" warning was given for (once per expiry).
    ALTER TABLE token_sets ADD COLUMN refresh_token_idle_lifetime REAL;
    ALTER TABLE token_sets ADD COLUMN refresh_mode TEXT
        CHECK (refresh_mode IN ('access_token', 'keep_alive'));
    ALTER TABLE token_sets ADD COLUMN expiry_warned_for REAL;
    """,
    """
    -- The hook queue (refresherd.hooks): one row per event and target, kept until delivered
    -- or given up, so that no notification is lost across restarts. Payloads hold no secrets.
    -- next_attempt_at doubles as the claim: a dispatcher moves it past its delivery timeout.
    CREATE TABLE hook_deliveries (
        id INTEGER PRIMARY KEY,
        event_id TEXT NOT NULL,
        target TEXT NOT NULL CHECK (target IN ('webhook', 'command')),
        event_type TEXT NOT NULL,
        payload TEXT NOT NULL,
        created_at REAL NOT NULL,
        attempts INTEGER NOT NULL DEFAULT 0,
        next_attempt_at REAL NOT NULL,
        last_error TEXT,
        delivered_at REAL,
        given_up_at REAL,
        UNIQUE (event_id, target)
    ) STRICT;
    CREATE INDEX hook_deliveries_due ON hook_deliveries (next_attempt_at)
        WHERE delivered_at IS NULL AND given_up_at IS NULL;
    """,
    """
    -- One row a paused daemon rewrites to learn whether the database takes writes again: a
    -- real page write, so a full disk or a read-only file fails it, and a held lock blocks it.
    CREATE TABLE storage_probe (
        id INTEGER PRIMARY KEY CHECK (id = 1),
        probed_at REAL NOT NULL,
        owner TEXT NOT NULL
    ) STRICT;
    """,
    """
    -- Start-up looks for sets written on a wall clock that has since been stepped back
    -- (Store.make_due_written_after): without this, a scan of every row under the write lock,
    -- 3 s at a million sets.
    CREATE INDEX token_sets_written ON token_sets (updated_at) WHERE state != 'invalidated';
    """,
    """
    -- Token-set events (refresherd.events), queued by whichever process observes them (a
    -- daemon with or without [hooks], `refresherd refresh`, the API), which need not know the
    -- hook targets: a daemon with [hooks] turns each into hook_deliveries rows for its own
    -- targets and deletes it (Store.expand_events). One that no daemon takes is deleted once
    -- older than hooks.give_up_after (Store.prune_events).
    CREATE TABLE hook_events (
        id INTEGER PRIMARY KEY,
        event_id TEXT NOT NULL UNIQUE,
        event_type TEXT NOT NULL,
        payload TEXT NOT NULL,
        created_at REAL NOT NULL
    ) STRICT;
    CREATE INDEX hook_events_created ON hook_events (created_at);
    -- Invalidations counted in the database by the statement that makes them, whichever
    -- process that is: every daemon exports the same figures
    -- (refresherd_database_invalidations_total), so an invalidation made by `refresherd
    -- refresh`, which has no /metrics, is alerted on too. Seeded with the sets invalidated
    -- before this migration.
    CREATE TABLE invalidation_counts (
        provider TEXT NOT NULL,
        reason TEXT NOT NULL,
        count INTEGER NOT NULL,
        PRIMARY KEY (provider, reason)
    ) STRICT;
    INSERT INTO invalidation_counts (provider, reason, count)
        SELECT provider, coalesce(invalid_reason, 'unknown'), count(*) FROM token_sets
        WHERE state = 'invalidated' GROUP BY provider, coalesce(invalid_reason, 'unknown');
    CREATE TRIGGER token_sets_invalidated AFTER UPDATE OF state ON token_sets
        WHEN NEW.state = 'invalidated' AND OLD.state != 'invalidated'
    BEGIN
        INSERT INTO invalidation_counts (provider, reason, count)
            VALUES (NEW.provider, coalesce(NEW.invalid_reason, 'unknown'), 1)
            ON CONFLICT (provider, reason) DO UPDATE SET count = count + 1;
    END;
    """,
    """
    -- The journal tells sends the IdP may have processed from those it provably did not (a
    -- refused connection, a 429/503, another 4xx): after a grace window has closed, only a
    -- series with no unsettled send may start again; any other is a missed window.
    ALTER TABLE token_sets ADD COLUMN attempt_settled INTEGER;
    """,
)
SCHEMA_VERSION: Final = len(MIGRATIONS)

# A row's absolute refresh-token expiry, as policy.refresh_token_expires_at computes it: the
# IdP-stated one, else creation + the set's own lifetime, else the provider's (:lifetime).
_REFRESH_EXPIRY: Final = (
    "coalesce(refresh_expires_at, created_at + coalesce(refresh_token_lifetime, :lifetime))"
)

# The columns a new token set is inserted with (add_many, import_stream).
_COLUMNS: Final = (
    "id, provider, access_token, refresh_token, token_type, scope, expires_at, next_refresh_at,"
    " refresh_expires_at, refresh_token_usage, grace_period, refresh_token_lifetime,"
    " refresh_token_idle_lifetime, refresh_mode, created_at, updated_at"
)
_INSERT: Final = (
    "INSERT INTO {table} (" + _COLUMNS + ") VALUES (:id, :provider, :access_token,"
    " :refresh_token, :token_type, :scope, :expires_at, :next_refresh_at, :refresh_expires_at,"
    " :usage, :grace_period, :lifetime, :idle_lifetime, :mode, :now, :now)"
)
# import_stream's staging table: the inserted columns, with the key that catches a repeated id.
_STAGING: Final = (
    "CREATE TEMP TABLE import_staging (id TEXT PRIMARY KEY NOT NULL, provider, access_token,"
    " refresh_token, token_type, scope, expires_at, next_refresh_at, refresh_expires_at,"
    " refresh_token_usage, grace_period, refresh_token_lifetime, refresh_token_idle_lifetime,"
    " refresh_mode, created_at, updated_at)"
)


# sqlite3 quotes a column's raw text in a decode error ("Could not decode to UTF-8 column 'x'
# with text '...'"): for a token column that text is a secret, and StoreError messages are logged.
_QUOTED_TEXT: Final = re.compile(r"with text '.*'", re.DOTALL)


def _sqlite_error(path: Path, exc: sqlite3.Error) -> StoreError:
    message = _QUOTED_TEXT.sub("with text [redacted]", str(exc))
    return StoreError(f"database {path}: {message}", reason=classify(exc))


# Enum lookups by value without EnumType.__call__ (its cost shows at two rows per refresh); a
# value not in the table still goes through the enum, which names what is wrong.
_STATES: Final = {m.value: m for m in State}
_USAGES: Final = {m.value: m for m in RefreshTokenUsage}
_MODES: Final = {m.value: m for m in RefreshMode}


def _row_to_token_set(row: sqlite3.Row, cipher: TokenCipher | None = None) -> TokenSet:
    # A dict first: a sqlite3.Row looks a name up by comparing it with every column's.
    r = dict(zip(row.keys(), row, strict=True))
    attempt = None
    if r["attempt_started_at"] is not None:
        attempt = Attempt(
            version=r["attempt_version"],
            started_at=r["attempt_started_at"],
            owner=r["attempt_owner"] or "",
            sends=r["attempt_sends"] or 0,
            settled=r["attempt_settled"] or 0,
        )
    access = r["access_token"]
    refresh = r["refresh_token"]
    if cipher is not None:
        try:
            refresh = cipher.open(refresh, row_id=r["id"], column="refresh_token")
            if access is not None:
                access = cipher.open(access, row_id=r["id"], column="access_token")
        except EncryptionError as exc:
            raise StoreError(str(exc)) from None
    state = r["state"]
    usage = r["refresh_token_usage"]
    mode = r["refresh_mode"]
    return TokenSet(
        id=r["id"],
        provider=r["provider"],
        refresh_token=Secret(refresh),
        access_token=Secret(access) if access is not None else None,
        expires_at=r["expires_at"],
        state=_STATES.get(state) or State(state),
        version=r["version"],
        next_refresh_at=r["next_refresh_at"],
        created_at=r["created_at"],
        updated_at=r["updated_at"],
        token_type=r["token_type"],
        scope=r["scope"],
        last_refresh_at=r["last_refresh_at"],
        last_error=r["last_error"],
        failures=r["failures"],
        invalid_reason=r["invalid_reason"],
        lease_owner=r["lease_owner"],
        lease_until=r["lease_until"],
        attempt=attempt,
        refresh_expires_at=r["refresh_expires_at"],
        refresh_token_usage=(
            (_USAGES.get(usage) or RefreshTokenUsage(usage)) if usage is not None else None
        ),
        grace_period=r["grace_period"],
        refresh_token_lifetime=r["refresh_token_lifetime"],
        refresh_token_idle_lifetime=r["refresh_token_idle_lifetime"],
        refresh_mode=(_MODES.get(mode) or RefreshMode(mode)) if mode is not None else None,
        expiry_warned_for=r["expiry_warned_for"],
    )


def _exists(path: Path) -> bool:
    """Like Path.exists, except that a path we may not look at raises (PermissionError)
    instead of passing for absent: "does not exist" would send an operator the wrong way."""
    try:
        os.stat(path)
    except FileNotFoundError:
        return False
    return True


def location_problem(path: Path) -> DatabaseMisconfigured | None:
    """Why a SQLite database cannot work at ``path`` as configured; None if nothing is found.

    Configuration, which a restart does not fix: a directory that does not exist, a path that
    is not a regular file, and permissions (EACCES) that keep this process from the file or
    from writing the directory (SQLite creates the -wal and -shm files there, again after every
    clean close). Storage faults are not reported here: a read-only file system (a remount after
    disk errors) or an immutable file fails the open later, a restartable exit 1."""
    parent = path.parent
    try:
        parent_is_dir = stat.S_ISDIR(os.stat(parent).st_mode)
    except (FileNotFoundError, NotADirectoryError):
        return DatabaseMisconfigured(f"database {path}: directory {parent} does not exist")
    except PermissionError as exc:  # we may not look into one of its parents
        return DatabaseMisconfigured(
            f"database {path}: cannot open: {exc.strerror}", for_everyone=False
        )
    if not parent_is_dir:
        return DatabaseMisconfigured(f"database {path}: {parent} is not a directory")
    try:
        mode: int | None = os.stat(path).st_mode
    except FileNotFoundError:
        mode = None
    except PermissionError as exc:
        return DatabaseMisconfigured(
            f"database {path}: cannot open: {exc.strerror}", for_everyone=False
        )
    if mode is not None and not stat.S_ISREG(mode):
        return DatabaseMisconfigured(f"database {path}: not a regular file")
    who = f"this process (uid {os.geteuid()})"
    if mode is not None:
        try:  # opened for real (nothing written): only the errno tells EACCES from EPERM/EROFS
            os.close(os.open(path, os.O_RDWR | os.O_CLOEXEC))
        except PermissionError as exc:
            if exc.errno == errno.EACCES:
                return DatabaseMisconfigured(
                    f"database {path}: cannot open: {exc.strerror}: {who} may not read and "
                    "write it",
                    for_everyone=False,
                )
        except OSError:
            pass  # a storage fault: the open reports it
    read_only = bool(os.statvfs(parent).f_flag & os.ST_RDONLY)
    if not read_only and not os.access(parent, os.W_OK | os.X_OK):
        return DatabaseMisconfigured(
            f"database {path}: directory {parent} is not writable by {who}; SQLite creates "
            "the database's -wal and -shm files there",
            for_everyone=False,
        )
    return None


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
    # next drain (Store._write). A bare future, not an anyio.Event: two of these per refresh,
    # and anyio's event (backend lookup, wrapped asyncio.Event) was a measurable share of the
    # daemon's CPU. The store is asyncio-bound anyway (aiosqlite).
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


class Store:
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
        # Seals the token columns when set (encryption at rest); None: plaintext.
        self.cipher = cipher

    # ---- lifecycle -------------------------------------------------------------------------

    @classmethod
    async def open(
        cls,
        path: Path,
        *,
        create: bool = True,
        cipher: TokenCipher | None = None,
        verify_keys: bool = True,
    ) -> Store:
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
            await store._setup()
            if verify_keys:
                await store._check_keys()
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
            if current > SCHEMA_VERSION:
                raise StoreError(
                    f"database {self.path}: schema version {current} is newer than this "
                    f"refresherd understands ({SCHEMA_VERSION}); upgrade refresherd"
                )
            for index in range(current, SCHEMA_VERSION):
                for statement in _split_sql(MIGRATIONS[index]):
                    await self._conn.execute(statement)
                await self._conn.execute(f"PRAGMA user_version = {index + 1}")

    async def close(self) -> None:
        try:
            if self._report_conn is not None:
                await self._report_conn.close()
        finally:
            await self._conn.close()

    @property
    def location(self) -> str:
        return str(self.path)

    # ---- owners ----------------------------------------------------------------------------

    @asynccontextmanager
    async def owner(self, name: str | None) -> AsyncIterator[str]:
        """Hold an owner identity (an flock next to the database, refresherd.ownership) for
        the life of the context; yields the owner id leases are taken under."""
        lock = OwnerLock(self.path, name)
        owner = lock.acquire()
        try:
            yield owner
        finally:
            lock.release()

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

    # ---- encryption at rest ----------------------------------------------------------------

    def _token_set(self, row: sqlite3.Row) -> TokenSet:
        return _row_to_token_set(row, self.cipher)

    def _insert_params(self, n: NewTokenSet, now: float) -> dict[str, Any]:
        access = n.access_token.reveal() if n.access_token else None
        return {
            "id": n.id,
            "provider": n.provider,
            "access_token": None if access is None else self._seal(access, n.id, "access_token"),
            "refresh_token": self._seal(n.refresh_token.reveal(), n.id, "refresh_token"),
            "token_type": n.token_type,
            "scope": n.scope,
            "expires_at": n.expires_at,
            "next_refresh_at": n.next_refresh_at,
            "refresh_expires_at": n.refresh_expires_at,
            "usage": n.refresh_token_usage.value if n.refresh_token_usage else None,
            "grace_period": n.grace_period,
            "lifetime": n.refresh_token_lifetime,
            "idle_lifetime": n.refresh_token_idle_lifetime,
            "mode": n.refresh_mode.value if n.refresh_mode else None,
            "now": now,
        }

    def _seal(self, value: str, row_id: str, column: str) -> str:
        if self.cipher is None:
            return value
        return self.cipher.seal(value, row_id=row_id, column=column)

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
        check_keys(str(self.path), await self.sealed_key_ids(), key_ids)

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
                "SELECT id, access_token, refresh_token FROM token_sets WHERE id > ?"
                " ORDER BY id LIMIT ?",
                (after, batch),
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
                    {
                        "id": row_id,
                        "old_access": access,
                        "old_refresh": refresh,
                        "access": None
                        if plain[0] is None
                        else cipher.seal(plain[0], row_id=row_id, column="access_token"),
                        "refresh": cipher.seal(plain[1], row_id=row_id, column="refresh_token"),
                    }
                )
            if updates:
                changed += await self._rekey_batch(updates)

    async def _rekey_batch(self, updates: list[dict[str, Any]]) -> int:
        done = 0
        with anyio.CancelScope(shield=True):
            async with self._lock:
                try:
                    async with self._transaction():
                        for params in updates:
                            async with self._conn.execute(
                                "UPDATE token_sets SET access_token = :access,"
                                " refresh_token = :refresh WHERE id = :id"
                                " AND refresh_token = :old_refresh"
                                " AND access_token IS :old_access RETURNING id",
                                params,
                            ) as cur:
                                done += len(list(await cur.fetchall()))
                except sqlite3.Error as exc:
                    raise _sqlite_error(self.path, exc) from exc
        return done

    async def schema_version(self) -> int:
        return int(await self._fetch_value("PRAGMA user_version"))

    async def ping(self) -> None:
        """Raise StoreError unless the database answers a read."""
        try:
            async with self._lock:
                await self._fetch_value("SELECT count(*) FROM sqlite_master")
        except sqlite3.Error as exc:
            raise _sqlite_error(self.path, exc) from exc

    async def probe_write(self, *, owner: str, now: float) -> None:
        """One harmless committed write (the storage_probe row); StoreError if it fails."""
        await self._write(
            "INSERT INTO storage_probe (id, probed_at, owner) VALUES (1, :now, :owner)"
            " ON CONFLICT (id) DO UPDATE SET probed_at = excluded.probed_at,"
            " owner = excluded.owner",
            {"now": now, "owner": owner},
        )

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

    # ---- helpers ---------------------------------------------------------------------------

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

    async def _read(self, sql: str, params: Sequence[Any] | dict[str, Any] = ()) -> list[Any]:
        async with self._lock:
            try:
                return list(await self._conn.execute_fetchall(sql, params))
            except sqlite3.Error as exc:
                raise _sqlite_error(self.path, exc) from exc

    async def _report(self, sql: str, params: Sequence[Any] | dict[str, Any] = ()) -> list[Any]:
        """A read for gauges and listings, on a second connection (its own thread; WAL lets it
        read beside the writer), so that scanning many token sets never delays a claim or a
        grant on the main connection."""
        async with self._report_lock:
            try:
                if self._report_conn is None:
                    conn = await aiosqlite.connect(str(self.path), isolation_level=None)
                    try:
                        conn.row_factory = sqlite3.Row
                        await conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
                        await conn.execute("PRAGMA query_only = 1")
                    except BaseException:
                        await conn.close()
                        raise
                    self._report_conn = conn
                return list(await self._report_conn.execute_fetchall(sql, params))
            except sqlite3.Error as exc:
                raise _sqlite_error(self.path, exc) from exc

    # ---- token sets: add, read, remove -----------------------------------------------------

    async def add(self, new: NewTokenSet, *, now: float) -> None:
        await self.add_many([new], now=now)

    async def add_many(self, items: Iterable[NewTokenSet], *, now: float) -> int:
        """Insert all or nothing. An id that exists already (or twice) raises TokenSetExists."""
        items = list(items)
        rows = [self._insert_params(n, now) for n in items]
        with anyio.CancelScope(shield=True):
            async with self._lock:
                try:
                    async with self._transaction():
                        await self._conn.executemany(_INSERT.format(table="token_sets"), rows)
                except sqlite3.IntegrityError as exc:
                    try:
                        message = await self._conflict([n.id for n in items])
                    except sqlite3.Error:
                        message = None
                    if message is None:
                        raise _sqlite_error(self.path, exc) from exc
                    raise TokenSetExists(message) from exc
                except sqlite3.Error as exc:
                    raise _sqlite_error(self.path, exc) from exc
        return len(rows)

    async def import_stream(self, items: Iterable[tuple[str, NewTokenSet]], *, now: float) -> int:
        """Insert all or nothing, from an iterable of any size, in bounded memory.

        The rows go to a staging table in this connection's temporary database first (on disk
        when large, with no lock on the token database), so a bad input line, raised by
        ``items``, leaves the database untouched; then one ``INSERT … SELECT`` moves them in,
        holding the write lock only for that. Each item comes with where it was read (a line),
        for the error. Raises TokenSetExists naming the first id that is stored already or
        appears twice in the input (with its ``where``).
        """
        # The lock for the whole import: its staging transaction must not meet another
        # coroutine's writes on this connection.
        async with self._lock:
            try:
                await self._conn.execute("DROP TABLE IF EXISTS temp.import_staging")
                await self._conn.execute(_STAGING)
                try:
                    count = await self._stage(items, now)
                    with anyio.CancelScope(shield=True):
                        async with self._transaction():
                            await self._move_staged()
                finally:
                    with anyio.CancelScope(shield=True):
                        await self._conn.execute("DROP TABLE IF EXISTS temp.import_staging")
            except sqlite3.Error as exc:
                raise _sqlite_error(self.path, exc) from exc
        return count

    async def _move_staged(self) -> None:
        try:
            await self._conn.execute(
                f"INSERT INTO main.token_sets ({_COLUMNS})"
                f" SELECT {_COLUMNS} FROM temp.import_staging"
            )
        except sqlite3.IntegrityError:
            taken = await self._fetch_value(
                "SELECT s.id FROM temp.import_staging s"
                " JOIN main.token_sets t ON t.id = s.id LIMIT 1"
            )
            if taken is None:
                raise
            raise TokenSetExists(f"token set {taken!r} exists already (remove it first)") from None

    async def _stage(self, items: Iterable[tuple[str, NewTokenSet]], now: float) -> int:
        """Insert ``items`` into the staging table, chunk by chunk: SQLite inserts one chunk in
        its thread while the next is parsed here, so parsing and inserting overlap."""
        count = 0
        failure: Exception | None = None
        send, receive = anyio.create_memory_object_stream[list[tuple[str, NewTokenSet]]](1)

        async def insert(scope: anyio.CancelScope) -> None:
            nonlocal count, failure
            async with receive:
                async for chunk in receive:
                    try:
                        await self._conn.executemany(
                            _INSERT.format(table="temp.import_staging"),
                            [self._insert_params(n, now) for _, n in chunk],
                        )
                    except sqlite3.IntegrityError:
                        # executemany stops at the failing row: the ones before it are in.
                        done = await self._fetch_value("SELECT count(*) FROM temp.import_staging")
                        where, repeated = chunk[done - count]
                        failure = TokenSetExists(
                            f"{where}: token set {repeated.id!r} appears twice in the input"
                        )
                        scope.cancel()
                        return
                    except sqlite3.Error as exc:
                        failure = exc
                        scope.cancel()
                        return
                    count += len(chunk)

        iterator = iter(items)
        await self._conn.execute("BEGIN")
        try:
            # Errors are carried out of the group by hand, so callers see them unwrapped.
            async with anyio.create_task_group() as tg:
                tg.start_soon(insert, tg.cancel_scope)
                async with send:
                    try:
                        while chunk := list(itertools.islice(iterator, 5000)):
                            await send.send(chunk)
                    except Exception as exc:  # a bad input line, raised by ``items``
                        failure = exc
                        tg.cancel_scope.cancel()
            if failure is not None:
                raise failure
        except BaseException:
            with anyio.CancelScope(shield=True):
                await self._conn.execute("ROLLBACK")
            raise
        await self._conn.execute("COMMIT")
        return count

    async def _conflict(self, ids: Sequence[str]) -> str | None:
        """Name the first of ``ids`` that is stored already or repeats an earlier one (SQLite's
        constraint error does not say which row failed). The caller holds ``self._lock``."""
        stored: set[str] = set()
        for start in range(0, len(ids), _ID_CHUNK):
            chunk = list(ids[start : start + _ID_CHUNK])
            marks = ", ".join("?" * len(chunk))
            async with self._conn.execute(
                f"SELECT id FROM token_sets WHERE id IN ({marks})", chunk
            ) as cur:
                stored.update(r[0] for r in await cur.fetchall())
        return first_conflict(ids, stored)

    async def get(self, token_set_id: str) -> TokenSet | None:
        rows = await self._read("SELECT * FROM token_sets WHERE id = ?", (token_set_id,))
        return self._token_set(rows[0]) if rows else None

    async def page(self, *, after: str | None = None, limit: int = 500) -> list[TokenSet]:
        """Token sets in id order after ``after``: keyset pagination, never all in memory."""
        if after is None:
            rows = await self._report("SELECT * FROM token_sets ORDER BY id LIMIT ?", (limit,))
        else:
            rows = await self._report(
                "SELECT * FROM token_sets WHERE id > ? ORDER BY id LIMIT ?", (after, limit)
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
        """Per provider, the soonest absolute refresh-token expiry among live token sets: the
        IdP-stated one where known, else created_at + the set's own lifetime (per-set policy)
        or, failing that, the provider's configured lifetime."""
        result: dict[str, float] = {}
        for provider, lifetime in lifetimes.items():
            rows = await self._report(
                f"SELECT min({_REFRESH_EXPIRY}) FROM token_sets"
                " WHERE provider = :provider AND state != 'invalidated'",
                {"provider": provider, "lifetime": lifetime},
            )
            if rows and rows[0][0] is not None:
                result[provider] = float(rows[0][0])
        return result

    async def refresh_expiring(
        self, provider: str, *, lifetime: float | None, until: float, limit: int = 500
    ) -> list[tuple[TokenSet, float]]:
        """A provider's live token sets whose absolute refresh-token expiry (as in
        :meth:`refresh_expiry_soonest`) is at or before ``until`` and was not yet warned about
        at that very expiry, soonest first, with that expiry; at most ``limit``."""
        rows = await self._report(
            f"SELECT * FROM (SELECT *, {_REFRESH_EXPIRY} AS refresh_expiry FROM token_sets"
            " WHERE provider = :provider AND state != 'invalidated')"
            " WHERE refresh_expiry <= :until"
            " AND (expiry_warned_for IS NULL OR refresh_expiry != expiry_warned_for)"
            " ORDER BY refresh_expiry LIMIT :limit",
            {"provider": provider, "lifetime": lifetime, "until": until, "limit": limit},
        )
        return [(self._token_set(r), float(r["refresh_expiry"])) for r in rows]

    async def refresh_expiring_counts(
        self, lifetimes: dict[str, float | None], *, until: float
    ) -> dict[str, int]:
        """Per provider, the live token sets whose absolute refresh-token expiry is at or
        before ``until``."""
        result: dict[str, int] = {}
        for provider, lifetime in lifetimes.items():
            rows = await self._report(
                "SELECT count(*) FROM token_sets WHERE provider = :provider"
                f" AND state != 'invalidated' AND {_REFRESH_EXPIRY} <= :until",
                {"provider": provider, "lifetime": lifetime, "until": until},
            )
            result[provider] = int(rows[0][0]) if rows else 0
        return result

    async def mark_expiry_warned(self, warned: Sequence[tuple[str, float]]) -> None:
        """Remember, for each ``(token set id, absolute expiry)``, that the warning for that
        expiry was given: one transaction for the whole batch, not a commit per set."""
        if not warned:
            return
        with anyio.CancelScope(shield=True):
            async with self._lock:
                try:
                    async with self._transaction():
                        await self._conn.executemany(
                            "UPDATE token_sets SET expiry_warned_for = ? WHERE id = ?",
                            [(expires_at, token_set_id) for token_set_id, expires_at in warned],
                        )
                except sqlite3.Error as exc:
                    raise _sqlite_error(self.path, exc) from exc

    async def counts(self) -> dict[tuple[str, str], int]:
        rows = await self._report(
            "SELECT provider, state, count(*) FROM token_sets GROUP BY provider, state"
        )
        return {(r[0], r[1]): r[2] for r in rows}

    async def expired_counts(self, *, now: float) -> dict[str, int]:
        """Per provider, the token sets still in use (not invalidated) whose access token has
        expired: one aggregate query; a set without a known expiry is not counted."""
        rows = await self._report(
            "SELECT provider, count(*) FROM token_sets"
            " WHERE state != 'invalidated' AND expires_at < ? GROUP BY provider",
            (now,),
        )
        return {r[0]: r[1] for r in rows}

    # ---- scheduling and leases -------------------------------------------------------------

    async def next_due_at(
        self, *, now: float, exclude_providers: Sequence[str] = ()
    ) -> float | None:
        """Earliest planned refresh among sets no live lease holds, or None."""
        excl, params = _exclude(exclude_providers)
        params["now"] = now
        value = await self._read(
            "SELECT min(next_refresh_at) FROM token_sets WHERE state != 'invalidated'"
            f" AND (lease_owner IS NULL OR lease_until < :now){excl}",
            params,
        )
        result = value[0][0] if value else None
        return float(result) if result is not None else None

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
        overdue first."""
        rows = await self._claim_due(
            "id, next_refresh_at", owner, now, lease_until, limit, exclude_providers
        )
        return [r[0] for r in sorted(rows, key=lambda r: r[1])]

    async def claim_due_sets(
        self,
        *,
        owner: str,
        now: float,
        lease_until: float,
        limit: int,
        exclude_providers: Sequence[str] = (),
    ) -> list[TokenSet]:
        """:meth:`claim_due`, returning the whole sets instead of their ids.

        Contract: in one statement (one transaction), lease at most ``limit`` sets that are
        due — not invalidated, ``next_refresh_at <= now``, lease free or expired
        (``lease_until < now``), provider not in ``exclude_providers`` — most overdue first,
        setting ``lease_owner = owner`` and ``lease_until = lease_until``; return each leased
        set as its row stands after that update (lease fields included, tokens opened when
        sealed), which is what :meth:`claim` returns for a set it leases; sorted by
        ``next_refresh_at``. ``limit <= 0``: nothing is leased, ``[]``.

        The scheduler hands these to the refresher, which then needs no claim of its own: one
        database round trip fewer per refresh."""
        rows = await self._claim_due("*", owner, now, lease_until, limit, exclude_providers)
        return sorted((self._token_set(r) for r in rows), key=lambda ts: ts.next_refresh_at)

    async def _claim_due(
        self,
        returning: str,
        owner: str,
        now: float,
        lease_until: float,
        limit: int,
        exclude_providers: Sequence[str],
    ) -> list[sqlite3.Row]:
        if limit <= 0:
            return []
        excl, params = _exclude(exclude_providers)
        params.update(owner=owner, now=now, until=lease_until, limit=limit)
        return await self._write(
            "UPDATE token_sets SET lease_owner = :owner, lease_until = :until"
            " WHERE id IN (SELECT id FROM token_sets WHERE state != 'invalidated'"
            " AND next_refresh_at <= :now AND (lease_owner IS NULL OR lease_until < :now)"
            f"{excl} ORDER BY next_refresh_at LIMIT :limit)"
            f" RETURNING {returning}",
            params,
        )

    async def make_due_written_after(self, *, now: float, limit: float) -> int:
        """Make due now every set last written at a wall time after ``limit`` (> ``now``).

        Such a row was written before the wall clock was stepped back (NTP): its planned time,
        taken on the old clock, may lie up to the size of the step too far ahead, past the
        access token's real expiry. One refresh re-plans it on the current clock.
        """
        rows = await self._write(MAKE_DUE_WRITTEN_AFTER, {"now": now, "limit": limit})
        return len(rows)

    async def claim(
        self, token_set_id: str, *, owner: str, now: float, lease_until: float
    ) -> TokenSet | ClaimRefused:
        """Lease one token set and return it as it is *now*, read under the lease."""
        rows = await self._write(
            "UPDATE token_sets SET lease_owner = :owner, lease_until = :until"
            " WHERE id = :id AND state != 'invalidated'"
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
            " WHERE lease_owner IS NOT NULL AND lease_until >= ?",
            (now,),
        )
        return {r[0] for r in rows}

    async def clear_leases_of(self, owners: Iterable[str]) -> int:
        """Drop the leases of owners known to be dead (ownership.is_alive said so)."""
        total = 0
        for owner in owners:
            total += await self.release_all(owner=owner)
        return total

    async def max_set_grace_period(self) -> float:
        """The largest per-set grace period (0 if none): crash recovery must look back at least
        that far, or a set whose own window outlasts its provider's would be left unrecovered."""
        rows = await self._read("SELECT max(grace_period) FROM token_sets")
        value = rows[0][0] if rows else None
        return float(value) if value is not None else 0.0

    async def unresolved_attempts(self, *, since: float) -> list[tuple[str, str]]:
        """``(id, owner)`` of every journaled attempt started at or after ``since``, oldest
        first (crash recovery: whose grace window may still be open, and who sent it)."""
        rows = await self._read(
            "SELECT id, attempt_owner FROM token_sets WHERE attempt_started_at IS NOT NULL"
            " AND attempt_started_at >= ? AND state != 'invalidated'"
            " ORDER BY attempt_started_at",
            (since,),
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
        """Journal a send of version ``version``'s refresh token, durably, before it leaves.

        An attempt series of the same version that started at or after ``keep_since`` (that is,
        whose grace window is still open) and has a send the IdP may have processed is
        continued: its start time is kept, because the IdP counts the window from the first
        use. Returns None if the set changed, our lease is gone or has expired, or the series'
        window closed with such a send (a missed window: the token may not be sent again).
        The set is also made due now, so that should this process die before the attempt is
        resolved, any daemon picks it up as soon as the lease is free, inside the window.
        """
        rows = await self._write(
            "UPDATE token_sets SET"
            + JOURNAL_SEND_SQL
            + " next_refresh_at = min(next_refresh_at, :now)"
            " WHERE id = :id AND version = :version AND lease_owner = :owner"
            " AND lease_until >= :now AND state != 'invalidated'"
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
        """Compare-and-swap the new grant in. None: the set moved on (or was removed) meanwhile.

        The compare is on the version and the refresh token we sent (a set removed and added
        again under the same id starts at version 1 again), not on the lease: if our lease was
        taken over while our request was out, our rotated token is still the one the IdP handed
        out, and the compare proves nobody stored a newer one.
        """
        sql = (
            "UPDATE token_sets SET access_token = :access, refresh_token = :refresh,"
            " token_type = :token_type, scope = coalesce(:scope, scope), expires_at = :expires_at,"
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
    ) -> list[sqlite3.Row]:
        """save_grant's statement when values are sealed: a nonce makes every sealing differ,
        so the stored refresh token is opened and compared here, and the statement then
        compares on its stored form, all in one transaction."""
        assert self.cipher is not None
        with anyio.CancelScope(shield=True):
            async with self._lock:
                try:
                    async with self._transaction():
                        async with self._conn.execute(
                            "SELECT refresh_token FROM token_sets WHERE id = :id", params
                        ) as cur:
                            row = await cur.fetchone()
                        if row is None:
                            return []
                        try:
                            stored = self.cipher.open(
                                row[0], row_id=params["id"], column="refresh_token"
                            )
                        except EncryptionError as exc:
                            raise StoreError(str(exc)) from None
                        if stored != sent.reveal():
                            return []
                        async with self._conn.execute(sql, {**params, "sent": row[0]}) as cur:
                            rows = list(await cur.fetchall())
                except sqlite3.Error as exc:
                    raise _sqlite_error(self.path, exc) from exc
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
        """Record a failed refresh and release our lease. ``resolve_attempt`` clears the journal
        (the IdP answered definitively); otherwise it stays for the next attempt to continue."""
        rows = await self._write(
            "UPDATE token_sets SET state = :state, next_refresh_at = :next, last_error = :error,"
            " failures = :failures, invalid_reason = :reason, updated_at = :now,"
            " attempt_version = CASE WHEN :resolve THEN NULL ELSE attempt_version END,"
            " attempt_started_at = CASE WHEN :resolve THEN NULL ELSE attempt_started_at END,"
            " attempt_sends = CASE WHEN :resolve THEN NULL ELSE attempt_sends END,"
            " attempt_settled = CASE WHEN :resolve THEN NULL ELSE attempt_settled END,"
            " attempt_owner = CASE WHEN :resolve THEN NULL ELSE attempt_owner END,"
            " lease_owner = NULL, lease_until = NULL"
            # Only while we hold the lease: a worker whose lease lapsed must not overwrite the
            # state, or clear the journal, of the one that took over.
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
                "resolve": 1 if resolve_attempt else 0,
            },
        )
        return bool(rows)

    async def defer(self, token_set_id: str, *, owner: str, next_refresh_at: float) -> None:
        """Release our lease and move the planned time, changing nothing else (circuit open)."""
        await self._write(
            "UPDATE token_sets SET next_refresh_at = max(next_refresh_at, :next),"
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
        with anyio.CancelScope(shield=True):
            async with self._lock:
                try:
                    async with self._transaction():
                        await self._conn.executemany(
                            "INSERT OR IGNORE INTO hook_deliveries (event_id, target, event_type,"
                            " payload, created_at, next_attempt_at)"
                            " VALUES (?, ?, ?, ?, ?, ?)",
                            [(event_id, t, event_type, payload, now, now) for t in targets],
                        )
                except sqlite3.Error as exc:
                    raise _sqlite_error(self.path, exc) from exc

    async def claim_hook_deliveries(
        self, *, now: float, until: float, limit: int
    ) -> list[HookDelivery]:
        """Due deliveries, claimed until ``until`` (a dispatcher that dies leaves them due
        again then: at least once) with their attempt counted."""
        rows = await self._write(
            "UPDATE hook_deliveries SET next_attempt_at = :until, attempts = attempts + 1"
            " WHERE id IN (SELECT id FROM hook_deliveries WHERE delivered_at IS NULL"
            " AND given_up_at IS NULL AND next_attempt_at <= :now"
            " ORDER BY next_attempt_at LIMIT :limit)"
            " RETURNING id, event_id, target, event_type, payload, created_at, attempts",
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
            " next_attempt_at = COALESCE(:next, next_attempt_at),"
            " given_up_at = CASE WHEN :next IS NULL THEN :now ELSE NULL END WHERE id = :id",
            {"id": delivery_id, "error": error[:500], "next": next_attempt_at, "now": now},
        )

    async def next_hook_due(self) -> float | None:
        value = await self._fetch_locked(
            "SELECT MIN(next_attempt_at) FROM hook_deliveries"
            " WHERE delivered_at IS NULL AND given_up_at IS NULL"
        )
        return None if value is None else float(value)

    async def pending_hooks(self) -> int:
        value = await self._fetch_locked(
            "SELECT COUNT(*) FROM hook_deliveries"
            " WHERE delivered_at IS NULL AND given_up_at IS NULL"
        )
        return int(value or 0)

    # ---- token-set events (refresherd.events): queued by anyone, expanded by a dispatcher ---

    async def enqueue_event(
        self, *, event_id: str, event_type: str, payload: str, now: float
    ) -> None:
        """Queue one event for whichever daemon delivers hooks; an event id queued already is
        kept. One statement: it shares the group commit of the refreshes around it."""
        await self._write(
            "INSERT OR IGNORE INTO hook_events (event_id, event_type, payload, created_at)"
            " VALUES (:event_id, :event_type, :payload, :now)",
            {"event_id": event_id, "event_type": event_type, "payload": payload, "now": now},
        )

    async def expand_events(
        self, *, targets: Sequence[str], event_types: Sequence[str], now: float, limit: int
    ) -> int:
        """Take up to ``limit`` queued events, oldest first, and queue each of a type in
        ``event_types`` (empty: every type) for every target, due now; the rest are dropped.
        A delivery keeps its event's ``created_at``: the give-up age counts from the event.
        Returns how many events were taken."""
        with anyio.CancelScope(shield=True):
            async with self._lock:
                try:
                    async with self._transaction():
                        async with self._conn.execute(
                            "DELETE FROM hook_events WHERE id IN"
                            " (SELECT id FROM hook_events ORDER BY id LIMIT ?)"
                            " RETURNING event_id, event_type, payload, created_at",
                            (limit,),
                        ) as cur:
                            taken = list(await cur.fetchall())
                        await self._conn.executemany(
                            "INSERT OR IGNORE INTO hook_deliveries (event_id, target, event_type,"
                            " payload, created_at, next_attempt_at) VALUES (?, ?, ?, ?, ?, ?)",
                            [
                                (e[0], target, e[1], e[2], e[3], now)
                                for e in taken
                                if not event_types or e[1] in event_types
                                for target in targets
                            ],
                        )
                except sqlite3.Error as exc:
                    raise _sqlite_error(self.path, exc) from exc
        return len(taken)

    async def prune_events(self, *, before: float) -> tuple[int, int]:
        """Delete the queued events raised before ``before`` (no daemon with [hooks] took
        them) and the deliveries delivered or given up before it. Returns both counts."""
        events = await self._write(
            "DELETE FROM hook_events WHERE created_at < :before RETURNING id", {"before": before}
        )
        deliveries = await self._write(
            "DELETE FROM hook_deliveries WHERE delivered_at < :before OR given_up_at < :before"
            " RETURNING id",
            {"before": before},
        )
        return len(events), len(deliveries)

    async def invalidation_counts(self) -> dict[tuple[str, str], int]:
        """Invalidations ever recorded in this database, by (provider, reason)."""
        rows = await self._read("SELECT provider, reason, count FROM invalidation_counts")
        return {(r[0], r[1]): int(r[2]) for r in rows}

    async def _fetch_locked(self, sql: str) -> Any:
        rows = await self._read(sql)
        return rows[0][0] if rows else None

    # ---- moving a whole database (refresherd migrate) -------------------------------------

    async def export_rows(self, table: str, *, batch: int = 1000) -> AsyncIterator[list[Row]]:
        columns, key = _table_columns(table)
        if "," in key:
            rows = await self._report(f"SELECT {', '.join(columns)} FROM {table} ORDER BY {key}")
            if rows:
                yield [tuple(r) for r in rows]
            return
        after: Any = None
        while True:
            where = "" if after is None else f" WHERE {key} > :after"
            rows = await self._report(
                f"SELECT {', '.join(columns)} FROM {table}{where} ORDER BY {key} LIMIT :limit",
                {"after": after, "limit": batch},
            )
            if not rows:
                return
            yield [tuple(r) for r in rows]
            if len(rows) < batch:
                return
            after = rows[-1][key]

    async def load_rows(self, table: str, rows: AsyncIterator[list[Row]]) -> int:
        columns, _ = _table_columns(table)
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


def _table_columns(table: str) -> tuple[tuple[str, ...], str]:
    """The columns ``refresherd migrate`` moves for ``table``, and the key it pages by (a
    composite key: a small table, read in one batch in that order)."""
    if table == "token_sets":
        return TOKEN_SET_COLUMNS, "id"
    if table == "hook_deliveries":
        return HOOK_DELIVERY_COLUMNS, "id"
    if table == "hook_events":
        return HOOK_EVENT_COLUMNS, "id"
    if table == "invalidation_counts":
        return INVALIDATION_COUNT_COLUMNS, "provider, reason"
    raise ValueError(f"not a table refresherd moves: {table!r}")


def _row_plain(
    cipher: TokenCipher, row_id: str, access: str | None, refresh: str
) -> tuple[str | None, str]:
    try:
        return (
            None if access is None else cipher.open(access, row_id=row_id, column="access_token"),
            cipher.open(refresh, row_id=row_id, column="refresh_token"),
        )
    except EncryptionError as exc:
        raise StoreError(str(exc)) from None


def _exclude(providers: Sequence[str]) -> tuple[str, dict[str, Any]]:
    if not providers:
        return "", {}
    names = {f"p{i}": p for i, p in enumerate(providers)}
    placeholders = ", ".join(f":{k}" for k in names)
    return f" AND provider NOT IN ({placeholders})", dict(names)


def _split_sql(script: str) -> list[str]:
    """Split a migration into statements (sqlite3.complete_statement knows about quoting)."""
    statements: list[str] = []
    buffer = ""
    for line in script.splitlines(keepends=True):
        if line.strip().startswith("--") and not buffer.strip():
            continue
        buffer += line
        if sqlite3.complete_statement(buffer):
            statements.append(buffer.strip())
            buffer = ""
    if buffer.strip():
        statements.append(buffer.strip())
    return statements
