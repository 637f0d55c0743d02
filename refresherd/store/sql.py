"""The statements both databases run, written once: one base class over two SQL dialects.

:class:`SqlStore` holds every operation of the :class:`~refresherd.store.contract.TokenStore`
contract whose SQL is the same in SQLite and in PostgreSQL but for a few spellings, and keeps
those spellings as data: one :class:`Operations` per dialect, as Django's database backends keep
theirs. A backend (``sqlite.py``, ``postgres.py``) gives the primitives — one committed write,
a read, a reporting read, one shielded transaction — and what really differs between the two:
opening and migrating, lease owners, claims of many rows at once, bulk inserts, the hook
queue's multi-row moves and housekeeping.

Parameters are written ``:name`` in both dialects: SQLite binds them so, and the PostgreSQL
backend numbers them for asyncpg (a ``::type`` cast is not a parameter). ``!=`` is not a
dialect difference: PostgreSQL reads it as ``<>``, SQLite reads ``<>`` as ``!=``.
"""

from __future__ import annotations

import abc
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Iterable, Sequence
from collections.abc import Set as AbstractSet
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import Any, ClassVar, Final, Literal, Protocol

from refresherd.connect import PendingConnection
from refresherd.encryption import EncryptionError, TokenCipher
from refresherd.model import Attempt, Secret, State, TokenSet
from refresherd.store.contract import (
    ClaimRefused,
    HookDelivery,
    NewTokenSet,
    RefusalReason,
    Row,
    StoreError,
)
from refresherd.store.migrations import SCHEMA_VERSION
from refresherd.store.rows import RowLike, open_tokens, row_to_token_set, table_columns

__all__ = ["LISTED_TEXT_COLUMNS", "POSTGRES", "SQLITE", "Operations", "SqlStore", "Transaction"]

# The text columns whose longest value SqlStore.longest measures (a listing's column widths).
LISTED_TEXT_COLUMNS: Final = frozenset(
    {"id", "provider", "state", "last_error", "invalid_reason", "access_token", "refresh_token"}
)


@dataclass(frozen=True, slots=True)
class Operations:
    """How one dialect spells what the shared statements need (the differences as data)."""

    # The smaller and the larger of two values: SQLite's two-argument min()/max(), PostgreSQL's
    # least()/greatest().
    least: str
    greatest: str
    # Equality under which NULL equals NULL.
    null_safe_equals: str
    # After a parameter whose type the server cannot infer from where it stands (PostgreSQL
    # types every parameter before it runs a statement; SQLite never needs to).
    float_cast: str
    # Before a column, to keep SQLite's planner off that column's index.
    unindexed: str
    # After a read inside a transaction, to lock the rows read until it ends (PostgreSQL; a
    # SQLite transaction already holds the write lock).
    for_update: str
    # An insert that keeps the row there already when a unique key is taken: the head, and the
    # tail (``{key}``: the key's columns).
    insert_ignoring: str
    ignoring_conflict: str
    # Can a DELETE be counted in the statement (``WITH gone AS (DELETE … RETURNING 1)``)?
    # Otherwise its rows are returned and counted here.
    counts_in_statement: bool
    # Is a list bound as one array parameter (else as one parameter per value)?
    array_parameters: bool
    # Values per list-membership test (SQLite bounds the parameters of one statement).
    list_chunk: int

    def in_list(
        self, column: str, name: str, values: Sequence[str], *, negate: bool = False
    ) -> tuple[str, dict[str, Any]]:
        """``column`` is (``negate``: is not) one of ``values``: the condition and its
        parameters; an empty condition (no text) for ``negate`` with no values."""
        if negate and not values:
            return "", {}
        if self.array_parameters:
            test = "<> ALL" if negate else "= ANY"
            return f"{column} {test}(:{name}::text[])", {name: list(values)}
        names = {f"{name}{i}": v for i, v in enumerate(values)}
        marks = ", ".join(f":{k}" for k in names)
        return f"{column} {'NOT IN' if negate else 'IN'} ({marks})", names

    def insert_ignore(self, into: str, *, key: str) -> str:
        """``INSERT INTO {into}`` keeping the stored row when ``key`` is taken."""
        return f"{self.insert_ignoring} {into}" + self.ignoring_conflict.format(key=key)


