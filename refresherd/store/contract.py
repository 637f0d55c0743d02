"""The one store interface, and the values that cross it, whichever database is behind it.

Two implementations keep this contract: :class:`refresherd.store.sqlite.SqliteStore` (SQLite,
one host) and :class:`refresherd.store.postgres.PostgresStore` (PostgreSQL, a fleet). The rest
of the daemon talks to a :class:`TokenStore` and never learns which one it has;
:func:`refresherd.store.open_store` picks it from the configured location. The contract, for
both:

- Every write is committed before it returns (durable before a token is used or reported);
  concurrent writes may share one commit (group commit).
- Leases: a token set is worked on only under an unexpired lease; claims skip leased rows.
- Compare-and-swap: a grant is stored only over the version and refresh token it was sent for.
- The journal (``begin_attempt``) is committed before a refresh token leaves.
- Owners: every process that takes leases holds an owner identity for as long as it lives
  (:meth:`TokenStore.owner`); :meth:`TokenStore.owner_alive` tells a dead owner from a live
  one at once, without waiting for its leases to expire.
- The exporter: one owner per database at a time holds the role of exporting the database-wide
  metrics (:meth:`TokenStore.hold_exporter`), so that a sum across daemons counts each database
  once; the role ends with its holder's owner registration, however that ends.
- Errors are :class:`StoreError` and never carry a token value.
"""

from __future__ import annotations

import enum
import errno
import os
import stat
from collections.abc import AsyncIterable, AsyncIterator, Collection, Iterable, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Literal, Protocol

from refresherd.connect import PendingConnection
from refresherd.errors import RefresherdError
from refresherd.model import Attempt, RefreshMode, RefreshTokenUsage, Secret, State, TokenSet
from refresherd.storage_health import StorageReason


class StoreError(RefresherdError):
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


class RefusalReason(enum.StrEnum):
    """Why a claim of one token set did not succeed (:class:`ClaimRefused`)."""

    NOT_FOUND = "not_found"  # no such set
    INVALIDATED = "invalidated"  # its refresh token is dead: nothing to refresh
    LEASED = "leased"  # another refresh holds it (``owner``, ``until``)


@dataclass(frozen=True, slots=True)
class ClaimRefused:
    """Why a claim did not succeed: the set is gone, invalidated, or leased by someone else."""

    reason: RefusalReason
    owner: str | None = None
    until: float | None = None


# The read contract: a view for applications that read access tokens straight from the database
# (columns are only ever added to it, never renamed or removed).
READ_CONTRACT_VIEW: Final = "refresherd_access_tokens"

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


class ChangeFeed(Protocol):
    """What changed in the database, for a cache of what the token API answers
    (refresherd.web.token_cache): every change to a token set's answer, by any process, is
    recorded by the database itself (store/migrations.py, version 10), so no write path, ours
    or anyone's, can be left out."""

    def quiet(self) -> bool:
        """True when nothing can have been committed since the last :meth:`catch_up` began:
        a look without a database round trip (SQLite's ``PRAGMA data_version``). False when
        that cannot be known (PostgreSQL, or the look failed): then catch up first."""
        ...

    async def catch_up(self) -> frozenset[str] | None:
        """The ids of the token sets whose answer may have changed since the last catch-up,
        reflecting every commit that came before the call; None when anything may have
        changed (the log was pruned past us, the listening session was lost): forget all.
        StoreError when the database does not answer."""
        ...


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

    async def hold_exporter(self) -> bool:
        """True while this process is the one that exports the database's figures (the
        database-wide metrics); becomes it if none is. Never waits for the role: asked again
        (every gauge cycle), it stays True for as long as the role is held, which is until this
        owner registration ends (the process exits or dies, or its database session is lost).
        False outside :meth:`owner`, and whenever the role cannot be known to be held."""
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
        self, chunks: AsyncIterable[Sequence[tuple[str, NewTokenSet]]], *, now: float
    ) -> int:
        """All of ``chunks`` or nothing (cancelled before the commit: nothing); each item
        ``(where it was read, token set)``. TokenSetExists names an id stored already or
        repeated, with its ``where``; an exception raised by ``chunks`` comes out as it is."""
        ...

    async def get(self, token_set_id: str) -> TokenSet | None: ...
    async def read(self, token_set_id: str) -> TokenSet | None:
        """:meth:`get` on a connection of its own, apart from the writes (and from gauges'
        scans), so that token reads neither wait for a commit nor queue one behind another.
        Sees every commit that came before the call."""
        ...

    def change_feed(self) -> AbstractAsyncContextManager[ChangeFeed]:
        """A :class:`ChangeFeed` for the life of the context (its connection closed after)."""
        ...

    async def page(
        self,
        *,
        after: str | None = None,
        limit: int = 500,
        states: Collection[str] = (),
        providers: Collection[str] = (),
    ) -> list[TokenSet]: ...
    def iterate(
        self,
        *,
        page_size: int = 500,
        states: Collection[str] = (),
        providers: Collection[str] = (),
    ) -> AsyncIterator[TokenSet]: ...
    async def longest(
        self,
        columns: Sequence[str],
        *,
        states: Collection[str] = (),
        providers: Collection[str] = (),
    ) -> dict[str, int]: ...
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
        read_back: bool = True,
    ) -> TokenSet | Literal[True] | None: ...
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

    # ---- connect links (refresherd.connect) ---------------------------------------------
    async def add_connect_state(self, pending: PendingConnection) -> None:
        """Keep a link's state (its digest; the PKCE verifier sealed like tokens)."""
        ...

    async def take_connect_state(self, digest: str) -> PendingConnection | None:
        """Delete and return the state with ``digest`` in one statement (single use across a
        fleet); None if there is none."""
        ...

    async def prune_connect_states(self, *, expired_before: float) -> int:
        """Delete states that expired before ``expired_before``; returns how many."""
        ...

    async def reauthorize(
        self, token_set_id: str, *, expected_version: int, new: NewTokenSet, now: float
    ) -> TokenSet | None:
        """A new authorization's grant over an invalidated set (same provider, version
        ``expected_version``), in place; None if it is not that any more."""
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
