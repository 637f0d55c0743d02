"""The one store interface, and the values that cross it, whichever database is behind it.

Two implementations keep this contract: :class:`refresherd.store.Store` (SQLite, one host) and
:class:`refresherd.pgstore.PostgresStore` (PostgreSQL, a fleet). The rest of the daemon talks
to a :class:`TokenStore` and never learns which one it has; :func:`open_store` picks it from
the configured location. The contract, for both:

- Every write is committed before it returns (durable before a token is used or reported);
  concurrent writes may share one commit (group commit).
- Leases: a token set is worked on only under an unexpired lease; claims skip leased rows.
- Compare-and-swap: a grant is stored only over the version and refresh token it was sent for.
- The journal (``begin_attempt``) is committed before a refresh token leaves.
- Owners: every process that takes leases holds an owner identity for as long as it lives
  (:meth:`TokenStore.owner`); :meth:`TokenStore.owner_alive` tells a dead owner from a live
  one at once, without waiting for its leases to expire.
- Errors are :class:`StoreError` and never carry a token value.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable, Sequence
from collections.abc import Set as AbstractSet
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Protocol
from urllib.parse import parse_qsl, quote, unquote, urlsplit, urlunsplit

from refresherd.model import Attempt, RefreshMode, RefreshTokenUsage, Secret, State, TokenSet
from refresherd.storage_health import StorageReason


class StoreError(Exception):
    """The database could not do what was asked. Never carries a token value.

    ``reason`` classifies the database's error (disk full, read-only, locked, unreachable...)
    for the storage pause and its metric; OTHER where the error did not come from the database.
    """

    def __init__(self, message: str, *, reason: StorageReason = StorageReason.OTHER) -> None:
        super().__init__(message)
        self.reason = reason


class TokenSetExists(StoreError):
    pass


class DatabaseMisconfigured(StoreError):
    """The database cannot work where the config puts it (its directory is missing or not
    writable, its path is not a regular file): a restart will not help, so ``run`` exits 78
    (EX_CONFIG), which systemd does not restart. ``for_everyone`` is false where the cause may
    be this process's user alone (permissions): ``check-config``, perhaps run by another user
    than the daemon, only warns about those."""

    def __init__(self, message: str, *, for_everyone: bool = True) -> None:
        super().__init__(message)
        self.for_everyone = for_everyone


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
    refresh_token_idle_lifetime: float | None = None
    refresh_mode: RefreshMode | None = None


@dataclass(frozen=True, slots=True)
class HookDelivery:
    """One queued notification for one target, as claimed for delivery."""

    id: int
    event_id: str
    target: str  # "webhook" | "command"
    event_type: str
    payload: str  # the event as JSON text
    created_at: float
    attempts: int  # including the one this claim is for


@dataclass(frozen=True, slots=True)
class ClaimRefused:
    """Why a claim did not succeed: the set is gone, invalidated, or leased by someone else."""

    reason: str  # "not_found" | "invalidated" | "leased"
    owner: str | None = None
    until: float | None = None


# ---- decisions both stores make the same way, whatever SQL got them their facts ----------


def claim_refusal(current: TokenSet | None) -> ClaimRefused:
    """Why a claim of a set, read back as ``current`` after the claim missed, was refused."""
    if current is None:
        return ClaimRefused("not_found")
    if current.state is State.INVALIDATED:
        return ClaimRefused("invalidated")
    return ClaimRefused("leased", owner=current.lease_owner, until=current.lease_until)


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


# The columns ``refresherd migrate`` copies, table by table, with their values as stored
# (token values stay sealed as they are: a sealing names its row and column, not the database).
TOKEN_SET_COLUMNS: tuple[str, ...] = (
    "id",
    "provider",
    "access_token",
    "refresh_token",
    "token_type",
    "scope",
    "expires_at",
    "state",
    "version",
    "next_refresh_at",
    "created_at",
    "updated_at",
    "last_refresh_at",
    "last_error",
    "failures",
    "invalid_reason",
    "lease_owner",
    "lease_until",
    "attempt_version",
    "attempt_started_at",
    "attempt_owner",
    "attempt_sends",
    "refresh_expires_at",
    "refresh_token_usage",
    "grace_period",
    "refresh_token_lifetime",
    "refresh_token_idle_lifetime",
    "refresh_mode",
    "expiry_warned_for",
    "attempt_settled",
)
# The journal's series rules, shared by both dialects' begin_attempt (parameters :version and
# :keep_since, the earliest start of a series whose grace window is still open, NULL for a
# token with no window: a re-use token's every refresh is a series of its own). A series goes
# on (keeps its start, the IdP counts the window from the first use) while its window is open
# and a send of it may have been processed; one whose sends were all settled as not processed
# consumed nothing and starts afresh. A series whose window closed with an unsettled send is a
# missed window: no new series may start on that token (refresher: grace_window_missed).
SERIES_GOES_ON_SQL: Final = (
    "(CAST(:keep_since AS DOUBLE PRECISION) IS NOT NULL AND attempt_version = :version"
    " AND attempt_started_at >= :keep_since"
    " AND attempt_sends > coalesce(attempt_settled, 0))"
)
# begin_attempt's SET clause for the journal, the same in both dialects.
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
HOOK_DELIVERY_COLUMNS: tuple[str, ...] = (
    "id",
    "event_id",
    "target",
    "event_type",
    "payload",
    "created_at",
    "attempts",
    "next_attempt_at",
    "last_error",
    "delivered_at",
    "given_up_at",
)
HOOK_EVENT_COLUMNS: tuple[str, ...] = ("id", "event_id", "event_type", "payload", "created_at")
INVALIDATION_COUNT_COLUMNS: tuple[str, ...] = ("provider", "reason", "count")
# A row as ``export_rows`` yields it and ``load_rows`` takes it: values in the order above.
Row = tuple[Any, ...]


class TokenStore(Protocol):
    """What the daemon, the CLI and the API need of a store (see the module docstring)."""

    @property
    def location(self) -> str:
        """Where the database is, for messages: a path, or a URL without its password."""
        ...

    cipher: Any

    async def close(self) -> None: ...

    # ---- owners (who holds a lease, and are they alive?) --------------------------------
    def owner(self, name: str | None) -> AbstractAsyncContextManager[str]:
        """Register this process as a lease owner for the life of the context; yields its id."""
        ...

    async def owner_alive(self, owner: str) -> bool:
        """False only when ``owner`` is known to be gone; anything uncertain counts as alive."""
        ...

    async def live_owners(self) -> set[str]:
        """The owner ids registered now whose process is alive (running daemons and CLIs)."""
        ...

    async def owner_lost(self) -> None:
        """Return if this process's own owner registration is lost (its leases may be taken
        over by others from then on); never returns while it holds."""
        ...

    # ---- health and housekeeping --------------------------------------------------------
    async def schema_version(self) -> int: ...
    async def ping(self) -> None: ...
    async def probe_write(self, *, owner: str, now: float) -> None: ...
    async def checkpoint(self) -> tuple[int, int]: ...
    def wal_bytes(self) -> int: ...
    async def data_version(self) -> int: ...

    # ---- encryption at rest -------------------------------------------------------------
    async def sealed_key_ids(self) -> set[str]: ...
    async def rekey(self, *, batch: int = 200) -> int: ...

    # ---- token sets ---------------------------------------------------------------------
    async def add(self, new: NewTokenSet, *, now: float) -> None: ...
    async def add_many(self, items: Iterable[NewTokenSet], *, now: float) -> int: ...
    async def import_stream(
        self, items: Iterable[tuple[str, NewTokenSet]], *, now: float
    ) -> int: ...
    async def get(self, token_set_id: str) -> TokenSet | None: ...
    async def page(self, *, after: str | None = None, limit: int = 500) -> list[TokenSet]: ...
    def iterate(self, *, page_size: int = 500) -> AsyncIterator[TokenSet]: ...
    async def remove(self, token_set_id: str) -> bool: ...
    async def refresh_expiry_soonest(
        self, lifetimes: dict[str, float | None]
    ) -> dict[str, float]: ...
    async def refresh_expiring(
        self, provider: str, *, lifetime: float | None, until: float, limit: int = 500
    ) -> list[tuple[TokenSet, float]]: ...
    async def refresh_expiring_counts(
        self, lifetimes: dict[str, float | None], *, until: float
    ) -> dict[str, int]: ...
    async def mark_expiry_warned(self, warned: Sequence[tuple[str, float]]) -> None: ...
    async def counts(self) -> dict[tuple[str, str], int]: ...
    async def expired_counts(self, *, now: float) -> dict[str, int]: ...

    # ---- scheduling and leases ----------------------------------------------------------
    async def next_due_at(
        self, *, now: float, exclude_providers: Sequence[str] = ()
    ) -> float | None: ...
    async def claim_due(
        self,
        *,
        owner: str,
        now: float,
        lease_until: float,
        limit: int,
        exclude_providers: Sequence[str] = (),
    ) -> list[str]: ...
    async def claim_due_sets(
        self,
        *,
        owner: str,
        now: float,
        lease_until: float,
        limit: int,
        exclude_providers: Sequence[str] = (),
    ) -> list[TokenSet]:
        """claim_due, returning each leased set as claim() would (one round trip fewer)."""
        ...

    async def make_due_written_after(self, *, now: float, limit: float) -> int: ...
    async def claim(
        self, token_set_id: str, *, owner: str, now: float, lease_until: float
    ) -> TokenSet | ClaimRefused: ...
    async def renew_lease(self, token_set_id: str, *, owner: str, lease_until: float) -> bool: ...
    async def release(self, token_set_id: str, *, owner: str) -> None: ...
    async def release_all(self, *, owner: str) -> int: ...
    async def lease_holders(self, *, now: float) -> set[str]: ...
    async def clear_leases_of(self, owners: Iterable[str]) -> int: ...
    async def max_set_grace_period(self) -> float: ...
    async def unresolved_attempts(self, *, since: float) -> list[tuple[str, str]]: ...

    # ---- the refresh itself -------------------------------------------------------------
    async def begin_attempt(
        self,
        token_set_id: str,
        *,
        owner: str,
        version: int,
        now: float,
        keep_since: float | None,
    ) -> Attempt | None: ...
    async def settle_send(self, token_set_id: str, *, version: int, started_at: float) -> None: ...
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
    ) -> TokenSet | None: ...
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
    ) -> bool: ...
    async def defer(self, token_set_id: str, *, owner: str, next_refresh_at: float) -> None: ...

    # ---- the hook queue -----------------------------------------------------------------
    async def enqueue_hook(
        self,
        *,
        event_id: str,
        event_type: str,
        payload: str,
        targets: Sequence[str],
        now: float,
    ) -> None: ...
    async def claim_hook_deliveries(
        self, *, now: float, until: float, limit: int
    ) -> list[HookDelivery]: ...
    async def hook_delivered(self, delivery_id: int, *, now: float) -> None: ...
    async def hook_failed(
        self, delivery_id: int, *, error: str, next_attempt_at: float | None, now: float
    ) -> None: ...
    async def next_hook_due(self) -> float | None: ...
    async def pending_hooks(self) -> int: ...

    # ---- token-set events (refresherd.events) -------------------------------------------
    async def enqueue_event(
        self, *, event_id: str, event_type: str, payload: str, now: float
    ) -> None:
        """Queue an event for whichever daemon delivers hooks (no hook config needed)."""
        ...

    async def expand_events(
        self, *, targets: Sequence[str], event_types: Sequence[str], now: float, limit: int
    ) -> int:
        """Move up to ``limit`` queued events into the hook queue, one delivery per target
        (only ``event_types``; empty: all), atomically; returns how many events were taken."""
        ...

    async def prune_events(self, *, before: float) -> tuple[int, int]:
        """Delete events queued before ``before`` that no daemon took, and deliveries finished
        before it; returns (events, deliveries) deleted."""
        ...

    async def invalidation_counts(self) -> dict[tuple[str, str], int]:
        """Invalidations recorded in the database (by whichever process), by (provider,
        reason); counted in the invalidating statement itself, never decreasing."""
        ...

    # ---- moving a whole database (refresherd migrate) -----------------------------------
    def export_rows(self, table: str, *, batch: int = 1000) -> AsyncIterator[list[Row]]:
        """Every row of ``table`` (one of migrate.TABLES) as stored, in batches, with the
        columns of its ``*_COLUMNS`` tuple above in that order."""
        ...

    async def load_rows(self, table: str, rows: AsyncIterator[list[Row]]) -> int:
        """Insert rows as ``export_rows`` yields them, all or nothing, into an empty table
        (StoreError otherwise); returns how many."""
        ...


@dataclass(frozen=True, slots=True)
class PostgresLocation:
    """A PostgreSQL database: ``dsn`` as libpq takes it (it may hold a password, so it is a
    Secret and never printed), ``display`` the same URL without the password."""

    dsn: Secret
    display: str

    def __str__(self) -> str:
        return self.display


# Where the token sets live: a SQLite file, or a PostgreSQL database.
Location = Path | PostgresLocation

_POSTGRES_SCHEMES = ("postgresql", "postgres")


def parse_location(text: str, *, base_dir: Path, password: Secret | None = None) -> Location:
    """A database location as written in a config file or on the command line.

    ``postgresql://user@host:port/dbname?sslmode=require`` (libpq's URL; ``postgres://`` too)
    names a PostgreSQL database; ``password``, when given, is put into it. ``sqlite:///abs/path``
    or a plain path (relative to ``base_dir``) names a SQLite file. ValueError says what is wrong.
    """
    scheme, sep, rest = text.partition("://")
    if not sep:
        if not text.strip():
            raise ValueError("expected a SQLite file path or a postgresql:// URL, got nothing")
        return base_dir / text
    scheme = scheme.lower()
    if scheme == "sqlite":
        if not rest.startswith("/") or rest == "/":
            raise ValueError(
                "expected sqlite:// followed by an absolute path, such as "
                "sqlite:///var/lib/refresherd/tokens.db"
            )
        return Path(rest)
    if scheme not in _POSTGRES_SCHEMES:
        raise ValueError(
            f"unknown database scheme {scheme!r}: expected a SQLite path, sqlite:///path or "
            "postgresql://user@host/dbname"
        )
    userinfo, authority_on = _split_userinfo(rest)
    parts = urlsplit(f"{scheme}://{authority_on}")
    try:
        parts.port  # noqa: B018 -- raises on a port that is not a number
    except ValueError:
        raise ValueError("the postgresql:// URL has a port that is not a number") from None
    if not parts.hostname and "host=" not in parts.query:
        raise ValueError("the postgresql:// URL names no host, such as postgresql://user@host/db")
    raw_user, colon, raw_password = (userinfo or "").partition(":")
    user = unquote(raw_user)
    if password is not None:
        userinfo_out = f"{quote(user, safe='')}:{quote(password.reveal(), safe='')}@"
    elif colon:
        userinfo_out = f"{quote(user, safe='')}:{quote(unquote(raw_password), safe='')}@"
    else:
        userinfo_out = f"{quote(user, safe='')}@" if user else ""
    dsn = urlunsplit((parts.scheme, userinfo_out + parts.netloc, parts.path, parts.query, ""))
    shown = f"{quote(user, safe='')}@" if user else ""
    display = urlunsplit((parts.scheme, shown + parts.netloc, parts.path, "", ""))
    return PostgresLocation(dsn=Secret(dsn), display=display)


def _split_userinfo(rest: str) -> tuple[str | None, str]:
    """Split what follows ``postgresql://`` into the user[:password] part and the rest.

    As libpq does, the user and password end at an '@' before the first '/', so a password
    may hold '?', '#' or '@' unencoded (urlsplit would cut it at '?' or '#' and put half of it
    into the host shown in logs). A '/' in it cannot be told from the database path: refused,
    without echoing the URL."""
    head = rest.split("/", 1)[0]
    userinfo, at, _ = head.rpartition("@")
    if at:
        return userinfo, rest[len(userinfo) + 1 :]
    if "@" in rest.split("?", 1)[0]:
        raise ValueError(
            "the postgresql:// URL has an '@' after a '/': a '/' in the user name or password "
            "must be written %2F (or put the password in database_password_file); "
            "the URL is not shown, it may hold a password"
        )
    return None, rest


def has_password(text: str) -> bool:
    """Does this database URL carry a password itself (rather than from a file)?"""
    scheme, sep, rest = text.partition("://")
    if not sep or scheme.lower() not in _POSTGRES_SCHEMES:
        return False
    try:
        userinfo, authority_on = _split_userinfo(rest)
    except ValueError:
        return False  # parse_location says what is wrong
    query = urlsplit(f"{scheme}://{authority_on}").query
    in_query = any(k.strip().lower() == "password" for k, _ in parse_qsl(query))
    return ":" in (userinfo or "") or in_query


async def open_store(
    location: Location, *, create: bool = True, cipher: Any = None, verify_keys: bool = True
) -> TokenStore:
    """Open the store at ``location``; ``create`` makes a missing SQLite file (PostgreSQL
    databases are never created, only migrated). ``verify_keys=False`` skips the check that
    ``cipher`` opens every sealed value: for ``refresherd migrate``, which copies values as
    they are stored and never opens one."""
    if isinstance(location, PostgresLocation):
        try:
            from refresherd.pgstore import PostgresStore
        except ModuleNotFoundError as exc:
            if exc.name != "asyncpg":
                raise
            raise StoreError(
                f"database {location.display}: PostgreSQL needs the asyncpg driver: "
                "pip install 'refresherd[postgresql]'"
            ) from None

        return await PostgresStore.open(
            location, create=create, cipher=cipher, verify_keys=verify_keys
        )
    from refresherd.store import Store

    return await Store.open(location, create=create, cipher=cipher, verify_keys=verify_keys)


def postgres_location(url: str) -> PostgresLocation:
    """A PostgreSQL location from a libpq URL (the password, if any, stays in the DSN)."""
    location = parse_location(url, base_dir=Path())
    if not isinstance(location, PostgresLocation):
        raise ValueError("expected a postgresql:// URL")
    return location