SQLITE: Final = Operations(
    least="min",
    greatest="max",
    null_safe_equals="IS",
    float_cast="",
    unindexed="+",
    for_update="",
    insert_ignoring="INSERT OR IGNORE INTO",
    ignoring_conflict="",
    counts_in_statement=False,
    array_parameters=False,
    list_chunk=500,
)
POSTGRES: Final = Operations(
    least="least",
    greatest="greatest",
    null_safe_equals="IS NOT DISTINCT FROM",
    float_cast="::double precision",
    unindexed="",
    for_update=" FOR UPDATE",
    insert_ignoring="INSERT INTO",
    ignoring_conflict=" ON CONFLICT ({key}) DO NOTHING",
    counts_in_statement=True,
    array_parameters=True,
    list_chunk=10_000,
)


# The journal's series rules (parameters :version and :keep_since, the earliest start of a
# series whose grace window is still open, NULL for a token with no window: a re-use token's
# every refresh is a series of its own). A series goes on (keeps its start, the IdP counts the
# window from the first use) while its window is open and a send of it may have been processed;
# one whose sends were all settled as not processed consumed nothing and starts afresh. A series
# whose window closed with an unsettled send is a missed window: no new series may start on that
# token (refresher: grace_window_missed).
SERIES_GOES_ON_SQL: Final = (
    "(CAST(:keep_since AS DOUBLE PRECISION) IS NOT NULL AND attempt_version = :version"
    " AND attempt_started_at >= :keep_since"
    " AND attempt_sends > coalesce(attempt_settled, 0))"
)
# begin_attempt's SET clause for the journal.
JOURNAL_SEND_SQL: Final = (
    f" attempt_started_at = CASE WHEN {SERIES_GOES_ON_SQL} THEN attempt_started_at ELSE :now END,"
    f" attempt_sends = CASE WHEN {SERIES_GOES_ON_SQL} THEN attempt_sends + 1 ELSE 1 END,"
    f" attempt_settled = CASE WHEN {SERIES_GOES_ON_SQL} THEN coalesce(attempt_settled, 0)"
    " ELSE 0 END,"
    " attempt_version = :version, attempt_owner = :owner,"
)
SERIES_MISSED_SQL: Final = (
    "coalesce(CAST(:keep_since AS DOUBLE PRECISION) IS NOT NULL AND attempt_version = :version"
    " AND attempt_started_at < :keep_since"
    " AND attempt_sends > coalesce(attempt_settled, 0), false)"
)
# save_grant: the compare-and-swap on the version and the refresh token sent (:sent, the
# stored form when values are sealed).
_SAVE_GRANT: Final = (
    "UPDATE token_sets SET access_token = :access, refresh_token = :refresh,"
    " token_type = :token_type, scope = coalesce(:scope, scope), expires_at = :expires_at,"
    " refresh_expires_at = coalesce(:refresh_expires_at, refresh_expires_at),"
    " state = 'active', version = version + 1, next_refresh_at = :next,"
    " updated_at = :now, last_refresh_at = :now, last_error = NULL, failures = 0,"
    " invalid_reason = NULL, attempt_version = NULL, attempt_started_at = NULL,"
    " attempt_owner = NULL, attempt_sends = NULL, attempt_settled = NULL,"
    " lease_owner = CASE WHEN lease_owner = :owner THEN NULL ELSE lease_owner END,"
    " lease_until = CASE WHEN lease_owner = :owner THEN NULL ELSE lease_until END"
    " WHERE id = :id AND version = :version AND refresh_token = :sent"
)


def make_due_written_after_sql(o: Operations) -> str:
    """Start-up's look for rows written ahead of a wall clock stepped back since. The index
    token_sets_written finds them (they are few); in SQLite the unary + keeps the planner off
    the due-time index, which would visit almost every row."""
    return (
        "UPDATE token_sets SET next_refresh_at = :now WHERE state <> 'invalidated'"
        f" AND updated_at > :limit AND {o.unindexed}next_refresh_at > :now RETURNING id"
    )


def _refresh_expiry(o: Operations) -> str:
    """A row's absolute refresh-token expiry, as policy.refresh_token_expires_at computes it:
    the IdP-stated one, else creation + the set's own lifetime, else the provider's
    (:lifetime)."""
    return (
        "coalesce(refresh_expires_at, created_at + coalesce(refresh_token_lifetime,"
        f" :lifetime{o.float_cast}))"
    )


# ---- decisions both stores make the same way, whatever SQL got them their facts ----------


