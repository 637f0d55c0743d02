"""The only module that speaks SQL: migrations, claims, leases, the journal, compare-and-swap.

One aiosqlite connection per process, in autocommit mode; every multi-statement change runs in
``BEGIN IMMEDIATE`` under an in-process lock so coroutines never interleave transactions.
WAL with ``synchronous=FULL``: a commit that returned is on disk, which is what lets the
refresher promise "persisted before used or reported".
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import AsyncIterator, Iterable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import aiosqlite
import anyio

from refresherd.model import Attempt, RefreshTokenUsage, Secret, State, TokenSet

BUSY_TIMEOUT_MS: Final = 5000
READ_CONTRACT_VIEW: Final = "refresherd_access_tokens"
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
)
SCHEMA_VERSION: Final = len(MIGRATIONS)


class StoreError(Exception):
    """The database could not do what was asked. Never carries a token value."""


class TokenSetExists(StoreError):
    pass


@dataclass(frozen=True, slots=True)
class NewTokenSet:
    id: str
    provider: str
    refresh_token: Secret
    access_token: Secret | None
    expires_at: float | None
    next_refresh_at: float
    token_type: str | None = None
    scope: str | None = None
    refresh_expires_at: float | None = None
    # Per-set policy overrides; None: the provider's value applies.
    refresh_token_usage: RefreshTokenUsage | None = None
    grace_period: float | None = None
    refresh_token_lifetime: float | None = None


@dataclass(frozen=True, slots=True)
class ClaimRefused:
    """Why a claim did not succeed: the set is gone, invalidated, or leased by someone else."""

    reason: str  # "not_found" | "invalidated" | "leased"
    owner: str | None = None
    until: float | None = None


def _row_to_token_set(row: sqlite3.Row) -> TokenSet:
    attempt = None
    if row["attempt_started_at"] is not None:
        attempt = Attempt(
            version=row["attempt_version"],
            started_at=row["attempt_started_at"],
            owner=row["attempt_owner"] or "",
            sends=row["attempt_sends"] or 0,
        )
    access = row["access_token"]
    usage = row["refresh_token_usage"]
    return TokenSet(
        id=row["id"],
        provider=row["provider"],
        refresh_token=Secret(row["refresh_token"]),
        access_token=Secret(access) if access is not None else None,
        expires_at=row["expires_at"],
        state=State(row["state"]),
        version=row["version"],
        next_refresh_at=row["next_refresh_at"],
        created_at=row["created_at"],
        updated_at=row["updated_at"],
        token_type=row["token_type"],
        scope=row["scope"],
        last_refresh_at=row["last_refresh_at"],
        last_error=row["last_error"],
        failures=row["failures"],
        invalid_reason=row["invalid_reason"],
        lease_owner=row["lease_owner"],
        lease_until=row["lease_until"],
        attempt=attempt,
        refresh_expires_at=row["refresh_expires_at"],
        refresh_token_usage=RefreshTokenUsage(usage) if usage is not None else None,
        grace_period=row["grace_period"],
        refresh_token_lifetime=row["refresh_token_lifetime"],
    )


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


class Store:
    def __init__(self, path: Path, conn: aiosqlite.Connection) -> None:
        self.path = path
        self._conn = conn
        self._lock = anyio.Lock()

    # ---- lifecycle -------------------------------------------------------------------------

    @classmethod
    async def open(cls, path: Path, *, create: bool = True) -> Store:
        path = Path(path)
        try:
            if create:
                if not _exists(path.parent) or not path.parent.is_dir():
                    raise StoreError(f"database {path}: directory {path.parent} does not exist")
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
        store = cls(path, conn)
        try:
            await store._setup()
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
            await self._migrate()
        except sqlite3.Error as exc:
            raise StoreError(f"database {self.path}: {exc}") from exc

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
        await self._conn.close()

    async def schema_version(self) -> int:
        return int(await self._fetch_value("PRAGMA user_version"))

    async def ping(self) -> None:
        """Raise StoreError unless the database answers a read."""
        try:
            async with self._lock:
                await self._fetch_value("SELECT count(*) FROM sqlite_master")
        except sqlite3.Error as exc:
            raise StoreError(f"database {self.path}: {exc}") from exc

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
        SQLite may already have committed must not be abandoned half-way by its caller."""
        with anyio.CancelScope(shield=True):
            async with self._lock:
                try:
                    async with self._conn.execute(sql, params) as cur:
                        rows = list(await cur.fetchall())
                except sqlite3.Error as exc:
                    raise StoreError(f"database {self.path}: {exc}") from exc
        return rows

    async def _read(self, sql: str, params: Sequence[Any] | dict[str, Any] = ()) -> list[Any]:
        async with self._lock:
            try:
                async with self._conn.execute(sql, params) as cur:
                    return list(await cur.fetchall())
            except sqlite3.Error as exc:
                raise StoreError(f"database {self.path}: {exc}") from exc

    # ---- token sets: add, read, remove -----------------------------------------------------

    async def add(self, new: NewTokenSet, *, now: float) -> None:
        await self.add_many([new], now=now)

    async def add_many(self, items: Iterable[NewTokenSet], *, now: float) -> int:
        """Insert all or nothing. An id that exists already (or twice) raises TokenSetExists."""
        items = list(items)
        rows = [
            {
                "id": n.id,
                "provider": n.provider,
                "access_token": n.access_token.reveal() if n.access_token else None,
                "refresh_token": n.refresh_token.reveal(),
                "token_type": n.token_type,
                "scope": n.scope,
                "expires_at": n.expires_at,
                "next_refresh_at": n.next_refresh_at,
                "refresh_expires_at": n.refresh_expires_at,
                "usage": n.refresh_token_usage.value if n.refresh_token_usage else None,
                "grace_period": n.grace_period,
                "lifetime": n.refresh_token_lifetime,
                "now": now,
            }
            for n in items
        ]
        with anyio.CancelScope(shield=True):
            async with self._lock:
                try:
                    async with self._transaction():
                        await self._conn.executemany(
                            "INSERT INTO token_sets (id, provider, access_token, refresh_token,"
                            " token_type, scope, expires_at, next_refresh_at, refresh_expires_at,"
                            " refresh_token_usage, grace_period, refresh_token_lifetime,"
                            " created_at, updated_at) VALUES (:id, :provider, :access_token,"
                            " :refresh_token, :token_type, :scope, :expires_at, :next_refresh_at,"
                            " :refresh_expires_at, :usage, :grace_period, :lifetime, :now, :now)",
                            rows,
                        )
                except sqlite3.IntegrityError as exc:
                    try:
                        message = await self._conflict([n.id for n in items])
                    except sqlite3.Error:
                        message = None
                    if message is None:
                        raise StoreError(f"database {self.path}: {exc}") from exc
                    raise TokenSetExists(message) from exc
                except sqlite3.Error as exc:
                    raise StoreError(f"database {self.path}: {exc}") from exc
        return len(rows)

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
        seen: set[str] = set()
        for token_set_id in ids:
            if token_set_id in stored:
                return f"token set {token_set_id!r} exists already (remove it first)"
            if token_set_id in seen:
                return f"token set {token_set_id!r} appears twice in the input"
            seen.add(token_set_id)
        return None

    async def get(self, token_set_id: str) -> TokenSet | None:
        rows = await self._read("SELECT * FROM token_sets WHERE id = ?", (token_set_id,))
        return _row_to_token_set(rows[0]) if rows else None

    async def page(self, *, after: str | None = None, limit: int = 500) -> list[TokenSet]:
        """Token sets in id order after ``after``: keyset pagination, never all in memory."""
        if after is None:
            rows = await self._read("SELECT * FROM token_sets ORDER BY id LIMIT ?", (limit,))
        else:
            rows = await self._read(
                "SELECT * FROM token_sets WHERE id > ? ORDER BY id LIMIT ?", (after, limit)
            )
        return [_row_to_token_set(r) for r in rows]

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
            rows = await self._read(
                "SELECT min(coalesce(refresh_expires_at,"
                " created_at + coalesce(refresh_token_lifetime, :lifetime)))"
                " FROM token_sets WHERE provider = :provider AND state != 'invalidated'",
                {"provider": provider, "lifetime": lifetime},
            )
            if rows and rows[0][0] is not None:
                result[provider] = float(rows[0][0])
        return result

    async def counts(self) -> dict[tuple[str, str], int]:
        rows = await self._read(
            "SELECT provider, state, count(*) FROM token_sets GROUP BY provider, state"
        )
        return {(r[0], r[1]): r[2] for r in rows}

    async def expired_counts(self, *, now: float) -> dict[str, int]:
        """Per provider, the token sets still in use (not invalidated) whose access token has
        expired: one aggregate query; a set without a known expiry is not counted."""
        rows = await self._read(
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
        if limit <= 0:
            return []
        excl, params = _exclude(exclude_providers)
        params.update(owner=owner, now=now, until=lease_until, limit=limit)
        rows = await self._write(
            "UPDATE token_sets SET lease_owner = :owner, lease_until = :until"
            " WHERE id IN (SELECT id FROM token_sets WHERE state != 'invalidated'"
            " AND next_refresh_at <= :now AND (lease_owner IS NULL OR lease_until < :now)"
            f"{excl} ORDER BY next_refresh_at LIMIT :limit)"
            " RETURNING id, next_refresh_at",
            params,
        )
        return [r[0] for r in sorted(rows, key=lambda r: r[1])]

    async def make_due_written_after(self, *, now: float, limit: float) -> int:
        """Make due now every set last written at a wall time after ``limit`` (> ``now``).

        Such a row was written before the wall clock was stepped back (NTP): its planned time,
        taken on the old clock, may lie up to the size of the step too far ahead, past the
        access token's real expiry. One refresh re-plans it on the current clock.
        """
        rows = await self._write(
            "UPDATE token_sets SET next_refresh_at = :now WHERE state != 'invalidated'"
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
            " WHERE id = :id AND state != 'invalidated'"
            " AND (lease_owner IS NULL OR lease_owner = :owner OR lease_until < :now)"
            " RETURNING *",
            {"id": token_set_id, "owner": owner, "until": lease_until, "now": now},
        )
        if rows:
            return _row_to_token_set(rows[0])
        current = await self.get(token_set_id)
        if current is None:
            return ClaimRefused("not_found")
        if current.state is State.INVALIDATED:
            return ClaimRefused("invalidated")
        return ClaimRefused("leased", owner=current.lease_owner, until=current.lease_until)

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

    async def unresolved_attempts(self, *, since: float) -> list[str]:
        """Ids with a journaled attempt started at or after ``since`` (crash recovery)."""
        rows = await self._read(
            "SELECT id FROM token_sets WHERE attempt_started_at IS NOT NULL"
            " AND attempt_started_at >= ? AND state != 'invalidated'"
            " ORDER BY attempt_started_at",
            (since,),
        )
        return [r[0] for r in rows]

    # ---- the refresh itself: journal, grant, failure ---------------------------------------

    async def begin_attempt(
        self, token_set_id: str, *, owner: str, version: int, now: float, keep_since: float
    ) -> Attempt | None:
        """Journal a send of version ``version``'s refresh token, durably, before it leaves.

        An attempt series of the same version that started at or after ``keep_since`` (that is,
        whose grace window is still open) is continued: its start time is kept, because the
        IdP counts the window from the first use. Returns None if the set changed or our lease
        is gone or has expired: then nothing may be sent. The set is also made due now, so that
        should this process die before the attempt is resolved, any daemon picks it up as soon
        as the lease is free, inside the window.
        """
        rows = await self._write(
            "UPDATE token_sets SET"
            " attempt_started_at = CASE WHEN attempt_version = :version"
            "   AND attempt_started_at >= :keep_since THEN attempt_started_at ELSE :now END,"
            " attempt_sends = CASE WHEN attempt_version = :version"
            "   AND attempt_started_at >= :keep_since THEN attempt_sends + 1 ELSE 1 END,"
            " attempt_version = :version, attempt_owner = :owner,"
            " next_refresh_at = min(next_refresh_at, :now)"
            " WHERE id = :id AND version = :version AND lease_owner = :owner"
            " AND lease_until >= :now AND state != 'invalidated'"
            " RETURNING attempt_version, attempt_started_at, attempt_owner, attempt_sends",
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
        return Attempt(version=r[0], started_at=r[1], owner=r[2], sends=r[3])

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
        rows = await self._write(
            "UPDATE token_sets SET access_token = :access, refresh_token = :refresh,"
            " token_type = :token_type, scope = coalesce(:scope, scope), expires_at = :expires_at,"
            " refresh_expires_at = coalesce(:refresh_expires_at, refresh_expires_at),"
            " state = 'active', version = version + 1, next_refresh_at = :next,"
            " updated_at = :now, last_refresh_at = :now, last_error = NULL, failures = 0,"
            " invalid_reason = NULL, attempt_version = NULL, attempt_started_at = NULL,"
            " attempt_owner = NULL, attempt_sends = NULL,"
            " lease_owner = CASE WHEN lease_owner = :owner THEN NULL ELSE lease_owner END,"
            " lease_until = CASE WHEN lease_owner = :owner THEN NULL ELSE lease_until END"
            " WHERE id = :id AND version = :version AND refresh_token = :sent RETURNING *",
            {
                "id": token_set_id,
                "owner": owner,
                "version": expected_version,
                "sent": sent_refresh_token.reveal(),
                "refresh_expires_at": refresh_expires_at,
                "access": access_token.reveal(),
                "refresh": refresh_token.reveal(),
                "token_type": token_type,
                "scope": scope,
                "expires_at": expires_at,
                "next": next_refresh_at,
                "now": now,
            },
        )
        return _row_to_token_set(rows[0]) if rows else None

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
