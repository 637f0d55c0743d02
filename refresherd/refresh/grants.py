"""A received grant is stored before anything else sees it, and never dropped while the
database refuses it: held in memory and retried.

The IdP may have rotated the refresh token, and the grant in hand may be the only copy. It is
stored with compare-and-swap (the version and the refresh token sent), shielded from
cancellation; while the database refuses it, it is counted as held
(:meth:`StorageWatch.holding_grant`: ``refresherd_unpersisted_grants``, a /readyz problem),
refreshes stay paused, and it is retried with backoff: in a running daemon (:attr:`Grants.hold`)
for as long as it takes, from the start of shutdown (and in the CLI) for PERSIST_DEADLINE more.
A grant from outside a refresh (the token API's code exchange) is held the same way.
"""

from __future__ import annotations

import random
from collections.abc import Awaitable, Callable
from typing import Final, Literal, TypeVar

import anyio

from refresherd import policy
from refresherd.clock import Clock
from refresherd.logs import get_logger
from refresherd.metrics import Metrics
from refresherd.model import Grant, RefreshTokenUsage, State, TokenSet
from refresherd.refresh.outcome import Outcome, RefreshResult
from refresherd.refresh.storage import StorageWatch
from refresherd.settings import ScheduleConfig
from refresherd.store import NewTokenSet, StoreError, TokenSetExists, TokenStore

log = get_logger("refresherd.refresh.grants")

# What a store write that _retrying repeats returns.
_Saved = TypeVar("_Saved")

# A grant we hold but could not persist is retried at this pace until storage answers.
PERSIST_RETRY_INITIAL: Final = 0.2
PERSIST_RETRY_MAX: Final = 5.0
# How long a received grant is held while the database refuses it once nothing else holds it:
# during shutdown, and in processes that do not set ``Grants.hold`` (the CLI). A running daemon
# holds it for as long as the database refuses it.
PERSIST_DEADLINE: Final = 30.0
# A held grant's failed persist attempts are logged at most this often.
PERSIST_LOG_INTERVAL: Final = 60.0