def claim_refusal(current: TokenSet | None) -> ClaimRefused:
    """Why a claim of a set, read back as ``current`` after the claim missed, was refused."""
    if current is None:
        return ClaimRefused(RefusalReason.NOT_FOUND)
    if current.state is State.INVALIDATED:
        return ClaimRefused(RefusalReason.INVALIDATED)
    return ClaimRefused(RefusalReason.LEASED, owner=current.lease_owner, until=current.lease_until)


def first_conflict(ids: Sequence[str], stored: AbstractSet[str]) -> str | None:
    """Name the first of ``ids`` that is in ``stored`` already or repeats an earlier one (a
    database's unique-key error does not say which row failed)."""
    seen: set[str] = set()
    for token_set_id in ids:
        if token_set_id in stored:
            return f"token set {token_set_id!r} exists already (remove it first)"
        if token_set_id in seen:
            return f"token set {token_set_id!r} appears twice in the input"
        seen.add(token_set_id)
    return None


def check_keys(location: str, used: AbstractSet[str], key_ids: AbstractSet[str] | None) -> None:
    """Refuse a key set (``key_ids``; None: no encryption configured) that cannot open every
    stored value (sealed under ``used``): a token read as its ciphertext would be sent to the
    IdP as if it were the token."""
    if not used:
        return
    if key_ids is None:
        raise StoreError(
            f"database {location}: token values are encrypted (key(s) "
            f"{', '.join(sorted(used))}); configure [encryption] key_file"
        )
    missing = used - key_ids
    if missing:
        raise StoreError(
            f"database {location}: token values are sealed with key(s) "
            f"{', '.join(sorted(missing))}, which the config does not hold (configured: "
            f"{', '.join(sorted(key_ids))}); add the old key to [encryption] "
            "previous_key_files"
        )


class Transaction(Protocol):
    """Statements inside one transaction of a backend (:meth:`SqlStore._atomic`)."""

    async def fetch(self, sql: str, params: dict[str, Any]) -> Sequence[RowLike]: ...


Fetch = Callable[[str, dict[str, Any]], Awaitable[Sequence[RowLike]]]