class Grants:
    """Stores the grants of one process's refreshes and code exchanges; see the module
    docstring."""

    def __init__(
        self,
        *,
        store: TokenStore,
        owner: str,
        storage: StorageWatch,
        metrics: Metrics,
        clock: Clock,
        rng: random.Random,
    ) -> None:
        self._store = store
        self._owner = owner
        self._storage = storage
        self._metrics = metrics
        self._clock = clock
        self._rng = rng
        # True while a daemon runs: a grant the database refuses is then held until it takes
        # it, not only for PERSIST_DEADLINE. The daemon clears it when it starts to shut down.
        self.hold = False

    async def store_refreshed(
        self,
        ts: TokenSet,
        eff: policy.EffectivePolicy,
        grant: Grant,
        *,
        sends: int,
        schedule: ScheduleConfig,
        read_back: bool = True,
    ) -> RefreshResult:
        """Store the grant a refresh of ``ts`` received, planned by ``schedule``: refreshed,
        or what the set became meanwhile (adopted, not_found), or storage_error once the
        database refused it for too long. ``read_back``: the result carries the set as
        stored (else no set: a scheduled refresh's result is read by nobody, and a caller
        that joined it reads the set itself)."""
        now = self._clock.wall()
        lifetime = grant.expires_in if grant.expires_in is not None else schedule.default_expires_in
        expires_at = now + grant.expires_in if grant.expires_in is not None else None
        next_at = policy.plan_after_refresh(
            now=now,
            access_expires_at=now + lifetime,
            access_lifetime=lifetime,
            eff=eff,
            cfg=schedule,
            rand=self._rng.random(),
        )
        # The IdP may omit refresh_token: then the old one stays valid (re-use tokens).
        refresh_token = grant.refresh_token or ts.refresh_token

        def save() -> Awaitable[TokenSet | Literal[True] | None]:
            return self._store.save_grant(
                ts.id,
                owner=self._owner,
                expected_version=ts.version,
                sent_refresh_token=ts.refresh_token,
                access_token=grant.access_token,
                refresh_token=refresh_token,
                token_type=grant.token_type,
                scope=grant.scope,
                expires_at=expires_at,
                next_refresh_at=next_at,
                now=now,
                refresh_expires_at=(
                    now + grant.refresh_expires_in if grant.refresh_expires_in is not None else None
                ),
                read_back=read_back,
            )

        # The store shields each write from cancellation itself, so the first try needs no
        # scope of its own (a cancel scope per refresh is a measurable share of the CPU).
        failed: StoreError | None = None
        try:
            saved, stored = await save(), True
        except StoreError as exc:
            failed = exc
        if failed is not None:
            # We hold the only copy of a rotated token: shutdown waits for it (bounded), and a
            # failing store is retried, loudly, rather than the grant dropped. A running
            # daemon holds it for as long as storage refuses it (refreshes are paused
            # meanwhile).
            with anyio.CancelScope(shield=True):
                saved, stored = await self._retrying(ts, save, failed)
        if stored:
            # The grant went in: storage takes writes (again, if a pause was on).
            self._storage.took_write(via="grant")
        if not stored:
            self._metrics.refresh_failures.labels(ts.provider, "storage_error").inc()
            if eff.usage is RefreshTokenUsage.ONE_TIME:
                message = (
                    "grant not persisted: the database refused it for too long; the journal "
                    "keeps the attempt, and a retry inside the IdP's grace window may still "
                    "recover it"
                )
            else:
                # Not journaled (Series._journal): nothing was spent, the stored token works.
                message = (
                    "grant not persisted: the database refused it for too long; the stored "
                    "re-use refresh token still works, the next refresh gets a new access token"
                )
            log.critical(message, token_set=ts.id, provider=ts.provider, waited=PERSIST_DEADLINE)
            return RefreshResult(
                Outcome.STORAGE_ERROR, token_set=ts, reason="storage_error", attempt=sends
            )
        if saved is None:
            current = await self._store.get(ts.id)
            if current is None:
                # Removed (`tokens remove`) while our request was out: nothing to keep.
                return RefreshResult(Outcome.NOT_FOUND, detail="removed during the refresh")
            # Someone stored a newer version while our request was out (our lease had lapsed).
            # Theirs is the live chain; ours is discarded and counted.
            self._metrics.refresh_failures.labels(ts.provider, "lost_race").inc()
            return RefreshResult(
                Outcome.ADOPTED,
                token_set=current,
                reason="lost_race",
                detail="a newer grant was stored concurrently",
            )
        return RefreshResult(
            Outcome.REFRESHED,
            token_set=saved if isinstance(saved, TokenSet) else None,
            detail=f"sends={sends}",
            attempt=sends,
        )

    async def add_granted(
        self, new: NewTokenSet, *, now: float, reauthorize: bool = False
    ) -> TokenSet | None:
        """Store a new token set whose grant the IdP has just issued (an exchanged code).

        Its refresh token exists nowhere else and the code that bought it is spent, so a
        database that refuses it is retried exactly as a refresh's grant is (held, counted in
        ``unpersisted_grants``, refreshes paused meanwhile) rather than the grant dropped.
        Returns the set as stored, or None when another set of this id is there already: that
        one is kept, the caller says what becomes of this grant. With ``reauthorize`` (a
        connect link), a set of this id that is invalidated under the same provider is
        authorized again in place instead (TokenStore.reauthorize). Raises StoreError only when
        the database refused it past PERSIST_DEADLINE once nothing holds grants any more
        (shutdown, or not a daemon): then the grant is lost, and said so."""
        mine = _as_stored(new, now)

        async def save() -> TokenSet | None:
            for _ in range(3):
                try:
                    await self._store.add(new, now=now)
                except TokenSetExists:
                    current = await self._store.get(new.id)
                else:
                    return mine
                if current is None:
                    continue  # removed again in between: try once more
                if current.refresh_token == new.refresh_token:
                    # Our own insert of an earlier try: committed, its answer lost (a
                    # connection to PostgreSQL that dropped after the commit).
                    return current
                if (
                    reauthorize
                    and current.state is State.INVALIDATED
                    and current.provider == new.provider
                ):
                    again = await self._store.reauthorize(
                        new.id, expected_version=current.version, new=new, now=now
                    )
                    if again is not None:
                        return again
                    continue  # it changed in between: look again
                return None
            return None

        failed: StoreError | None = None
        try:
            saved = await save()
        except StoreError as exc:
            failed = exc
        if failed is not None:
            # Shielded as in store_refreshed: a cancelled caller must not drop the only copy.
            with anyio.CancelScope(shield=True):
                saved, stored = await self._retrying(mine, save, failed)
            if not stored:
                log.critical(
                    "exchanged grant not persisted: the database refused it for too long; the "
                    "authorization code is spent, so the customer must authorize again",
                    token_set=new.id,
                    provider=new.provider,
                    waited=PERSIST_DEADLINE,
                )
                raise StoreError(
                    f"token set {new.id!r}: the database refused the exchanged grant",
                    reason=failed.reason,
                )
        self._storage.took_write(via="grant")
        return saved

    async def _retrying(
        self,
        ts: TokenSet,
        save: Callable[[], Awaitable[_Saved]],
        error: StoreError,
    ) -> tuple[_Saved | None, bool]:
        """The grant could not be stored (``error``): count it as held, and retry with backoff
        until it goes in, or, once nothing holds grants any more (shutdown, or not a daemon),
        for PERSIST_DEADLINE. Returns (what the store returned, whether it was stored)."""
        delay = PERSIST_RETRY_INITIAL
        # Counted from when nothing holds the grant any more (shutdown, or not a daemon).
        limit_from: float | None = None
        failed_attempts = 0
        logged_at = float("-inf")
        with self._storage.holding_grant():
            while True:
                self._storage.failed(error, during="persist")
                failed_attempts += 1
                # The first failure, then once a minute: an outage of hours stays readable.
                if self._clock.monotonic() - logged_at >= PERSIST_LOG_INTERVAL:
                    logged_at = self._clock.monotonic()
                    log.error(
                        "cannot persist grant, holding it and retrying",
                        token_set=ts.id,
                        provider=ts.provider,
                        reason=error.reason.value,
                        error=str(error),
                        attempts=failed_attempts,
                        retry_in=delay,
                    )
                mono = self._clock.monotonic()
                if self.hold:
                    limit_from = None
                elif limit_from is None:
                    limit_from = mono
                if limit_from is not None and mono - limit_from >= PERSIST_DEADLINE:
                    return None, False
                await anyio.sleep(delay)
                delay = min(delay * 2, PERSIST_RETRY_MAX)
                try:
                    return await save(), True
                except StoreError as exc:
                    error = exc


def authorized_again(stored: TokenSet, now: float) -> bool:
    """Whether :meth:`Grants.add_granted` (called at ``now``) authorized an invalidated set
    again in place rather than inserting a new one: in place keeps the set's created_at, an
    insert has ``now`` (also once refreshed since). Not the version: a set inserted here may
    have been refreshed already."""
    return stored.created_at != now


def _as_stored(new: NewTokenSet, now: float) -> TokenSet:
    """A new set as :meth:`TokenStore.add` stores it: version 1, active, no lease."""
    return TokenSet(
        id=new.id,
        provider=new.provider,
        refresh_token=new.refresh_token,
        access_token=new.access_token,
        expires_at=new.expires_at,
        state=State.ACTIVE,
        version=1,
        next_refresh_at=new.next_refresh_at,
        created_at=now,
        updated_at=now,
        token_type=new.token_type,
        scope=new.scope,
        refresh_expires_at=new.refresh_expires_at,
        refresh_token_usage=new.refresh_token_usage,
        grace_period=new.grace_period,
        refresh_token_lifetime=new.refresh_token_lifetime,
        refresh_token_idle_lifetime=new.refresh_token_idle_lifetime,
        refresh_mode=new.refresh_mode,
    )