class SqlStore(abc.ABC):
    """The shared half of both stores: see the module docstring."""

    ops: ClassVar[Operations]
    cipher: TokenCipher | None

    # ---- what a backend gives ---------------------------------------------------------------

    @property
    @abc.abstractmethod
    def location(self) -> str:
        """Where the database is, for messages: a path, or a URL without its password."""

    @abc.abstractmethod
    async def _setup(self) -> None:
        """After connecting: the session set up and the schema migrated (migrations.py)."""

    async def _prepare(self, *, verify_keys: bool) -> None:
        """Make a store that has just connected ready: :meth:`_setup`, then (``verify_keys``)
        the check that the configured keys open every sealed value."""
        await self._setup()
        if verify_keys:
            await self._check_keys()

    @abc.abstractmethod
    async def _write(self, sql: str, params: dict[str, Any]) -> Sequence[RowLike]:
        """One statement, committed before returning, shielded from cancellation: a write the
        database may already have committed must not be abandoned half-way by its caller."""

    @abc.abstractmethod
    async def _read(self, sql: str, params: dict[str, Any] | None = None) -> Sequence[RowLike]:
        """One read."""

    async def _report(self, sql: str, params: dict[str, Any] | None = None) -> Sequence[RowLike]:
        """A read for gauges and listings, which may scan many rows (a backend may run it
        apart from claims and grants)."""
        return await self._read(sql, params)

    @abc.abstractmethod
    def _atomic(self) -> AbstractAsyncContextManager[Transaction]:
        """One transaction, shielded from cancellation, its errors StoreError: committed when
        the block ends, rolled back when it raises."""

    @abc.abstractmethod
    async def _claim_due(
        self, whole_rows: bool, excluding: str, params: dict[str, Any]
    ) -> Sequence[RowLike]:
        """Lease up to :limit due sets (``params``: :owner, :now, :until, :limit and those of
        the ``excluding`` condition) in one statement; return the rows as updated
        (``whole_rows``), else their id and next_refresh_at."""

    async def _claim(
        self,
        whole_rows: bool,
        owner: str,
        now: float,
        lease_until: float,
        limit: int,
        exclude_providers: Sequence[str],
    ) -> Sequence[RowLike]:
        if limit <= 0:
            return []
        excluding, params = self._excluding(exclude_providers)
        params.update(owner=owner, now=now, until=lease_until, limit=limit)
        return await self._claim_due(whole_rows, excluding, params)

    @abc.abstractmethod
    async def _enqueue_hook(
        self, event_id: str, event_type: str, payload: str, targets: Sequence[str], now: float
    ) -> None:
        """enqueue_hook's insert: one delivery per target, those queued already kept."""

    @abc.abstractmethod
    async def _claim_hook_rows(self, params: dict[str, Any]) -> Sequence[RowLike]:
        """Claim up to :limit hook deliveries due at :now until :until, in one statement;
        return their HookDelivery columns."""

    @abc.abstractmethod
    async def _expand_events(
        self, targets: Sequence[str], event_types: Sequence[str], now: float, limit: int
    ) -> int:
        """expand_events's move, atomic; returns how many events were taken."""

    def _versions_to_run(self, current: int) -> range:
        """The migrations a schema at version ``current`` needs (migrations.py); a schema newer
        than this refresherd knows is refused, untouched."""
        if current > SCHEMA_VERSION:
            raise StoreError(
                f"database {self.location}: schema version {current} is newer than this "
                f"refresherd understands ({SCHEMA_VERSION}); upgrade refresherd"
            )
        return range(current, SCHEMA_VERSION)

    async def _value(self, sql: str, params: dict[str, Any] | None = None) -> Any:
        rows = await self._read(sql, params)
        return rows[0][0] if rows else None

    async def _report_value(self, sql: str, params: dict[str, Any] | None = None) -> Any:
        rows = await self._report(sql, params)
        return rows[0][0] if rows else None

    # ---- rows in and out, sealed when encryption is on ---------------------------------------

    def _token_set(self, row: RowLike) -> TokenSet:
        return row_to_token_set(row, self.cipher)

    def _seal(self, value: str, row_id: str, column: str) -> str:
        if self.cipher is None:
            return value
        return self.cipher.seal(value, row_id=row_id, column=column)

    def _insert_values(self, n: NewTokenSet, now: float) -> tuple[Any, ...]:
        """A new token set as the values of rows.INSERT_COLUMNS, its tokens sealed if so set."""
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

    # ---- health ------------------------------------------------------------------------------

    async def probe_write(self, *, owner: str, now: float) -> None:
        """One harmless committed write (the storage_probe row); StoreError if it fails."""
        await self._write(
            "INSERT INTO storage_probe (id, probed_at, owner) VALUES (1, :now, :owner)"
            " ON CONFLICT (id) DO UPDATE SET probed_at = excluded.probed_at,"
            " owner = excluded.owner",
            {"now": now, "owner": owner},
        )

    # ---- encryption at rest ------------------------------------------------------------------

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
                plain = open_tokens(cipher, row_id, access, refresh)
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
        async with self._atomic() as tx:
            for params in updates:
                rows = await tx.fetch(
                    "UPDATE token_sets SET access_token = :access, refresh_token = :refresh"
                    " WHERE id = :id AND refresh_token = :old_refresh"
                    f" AND access_token {self.ops.null_safe_equals} :old_access RETURNING id",
                    params,
                )
                done += len(rows)
        return done

    # ---- token sets: add, read, remove -------------------------------------------------------

    async def add(self, new: NewTokenSet, *, now: float) -> None:
        await self.add_many([new], now=now)

    @abc.abstractmethod
    async def add_many(self, items: Iterable[NewTokenSet], *, now: float) -> int:
        """Insert all or nothing. An id that exists already (or twice) raises TokenSetExists."""

    async def _conflict(self, ids: Sequence[str], fetch: Fetch) -> str | None:
        """Name the first of ``ids`` that is stored already or repeats an earlier one (a
        unique-key error does not say which row failed); ``fetch`` runs the reads."""
        stored: set[str] = set()
        chunk = self.ops.list_chunk
        for start in range(0, len(ids), chunk):
            member, params = self.ops.in_list("id", "ids", ids[start : start + chunk])
            rows = await fetch(f"SELECT id FROM token_sets WHERE {member}", params)
            stored.update(r[0] for r in rows)
        return first_conflict(ids, stored)

    async def get(self, token_set_id: str) -> TokenSet | None:
        rows = await self._read("SELECT * FROM token_sets WHERE id = :id", {"id": token_set_id})
        return self._token_set(rows[0]) if rows else None

    def _listed(
        self, states: Collection[str], providers: Collection[str]
    ) -> tuple[list[str], dict[str, Any]]:
        """The conditions (and their parameters) that select the token sets of a listing:
        only those in ``states`` and of ``providers``, where given (empty: any)."""
        conditions: list[str] = []
        params: dict[str, Any] = {}
        for column, name, values in (
            ("state", "states", states),
            ("provider", "providers", providers),
        ):
            if values:
                test, values_params = self.ops.in_list(column, name, sorted(values))
                conditions.append(test)
                params.update(values_params)
        return conditions, params

    async def page(
        self,
        *,
        after: str | None = None,
        limit: int = 500,
        states: Collection[str] = (),
        providers: Collection[str] = (),
    ) -> list[TokenSet]:
        """Token sets in id order after ``after``: keyset pagination, never all in memory.
        ``states``, ``providers``: only those (empty: any), selected by the database."""
        conditions, params = self._listed(states, providers)
        if after is not None:
            conditions.append("id > :after")
            params["after"] = after
        where = f" WHERE {' AND '.join(conditions)}" if conditions else ""
        rows = await self._report(
            f"SELECT * FROM token_sets{where} ORDER BY id LIMIT :limit", {**params, "limit": limit}
        )
        return [self._token_set(r) for r in rows]

    async def iterate(
        self,
        *,
        page_size: int = 500,
        states: Collection[str] = (),
        providers: Collection[str] = (),
    ) -> AsyncIterator[TokenSet]:
        after: str | None = None
        while True:
            batch = await self.page(
                after=after, limit=page_size, states=states, providers=providers
            )
            for token_set in batch:
                yield token_set
            if len(batch) < page_size:
                return
            after = batch[-1].id

    async def longest(
        self,
        columns: Sequence[str],
        *,
        states: Collection[str] = (),
        providers: Collection[str] = (),
    ) -> dict[str, int]:
        """The length of the longest value of each text column among the token sets
        :meth:`iterate` lists with these filters (0 where none): a table's column widths from
        one aggregate, without reading every row twice. A token column's length is that of
        its stored form, sealed or plain: never less than the plain token's."""
        unknown = set(columns) - LISTED_TEXT_COLUMNS
        if unknown:
            raise ValueError(f"not a text column of token_sets: {', '.join(sorted(unknown))}")
        if not columns:
            return {}
        conditions, params = self._listed(states, providers)
        where = f" WHERE {' AND '.join(conditions)}" if conditions else ""
        lengths = ", ".join(f"max(length({c}))" for c in columns)
        rows = await self._report(f"SELECT {lengths} FROM token_sets{where}", params)
        return {c: int(rows[0][i] or 0) for i, c in enumerate(columns)}

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
            value = await self._report_value(
                f"SELECT min({_refresh_expiry(self.ops)}) FROM token_sets"
                " WHERE provider = :provider AND state <> 'invalidated'",
                {"provider": provider, "lifetime": lifetime},
            )
            if value is not None:
                result[provider] = float(value)
        return result

    async def refresh_expiring(
        self, provider: str, *, lifetime: float | None, until: float, limit: int = 500
    ) -> list[tuple[TokenSet, float]]:
        """A provider's live token sets whose absolute refresh-token expiry (as in
        :meth:`refresh_expiry_soonest`) is at or before ``until`` and was not yet warned about
        at that very expiry, soonest first, with that expiry; at most ``limit``."""
        rows = await self._report(
            f"SELECT * FROM (SELECT *, {_refresh_expiry(self.ops)} AS refresh_expiry"
            " FROM token_sets WHERE provider = :provider AND state <> 'invalidated') AS t"
            " WHERE refresh_expiry <= :until"
            " AND (expiry_warned_for IS NULL OR refresh_expiry <> expiry_warned_for)"
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
            value = await self._report_value(
                "SELECT count(*) FROM token_sets WHERE provider = :provider"
                f" AND state <> 'invalidated' AND {_refresh_expiry(self.ops)} <= :until",
                {"provider": provider, "lifetime": lifetime, "until": until},
            )
            result[provider] = int(value or 0)
        return result

    async def counts(self) -> dict[tuple[str, str], int]:
        rows = await self._report(
            "SELECT provider, state, count(*) FROM token_sets GROUP BY provider, state"
        )
        return {(r[0], r[1]): int(r[2]) for r in rows}

    async def expired_counts(self, *, now: float) -> dict[str, int]:
        """Per provider, the token sets still in use (not invalidated) whose access token has
        expired: one aggregate query; a set without a known expiry is not counted."""
        rows = await self._report(
            "SELECT provider, count(*) FROM token_sets"
            " WHERE state <> 'invalidated' AND expires_at < :now GROUP BY provider",
            {"now": now},
        )
        return {r[0]: int(r[1]) for r in rows}

    # ---- scheduling and leases ---------------------------------------------------------------

    def _excluding(self, providers: Sequence[str]) -> tuple[str, dict[str, Any]]:
        """`` AND provider`` not one of ``providers`` (nothing when there are none)."""
        condition, params = self.ops.in_list("provider", "excluded", providers, negate=True)
        return (f" AND {condition}" if condition else ""), params

    async def next_due_at(
        self, *, now: float, exclude_providers: Sequence[str] = ()
    ) -> float | None:
        """Earliest planned refresh among sets no live lease holds, or None."""
        excluding, params = self._excluding(exclude_providers)
        value = await self._value(
            "SELECT min(next_refresh_at) FROM token_sets WHERE state <> 'invalidated'"
            f" AND (lease_owner IS NULL OR lease_until < :now){excluding}",
            {**params, "now": now},
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
        overdue first."""
        rows = await self._claim(False, owner, now, lease_until, limit, exclude_providers)
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
        rows = await self._claim(True, owner, now, lease_until, limit, exclude_providers)
        return sorted(
            (self._token_set(r) for r in rows), key=lambda ts: (ts.next_refresh_at, ts.id)
        )

    async def make_due_written_after(self, *, now: float, limit: float) -> int:
        """Make due now every set last written at a wall time after ``limit`` (> ``now``).

        Such a row was written before the wall clock was stepped back (NTP): its planned time,
        taken on the old clock, may lie up to the size of the step too far ahead, past the
        access token's real expiry. One refresh re-plans it on the current clock.
        """
        rows = await self._write(make_due_written_after_sql(self.ops), {"now": now, "limit": limit})
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
        total = 0
        chunk = self.ops.list_chunk
        for start in range(0, len(owners), chunk):
            member, params = self.ops.in_list(
                "lease_owner", "owners", owners[start : start + chunk]
            )
            rows = await self._write(
                "UPDATE token_sets SET lease_owner = NULL, lease_until = NULL"
                f" WHERE {member} RETURNING id",
                params,
            )
            total += len(rows)
        return total

    async def max_set_grace_period(self) -> float:
        """The largest per-set grace period (0 if none): crash recovery must look back at least
        that far, or a set whose own window outlasts its provider's would be left unrecovered.
        A reporting read: it visits every row, and on the main connection it held every write
        back (1.5 s at a million sets, once a minute)."""
        value = await self._report_value("SELECT max(grace_period) FROM token_sets")
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

    # ---- the refresh itself: journal, grant, failure -----------------------------------------

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
            + f" next_refresh_at = {self.ops.least}(next_refresh_at, :now)"
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
        read_back: bool = True,
    ) -> TokenSet | Literal[True] | None:
        """Compare-and-swap the new grant in: the set as stored, or True without it when not
        ``read_back`` (a scheduled refresh, whose caller reads nothing of it: reading the row
        back cost the database's thread and the event loop about 5 % of a refresh). None: the
        set moved on (or was removed) meanwhile.

        The compare is on the version and the refresh token we sent (a set removed and added
        again under the same id starts at version 1 again), not on the lease: if our lease was
        taken over while our request was out, our rotated token is still the one the IdP handed
        out, and the compare proves nobody stored a newer one.
        """
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
        returning = " RETURNING *" if read_back else " RETURNING id"
        if self.cipher is None:
            rows = await self._write(_SAVE_GRANT + returning, params)
        else:
            rows = await self._sealed_compare_and_swap(params, sent_refresh_token, returning)
        if not rows:
            return None
        return self._token_set(rows[0]) if read_back else True

    async def _sealed_compare_and_swap(
        self, params: dict[str, Any], sent: Secret, returning: str
    ) -> Sequence[RowLike]:
        """save_grant's statement when values are sealed: a nonce makes every sealing differ,
        so the stored refresh token is read (its row locked where the dialect can), opened and
        compared here, and the statement then compares on its stored form, all in one
        transaction."""
        assert self.cipher is not None
        async with self._atomic() as tx:
            stored_rows = await tx.fetch(
                f"SELECT refresh_token FROM token_sets WHERE id = :id{self.ops.for_update}",
                {"id": params["id"]},
            )
            if not stored_rows:
                return []
            stored_form = stored_rows[0][0]
            try:
                stored = self.cipher.open(stored_form, row_id=params["id"], column="refresh_token")
            except EncryptionError as exc:
                raise StoreError(str(exc)) from None
            if stored != sent.reveal():
                return []
            return await tx.fetch(_SAVE_GRANT + returning, {**params, "sent": stored_form})

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
                "resolve": resolve_attempt,
            },
        )
        return bool(rows)

    async def defer(self, token_set_id: str, *, owner: str, next_refresh_at: float) -> None:
        """Release our lease and move the planned time, changing nothing else (circuit open)."""
        await self._write(
            f"UPDATE token_sets SET next_refresh_at = {self.ops.greatest}(next_refresh_at, :next),"
            " lease_owner = NULL, lease_until = NULL WHERE id = :id AND lease_owner = :owner",
            {"id": token_set_id, "owner": owner, "next": next_refresh_at},
        )

    # ---- the hook queue (refresherd.hooks) -----------------------------------------------------

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
        await self._enqueue_hook(event_id, event_type, payload, targets, now)

    async def claim_hook_deliveries(
        self, *, now: float, until: float, limit: int
    ) -> list[HookDelivery]:
        """Due deliveries, claimed until ``until`` (a dispatcher that dies leaves them due
        again then: at least once) with their attempt counted."""
        rows = await self._claim_hook_rows({"now": now, "until": until, "limit": limit})
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
        cast = self.ops.float_cast
        await self._write(
            "UPDATE hook_deliveries SET last_error = :error,"
            f" next_attempt_at = coalesce(:next{cast}, next_attempt_at),"
            f" given_up_at = CASE WHEN :next{cast} IS NULL THEN :now{cast} ELSE NULL END"
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

    # ---- token-set events (refresherd.events): queued by anyone, expanded by a dispatcher -----

    async def expand_events(
        self, *, targets: Sequence[str], event_types: Sequence[str], now: float, limit: int
    ) -> int:
        """Take up to ``limit`` queued events, oldest first, and queue each of a type in
        ``event_types`` (empty: every type) for every target, due now; the rest are dropped.
        A delivery keeps its event's ``created_at``: the give-up age counts from the event.
        Returns how many events were taken."""
        return await self._expand_events(targets, event_types, now, limit)

    async def enqueue_event(
        self, *, event_id: str, event_type: str, payload: str, now: float
    ) -> None:
        """Queue one event for whichever daemon delivers hooks; an event id queued already is
        kept. One statement: it shares the group commit of the refreshes around it."""
        await self._write(
            self.ops.insert_ignore(
                "hook_events (event_id, event_type, payload, created_at)"
                " VALUES (:event_id, :event_type, :payload, :now)",
                key="event_id",
            ),
            {"event_id": event_id, "event_type": event_type, "payload": payload, "now": now},
        )

    async def prune_events(self, *, before: float) -> tuple[int, int]:
        """Delete the queued events raised before ``before`` (no daemon with [hooks] took
        them) and the deliveries delivered or given up before it. Returns both counts."""
        events = await self._delete_counted(
            "DELETE FROM hook_events WHERE created_at < :before", {"before": before}
        )
        deliveries = await self._delete_counted(
            "DELETE FROM hook_deliveries WHERE delivered_at < :before OR given_up_at < :before",
            {"before": before},
        )
        return events, deliveries

    async def _delete_counted(self, sql: str, params: dict[str, Any], *, key: str = "id") -> int:
        if self.ops.counts_in_statement:
            rows = await self._write(
                f"WITH gone AS ({sql} RETURNING 1) SELECT count(*) FROM gone", params
            )
            return int(rows[0][0])
        return len(await self._write(f"{sql} RETURNING {key}", params))

    # ---- connect links (refresherd.connect) ---------------------------------------------------

    async def add_connect_state(self, pending: PendingConnection) -> None:
        """Keep a link's state (by its digest) until one callback takes it."""
        verifier = pending.code_verifier
        await self._write(
            "INSERT INTO connect_states (state_digest, provider, token_set_id, redirect_uri,"
            " return_url, code_verifier, created_at, expires_at) VALUES (:digest, :provider,"
            " :token_set_id, :redirect_uri, :return_url, :verifier, :created_at, :expires_at)",
            {
                "digest": pending.digest,
                "provider": pending.provider,
                "token_set_id": pending.token_set_id,
                "redirect_uri": pending.redirect_uri,
                "return_url": pending.return_url,
                "verifier": None
                if verifier is None
                else self._seal(verifier.reveal(), pending.digest, "code_verifier"),
                "created_at": pending.created_at,
                "expires_at": pending.expires_at,
            },
        )

    async def take_connect_state(self, digest: str) -> PendingConnection | None:
        """Take (delete and return) the state with ``digest``, expired or not, in one statement:
        of any number of callbacks with one state, in any daemons of a fleet, one gets it."""
        rows = await self._write(
            "DELETE FROM connect_states WHERE state_digest = :digest RETURNING *",
            {"digest": digest},
        )
        if not rows:
            return None
        r = dict(zip(rows[0].keys(), rows[0], strict=True))
        verifier = r["code_verifier"]
        if verifier is not None and self.cipher is not None:
            try:
                verifier = self.cipher.open(verifier, row_id=digest, column="code_verifier")
            except EncryptionError:
                raise StoreError(
                    "a connect link's code_verifier does not open with the configured keys"
                ) from None
        return PendingConnection(
            digest=r["state_digest"],
            provider=r["provider"],
            token_set_id=r["token_set_id"],
            redirect_uri=r["redirect_uri"],
            return_url=r["return_url"],
            code_verifier=Secret(verifier) if verifier is not None else None,
            created_at=r["created_at"],
            expires_at=r["expires_at"],
        )

    async def prune_connect_states(self, *, expired_before: float) -> int:
        """Delete the states that expired before ``expired_before``; returns how many."""
        return await self._delete_counted(
            "DELETE FROM connect_states WHERE expires_at < :before",
            {"before": expired_before},
            key="state_digest",
        )

    async def reauthorize(
        self, token_set_id: str, *, expected_version: int, new: NewTokenSet, now: float
    ) -> TokenSet | None:
        """Store a new authorization's grant over an invalidated token set of the same
        provider, in place: its id, ``created_at`` and version history stay (the version goes
        on counting), its tokens, expiries and per-set policy are the new authorization's, its
        failure, journal and lease are cleared. None: the set is not (any more) that
        invalidated version of that provider."""
        access = new.access_token.reveal() if new.access_token else None
        rows = await self._write(
            "UPDATE token_sets SET access_token = :access, refresh_token = :refresh,"
            " token_type = :token_type, scope = coalesce(:scope, scope),"
            " expires_at = :expires_at, refresh_expires_at = :refresh_expires_at,"
            " refresh_token_usage = :usage, grace_period = :grace_period,"
            " refresh_token_lifetime = :lifetime, refresh_token_idle_lifetime = :idle,"
            " refresh_mode = :mode, state = 'active', version = version + 1,"
            " next_refresh_at = :next, updated_at = :now, last_error = NULL, failures = 0,"
            " invalid_reason = NULL, expiry_warned_for = NULL, attempt_version = NULL,"
            " attempt_started_at = NULL, attempt_owner = NULL, attempt_sends = NULL,"
            " attempt_settled = NULL, lease_owner = NULL, lease_until = NULL"
            " WHERE id = :id AND provider = :provider AND version = :version"
            " AND state = 'invalidated' RETURNING *",
            {
                "id": token_set_id,
                "provider": new.provider,
                "version": expected_version,
                "access": None
                if access is None
                else self._seal(access, token_set_id, "access_token"),
                "refresh": self._seal(new.refresh_token.reveal(), token_set_id, "refresh_token"),
                "token_type": new.token_type,
                "scope": new.scope,
                "expires_at": new.expires_at,
                "refresh_expires_at": new.refresh_expires_at,
                "usage": new.refresh_token_usage.value if new.refresh_token_usage else None,
                "grace_period": new.grace_period,
                "lifetime": new.refresh_token_lifetime,
                "idle": new.refresh_token_idle_lifetime,
                "mode": new.refresh_mode.value if new.refresh_mode else None,
                "next": new.next_refresh_at,
                "now": now,
            },
        )
        return self._token_set(rows[0]) if rows else None

    async def invalidation_counts(self) -> dict[tuple[str, str], int]:
        """Invalidations ever recorded in this database, by (provider, reason)."""
        rows = await self._read("SELECT provider, reason, count FROM invalidation_counts")
        return {(r[0], r[1]): int(r[2]) for r in rows}

    # ---- moving a whole database (refresherd migrate) -----------------------------------------

    async def export_rows(self, table: str, *, batch: int = 1000) -> AsyncIterator[list[Row]]:
        columns, key = table_columns(table)
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
                {"after": after, "limit": batch} if after is not None else {"limit": batch},
            )
            if not rows:
                return
            yield [tuple(r) for r in rows]
            if len(rows) < batch:
                return
            after = rows[-1][key]
