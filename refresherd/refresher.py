"""One refresh of one token set, end to end: single-flight, lease, journal, send, persist, decide.

The order of steps is the product's promise (DESIGN.md, "The refresh of one token set"):
claim the row and re-read it under the lease; journal the attempt durably; only then send the
refresh token; persist a grant with compare-and-swap before anything else sees it (metrics,
logs, waiters); on failure let :mod:`refresherd.policy` decide and record that decision.
"""

from __future__ import annotations

import functools
import math
import random
from collections import defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager, nullcontext
from dataclasses import dataclass
from typing import Final, Protocol

import anyio
import anyio.abc

from refresherd import policy
from refresherd.clock import Clock, SystemClock
from refresherd.endpoint import EndpointError, TokenEndpoint
from refresherd.events import EventQueue
from refresherd.latency import AnswerTimes, HedgeBudget
from refresherd.logs import get_logger
from refresherd.metrics import Metrics
from refresherd.model import (
    Attempt,
    Failure,
    FailureKind,
    Grant,
    RefreshTokenUsage,
    State,
    TokenSet,
    rfc3339,
)
from refresherd.settings import ProviderConfig, ScheduleConfig
from refresherd.storage_health import StorageHealth
from refresherd.store import (
    ClaimRefused,
    NewTokenSet,
    StoreError,
    TokenSetExists,
    TokenStore,
)
from refresherd.throttle import Throttles

log = get_logger("refresherd.refresher")

# A grant we hold but could not persist is retried at this pace until storage answers.
PERSIST_RETRY_INITIAL: Final = 0.2
PERSIST_RETRY_MAX: Final = 5.0
# How long a received grant is held while the database refuses it once nothing else holds it:
# during shutdown, and in processes that do not set ``hold_grants`` (the CLI). A running daemon
# holds it for as long as the database refuses it.
PERSIST_DEADLINE: Final = 30.0
# A held grant's failed persist attempts are logged at most this often.
PERSIST_LOG_INTERVAL: Final = 60.0


class EventSink(Protocol):
    """Where token-set events go (refresherd.events.EventQueue, or refresherd.hooks.Hooks,
    which also wakes its dispatcher); never raises for a lost event."""

    async def enqueue(
        self, event_type: str, token_set_id: str, provider: str, **fields: object
    ) -> str | None: ...


@dataclass(frozen=True, slots=True)
class RefreshResult:
    """What became of one refresh request. ``outcome`` is a bounded vocabulary:

    refreshed, adopted, failed, invalidated, circuit_open, leased, not_found, lease_lost,
    storage_error, storage_paused, unknown_provider.
    """

    outcome: str
    token_set: TokenSet | None = None
    reason: str | None = None
    detail: str | None = None
    coalesced: bool = False
    attempt: int | None = None  # sends of the refresh token in this refresh's attempt series

    @property
    def ok(self) -> bool:
        return self.outcome in ("refreshed", "adopted")


@dataclass(slots=True)
class _Circuit:
    open_until: float = 0.0
    openings: int = 0
    probing: bool = False


class ProviderCircuits:
    """Per-provider pause after the IdP refused our client credentials (invalid_client).

    Open: no refresh of that provider is sent until ``open_until``. Then exactly one refresh
    probes; any answer but another invalid_client closes the circuit.
    """

    def __init__(self) -> None:
        self._circuits: dict[str, _Circuit] = {}
        self._invalid_grant_streak: dict[str, int] = {}

    def note_invalid_grant(self, provider: str) -> int:
        """Count a refused refresh token; returns the provider's streak without a success."""
        streak = self._invalid_grant_streak.get(provider, 0) + 1
        self._invalid_grant_streak[provider] = streak
        return streak

    def note_success(self, provider: str) -> None:
        self._invalid_grant_streak.pop(provider, None)

    def blocked(self, now: float) -> list[str]:
        return [
            name
            for name, c in self._circuits.items()
            if c.openings and (c.probing or now < c.open_until)
        ]

    def admit(self, provider: str, now: float) -> bool:
        c = self._circuits.get(provider)
        if c is None or not c.openings:
            return True
        if c.probing or now < c.open_until:
            return False
        c.probing = True
        return True

    def open(self, provider: str, now: float, cfg: ScheduleConfig, rand: float) -> float:
        c = self._circuits.setdefault(provider, _Circuit())
        c.openings += 1
        c.probing = False
        c.open_until = now + policy.circuit_delay(c.openings, cfg, rand)
        return c.open_until

    def close(self, provider: str) -> bool:
        """Returns True if the circuit was open (a recovery worth logging)."""
        c = self._circuits.pop(provider, None)
        return c is not None and c.openings > 0

    def end_probe(self, provider: str) -> None:
        """The probe ended without the IdP judging our credentials (cancelled, a storage error,
        the set moved on): the next refresh probes instead, rather than the provider staying
        paused until a restart."""
        c = self._circuits.get(provider)
        if c is not None:
            c.probing = False

    def is_open(self, provider: str) -> bool:
        c = self._circuits.get(provider)
        return c is not None and c.openings > 0


@dataclass(slots=True)
class _Flight:
    result: RefreshResult | None = None
    # An exclusive hold (Refresher.exclusive), not a refresh: callers wait for it to end and
    # then look again, rather than take its result.
    hold: bool = False
    landed: bool = False
    # Made by the first caller that waits: most flights (the scheduler's) have none, and an
    # event per refresh was a measurable share of the daemon's CPU.
    _done: anyio.Event | None = None

    async def wait(self) -> None:
        """Until :meth:`land` (at once if it has)."""
        if self.landed:
            return
        if self._done is None:
            self._done = anyio.Event()
        await self._done.wait()

    def land(self) -> None:
        self.landed = True
        if self._done is not None:
            self._done.set()


class Refresher:
    def __init__(
        self,
        *,
        store: TokenStore,
        providers: Mapping[str, ProviderConfig],
        endpoints: Mapping[str, TokenEndpoint],
        schedule: ScheduleConfig,
        metrics: Metrics,
        owner: str,
        lease_duration: float,
        clock: Clock | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.store = store
        self.providers = dict(providers)
        self.endpoints = dict(endpoints)
        self.schedule = schedule
        self.metrics = metrics
        self.owner = owner
        self.lease_duration = lease_duration
        self.clock = clock or SystemClock()
        self.rng = rng or random.Random()
        self.circuits = ProviderCircuits()
        self.throttles = Throttles()
        # Is the database taking writes? While it is not, no refresh starts (storage_health).
        self.storage = StorageHealth()
        # True while a daemon runs: a grant the database refuses is then held until it takes
        # it, not only for PERSIST_DEADLINE. The daemon clears it when it starts to shut down.
        self.hold_grants = False
        self._unpersisted = 0
        # Per provider, made at its first refresh.
        self._answer_times: defaultdict[str, AnswerTimes] = defaultdict(AnswerTimes)
        self._hedge_budgets: defaultdict[str, HedgeBudget] = defaultdict(HedgeBudget)
        self._flights: dict[str, _Flight] = {}
        self._flight_group: anyio.abc.TaskGroup | None = None
        # Refreshes in flight whose lease run()'s keeper renews: id -> when it last was (loop
        # time). Without run() (the CLI, unit tests) each refresh keeps its own lease.
        self._leased: dict[str, float] = {}
        self._keeping_leases = False
        self._closing: anyio.Event | None = None
        # Invalidations and recoveries, queued in the database whatever the process and its
        # [hooks] (refresherd.events); a daemon with [hooks] puts its dispatcher here.
        self.events: EventSink | None = EventQueue(store=store, metrics=metrics, clock=self.clock)
        self._closed = False

    def reconfigure(
        self,
        *,
        providers: Mapping[str, ProviderConfig],
        endpoints: Mapping[str, TokenEndpoint],
        schedule: ScheduleConfig,
        lease_duration: float,
    ) -> None:
        """Take a reloaded config. In-flight refreshes keep what they started with."""
        self.providers = dict(providers)
        self.endpoints = dict(endpoints)
        self.schedule = schedule
        self.lease_duration = lease_duration

    async def run(
        self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Own the task group every refresh flies in, until :meth:`close`.

        Callers of :meth:`refresh` only wait on a flight, so a caller that goes away (an API
        client that disconnects) never cancels a refresh half-way nor fails its waiters.
        After :meth:`close` this returns once the flights in the air have landed; the owner
        bounds that wait by cancelling. Without ``run`` (the CLI's one-off refresh, unit
        tests) a refresh flies in its first caller's task.
        """
        self._closing = closing = anyio.Event()
        async with anyio.create_task_group() as keeper:
            keeper.start_soon(self._keep_leases)
            async with anyio.create_task_group() as tg:
                self._flight_group = tg
                task_status.started()
                await closing.wait()
                self._flight_group = None
            # Every flight has landed: no lease left to keep.
            keeper.cancel_scope.cancel()

    def close(self) -> None:
        """Take no more refreshes (shutdown); :meth:`run` returns when the last one lands."""
        self._closed = True
        if self._closing is not None:
            self._closing.set()

    async def refresh(
        self,
        token_set_id: str,
        *,
        scheduled: bool = False,
        claimed: TokenSet | None = None,
        in_this_task: bool = False,
    ) -> RefreshResult:
        """Refresh now, or join the refresh of this token set that is already in flight.

        ``claimed``: the set as this process has just leased it (TokenStore.claim_due_sets, by the
        scheduler); the refresh starts from it instead of claiming the row again. Its version
        is what the journal and the grant compare on, so a row that moved on meanwhile is
        caught there, as after a claim of our own.

        ``in_this_task``: the caller's task is owned by the same task group as the flights and
        never leaves half-way (the scheduler's): the refresh flies in it, handled exactly as in
        the flight group, rather than in a second task per refresh."""
        while (flight := self._flights.get(token_set_id)) is not None and flight.hold:
            await flight.wait()
        if flight is not None:
            self.metrics.singleflight_coalesced.inc()
            await flight.wait()
            assert flight.result is not None
            return RefreshResult(
                outcome=flight.result.outcome,
                token_set=flight.result.token_set,
                reason=flight.result.reason,
                detail=flight.result.detail,
                coalesced=True,
            )
        if self._closed:
            return RefreshResult("failed", reason="cancelled", detail="shutdown")
        flight = _Flight()
        self._flights[token_set_id] = flight
        self.metrics.in_flight.set(len(self._flights))
        if self._flight_group is None:
            await self._fly(token_set_id, flight, scheduled, claimed, owned=False)
        elif in_this_task:
            await self._fly(token_set_id, flight, scheduled, claimed, owned=True)
        else:
            self._flight_group.start_soon(
                functools.partial(self._fly, token_set_id, flight, scheduled, claimed, owned=True),
                name=f"flight {token_set_id}",
            )
            await flight.wait()
        assert flight.result is not None
        return flight.result

    @asynccontextmanager
    async def exclusive(self, token_set_id: str) -> AsyncIterator[TokenSet | ClaimRefused]:
        """Hold a token set against every refresh while the body runs (revoking and removing
        it, say): wait for a refresh of it in flight here to land, stand in its single-flight
        slot (a refresh asked for meanwhile waits, then finds what the body left), and hold
        its lease (other processes keep out). Yields the set as read under the lease, or why
        it could not be leased. The lease is released at the end unless the set is gone."""
        while (flight := self._flights.get(token_set_id)) is not None:
            await flight.wait()
        mine = _Flight(hold=True)
        self._flights[token_set_id] = mine
        try:
            now = self.clock.wall()
            claimed = await self.store.claim(
                token_set_id, owner=self.owner, now=now, lease_until=now + self.lease_duration
            )
            try:
                yield claimed
            finally:
                if not isinstance(claimed, ClaimRefused):
                    with anyio.CancelScope(shield=True):
                        await self._release_quietly(token_set_id)
        finally:
            del self._flights[token_set_id]
            mine.land()

    async def _fly(
        self,
        token_set_id: str,
        flight: _Flight,
        scheduled: bool,
        claimed: TokenSet | None,
        *,
        owned: bool,
    ) -> None:
        try:
            flight.result = await self._refresh_once(
                token_set_id, scheduled=scheduled, claimed=claimed
            )
        except Exception:
            if not owned:
                raise  # the caller's task: the scheduler logs it and releases the lease
            # In the flight group an escaping error would end every other flight with it.
            log.exception("refresh crashed", token_set=token_set_id)
            await self._release_quietly(token_set_id)
            flight.result = RefreshResult("failed", reason="internal_error")
        finally:
            if flight.result is None:
                flight.result = RefreshResult("failed", reason="cancelled", detail="shutdown")
            del self._flights[token_set_id]
            self.metrics.in_flight.set(len(self._flights))
            flight.land()

    # ---- storage health ----------------------------------------------------------------------

    def storage_failed(self, exc: StoreError, *, during: str) -> None:
        """Count a failed database operation and pause refreshes (logged once per pause).
        ``during`` names the operation, for the log."""
        self.metrics.storage_errors.inc()
        if self.storage.note_failure(exc.reason, str(exc), now=self.clock.monotonic()):
            self.metrics.storage_writable.set(0)
            self.metrics.storage_pauses.labels(exc.reason.value).inc()
            log.error(
                "storage refuses writes: refreshes paused until a probe write succeeds",
                reason=exc.reason.value,
                during=during,
                error=str(exc),
                unpersisted_grants=self._unpersisted,
            )

    def _storage_ok(self, *, via: str) -> None:
        paused_since = self.storage.paused_since
        if self.storage.note_recovered():
            self.metrics.storage_writable.set(1)
            assert paused_since is not None
            log.warning(
                "storage takes writes again: refreshes resume",
                via=via,
                paused_for=round(self.clock.monotonic() - paused_since, 1),
            )

    async def probe_storage(self) -> bool:
        """One harmless write; a success ends the pause. Returns whether storage took it."""
        try:
            await self.store.probe_write(owner=self.owner, now=self.clock.wall())
        except StoreError as exc:
            self.metrics.storage_errors.inc()
            self.metrics.storage_probes.labels("failed").inc()
            self.storage.note_probe_failed(exc.reason, str(exc), now=self.clock.monotonic())
            log.debug("storage probe failed", reason=exc.reason.value, error=str(exc))
            return False
        self.metrics.storage_probes.labels("ok").inc()
        self._storage_ok(via="probe")
        return True

    @property
    def unpersisted_grants(self) -> int:
        return self._unpersisted

    # ---- one refresh -------------------------------------------------------------------------

    async def _refresh_once(
        self, token_set_id: str, *, scheduled: bool, claimed: TokenSet | ClaimRefused | None
    ) -> RefreshResult:
        started = self.clock.monotonic()
        now = self.clock.wall()
        if self.storage.paused:
            # The journal could not be written, so nothing could be sent: do not even claim.
            reason = self.storage.reason.value if self.storage.reason else "other"
            return RefreshResult("storage_paused", reason=reason, detail=self.storage.detail)
        if claimed is None:
            try:
                claimed = await self.store.claim(
                    token_set_id, owner=self.owner, now=now, lease_until=now + self.lease_duration
                )
            except StoreError as exc:
                self.storage_failed(exc, during="claim")
                log.error(
                    "refresh", token_set=token_set_id, outcome="storage_error", error=str(exc)
                )
                return RefreshResult("storage_error", detail=str(exc))
        if isinstance(claimed, ClaimRefused):
            return RefreshResult(
                claimed.reason,
                detail=f"leased by {claimed.owner}" if claimed.reason == "leased" else None,
            )
        try:
            return await self._refresh_claimed(claimed, scheduled=scheduled, started=started)
        except StoreError as exc:
            # An outcome path's read or write (a sibling's grant, a failure, an invalidation)
            # failed: the same storage pause as any other refused write, never a crash.
            self.storage_failed(exc, during="refresh")
            await self._release_quietly(claimed.id)
            result = RefreshResult(
                "storage_error", token_set=claimed, reason="storage_error", detail=str(exc)
            )
            self._log_outcome(claimed, result, self.clock.monotonic() - started)
            return result

    async def _refresh_claimed(
        self, ts: TokenSet, *, scheduled: bool, started: float
    ) -> RefreshResult:
        """The refresh of a set this process has leased and read under the lease."""
        now = self.clock.wall()
        if scheduled and ts.next_refresh_at <= now:
            self.metrics.refresh_lateness.observe(now - ts.next_refresh_at)
        provider = self.providers.get(ts.provider)
        endpoint = self.endpoints.get(ts.provider)
        if provider is None or endpoint is None:
            return await self._unknown_provider(ts)
        # The set's own policy where it has one (an IdP change applies to newer sets only).
        eff = policy.effective_policy(ts, provider)
        if await self._sent_elsewhere(ts, eff):
            # A live process (paused past its lease, say) sent this very token moments ago and
            # has not resolved it. Sending it too would be a second use; look again shortly.
            assert ts.attempt is not None
            log.debug(
                "refresh left to the live process that sent it",
                token_set=ts.id,
                owner=ts.attempt.owner,
            )
            await self._defer_quietly(ts.id, now + 1.0)
            return RefreshResult("leased", token_set=ts, reason="attempt_in_flight_elsewhere")
        if scheduled:
            # Keep-alive: planned from the access token at import, or before the provider was
            # switched to keep-alive; only the sliding lifetime decides when to spend the token.
            earliest = policy.keep_alive_at(ts, eff, self.schedule, rand=1.0)
            if earliest is not None and now < earliest:
                planned = policy.keep_alive_at(ts, eff, self.schedule, rand=self.rng.random())
                assert planned is not None
                await self._defer_quietly(ts.id, planned)
                return RefreshResult("deferred", token_set=ts, reason="keep_alive")
        if not self.circuits.admit(ts.provider, now):
            await self._release_quietly(ts.id)
            return RefreshResult("circuit_open", token_set=ts, reason="invalid_client")
        # Admitted while the circuit is open: this refresh is the provider's one probe.
        probe = self.circuits.is_open(ts.provider)

        result: RefreshResult | None = None
        try:
            if self._keeping_leases:
                # run()'s lease keeper renews it while the refresh is in flight.
                self._leased[ts.id] = anyio.current_time()
                try:
                    result = await self._attempts_in_slot(ts, eff, provider, endpoint)
                finally:
                    del self._leased[ts.id]
            else:
                async with anyio.create_task_group() as tg:
                    tg.start_soon(self._keep_lease, ts.id)
                    try:
                        result = await self._attempts_in_slot(ts, eff, provider, endpoint)
                    finally:
                        tg.cancel_scope.cancel()
        finally:
            if probe:
                self.circuits.end_probe(ts.provider)
        assert result is not None
        duration = self.clock.monotonic() - started
        if result.outcome != "circuit_open":
            self.metrics.refresh_duration.labels(ts.provider).observe(duration)
        self._log_outcome(ts, result, duration)
        return result

    async def _sent_elsewhere(self, ts: TokenSet, eff: policy.EffectivePolicy) -> bool:
        attempt = ts.attempt
        if attempt is None or attempt.owner == self.owner or attempt.version != ts.version:
            return False
        # A re-use token is not spent by a send: a second one is harmless.
        if eff.usage is not RefreshTokenUsage.ONE_TIME:
            return False
        # The IdP may have rotated the token already, its answer waiting in that live (paused)
        # process, which stores it when it resumes. Inside the grace window our send would race
        # it; after the window it would be a reuse outside grace, which kills the token set. So
        # the attempt is left to its owner for as long as that lives (tests/test_races.py).
        # Unknown counts as alive (TokenStore.owner_alive): never send a token that another
        # live process may be sending.
        return await self.store.owner_alive(attempt.owner)

    async def _defer_quietly(self, token_set_id: str, until: float) -> None:
        try:
            await self.store.defer(token_set_id, owner=self.owner, next_refresh_at=until)
        except StoreError as exc:
            self.storage_failed(exc, during="defer")

    async def _attempts_in_slot(
        self,
        ts: TokenSet,
        eff: policy.EffectivePolicy,
        provider: ProviderConfig,
        endpoint: TokenEndpoint,
    ) -> RefreshResult:
        # Before the first send is journalled, so waiting costs no grace time; retries inside
        # the refresh keep this slot (refresherd.throttle).
        throttle = self.throttles.of(provider)
        async with throttle.slot() if throttle else nullcontext():
            return await self._attempts(ts, eff, provider, endpoint)

    async def _keep_lease(self, token_set_id: str) -> None:
        """Renew our lease while the refresh runs, so a slow IdP does not cost us the row."""
        while True:
            await anyio.sleep(self.lease_duration / 3)
            await self._renew_lease(token_set_id)

    async def _keep_leases(self) -> None:
        """In a running daemon: renew the lease of every refresh in flight here once it is a
        third of a lease old (checked every sixth), so a slow IdP does not cost us the row.
        One task for all refreshes rather than a task (and task group) per refresh, which was
        a measurable share of the daemon's CPU per refresh."""
        self._keeping_leases = True
        try:
            while True:
                await anyio.sleep(self.lease_duration / 6)
                now = anyio.current_time()
                due = [i for i, at in self._leased.items() if now - at >= self.lease_duration / 3]
                if due:
                    # Together, so that they ride one group commit.
                    async with anyio.create_task_group() as tg:
                        for token_set_id in due:
                            self._leased[token_set_id] = now
                            tg.start_soon(self._renew_lease, token_set_id)
        finally:
            self._keeping_leases = False

    async def _renew_lease(self, token_set_id: str) -> None:
        try:
            until = self.clock.wall() + self.lease_duration
            await self.store.renew_lease(token_set_id, owner=self.owner, lease_until=until)
        except StoreError as exc:
            self.storage_failed(exc, during="lease renewal")
            log.warning("lease renewal failed", token_set=token_set_id, error=str(exc))

    def hedge_budget(self, provider: str) -> HedgeBudget:
        """The provider's budget of hedged sends (a share of its sends)."""
        return self._hedge_budgets[provider]

    def answer_times(self, provider: str) -> AnswerTimes:
        """The provider's recent answer times (its pace, for planning grace-window sends)."""
        return self._answer_times[provider]

    async def _attempts(
        self,
        ts: TokenSet,
        eff: policy.EffectivePolicy,
        provider: ProviderConfig,
        endpoint: TokenEndpoint,
    ) -> RefreshResult:
        """One series of sends of the set's refresh token, and what became of it."""
        grace = policy.effective_grace(eff.usage, eff.grace_period)
        times = self.answer_times(ts.provider)
        if policy.window_missed(
            ts.attempt,
            version=ts.version,
            usage=eff.usage,
            grace_period=grace,
            latency=times.hint(),
            now=self.clock.wall(),
        ):
            assert ts.attempt is not None
            return await self._missed(ts, ts.attempt)
        series = _Series(self, ts, eff, grace, provider, endpoint, times)
        try:
            async with anyio.create_task_group() as tg:
                end = await series.run(tg)
                # The other sends still out: their answers are not needed (inside the window
                # any grant is good, and the first one is ours).
                tg.cancel_scope.cancel()
        except BaseException:
            # Cancelled (shutdown past its deadline) or failed with a grant in hand: the IdP
            # may have rotated, and this is the only copy. Store it before going.
            grant = series.grant or series.buffered_grant()
            if grant is not None and series.attempt is not None:
                with anyio.CancelScope(shield=True):
                    await self._persist(ts, eff, grant, sends=series.attempt.sends)
            raise
        finally:
            series.close()
        if isinstance(end, RefreshResult):
            return end
        if isinstance(end, Grant):
            assert series.attempt is not None
            return await self._persist(ts, eff, end, sends=series.attempt.sends)
        failure, decision = end
        assert series.attempt is not None
        if decision == policy.Invalidate(reason=policy.GRACE_WINDOW_MISSED):
            return await self._missed(ts, series.attempt, last=failure)
        return await self._record(ts, failure, decision, series.attempt)

    # ---- outcomes ----------------------------------------------------------------------------

    async def _persist(
        self, ts: TokenSet, eff: policy.EffectivePolicy, grant: Grant, *, sends: int
    ) -> RefreshResult:
        now = self.clock.wall()
        lifetime = (
            grant.expires_in if grant.expires_in is not None else self.schedule.default_expires_in
        )
        expires_at = now + grant.expires_in if grant.expires_in is not None else None
        next_at = policy.plan_after_refresh(
            now=now,
            access_expires_at=now + lifetime,
            access_lifetime=lifetime,
            eff=eff,
            cfg=self.schedule,
            rand=self.rng.random(),
        )
        # The IdP may omit refresh_token: then the old one stays valid (re-use tokens).
        refresh_token = grant.refresh_token or ts.refresh_token

        def save() -> Awaitable[TokenSet | None]:
            return self.store.save_grant(
                ts.id,
                owner=self.owner,
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
                saved, stored = await self._persist_retrying(ts, save, failed)
        if stored:
            # The grant went in: storage takes writes (again, if a pause was on).
            self._storage_ok(via="grant")
        if not stored:
            self.metrics.refresh_failures.labels(ts.provider, "storage_error").inc()
            log.critical(
                "grant not persisted: the database refused it for too long; the journal keeps "
                "the attempt, and a retry inside the IdP's grace window may still recover it",
                token_set=ts.id,
                provider=ts.provider,
                waited=PERSIST_DEADLINE,
            )
            return RefreshResult(
                "storage_error", token_set=ts, reason="storage_error", attempt=sends
            )
        if saved is None:
            current = await self.store.get(ts.id)
            if current is None:
                # Removed (`tokens remove`) while our request was out: nothing to keep.
                return RefreshResult("not_found", detail="removed during the refresh")
            # Someone stored a newer version while our request was out (our lease had lapsed).
            # Theirs is the live chain; ours is discarded and counted.
            self.metrics.refresh_failures.labels(ts.provider, "lost_race").inc()
            return RefreshResult(
                "adopted",
                token_set=current,
                reason="lost_race",
                detail="a newer grant was stored concurrently",
            )
        self.metrics.refresh_success.labels(ts.provider).inc()
        if ts.failures and self.events is not None:
            await self.events.enqueue(
                "token_set.recovered",
                ts.id,
                ts.provider,
                failures=ts.failures,
                last_error=ts.last_error,
            )
        self.circuits.note_success(ts.provider)
        if self.circuits.close(ts.provider):
            self.metrics.circuit_open.labels(ts.provider).set(0)
            log.info("provider circuit closed", provider=ts.provider)
        return RefreshResult("refreshed", token_set=saved, detail=f"sends={sends}", attempt=sends)

    async def _persist_retrying(
        self,
        ts: TokenSet,
        save: Callable[[], Awaitable[TokenSet | None]],
        error: StoreError,
    ) -> tuple[TokenSet | None, bool]:
        """The grant could not be stored (``error``): count it as held, and retry with backoff
        until it goes in, or, once nothing holds grants any more (shutdown, or not a daemon),
        for PERSIST_DEADLINE. Returns (what the store returned, whether it was stored)."""
        delay = PERSIST_RETRY_INITIAL
        # Counted from when nothing holds the grant any more (shutdown, or not a daemon).
        limit_from: float | None = None
        failed_attempts = 0
        logged_at = float("-inf")
        self._unpersisted += 1
        self.metrics.unpersisted_grants.set(self._unpersisted)
        try:
            while True:
                self.storage_failed(error, during="persist")
                failed_attempts += 1
                # The first failure, then once a minute: an outage of hours stays readable.
                if self.clock.monotonic() - logged_at >= PERSIST_LOG_INTERVAL:
                    logged_at = self.clock.monotonic()
                    log.error(
                        "cannot persist grant, holding it and retrying",
                        token_set=ts.id,
                        provider=ts.provider,
                        reason=error.reason.value,
                        error=str(error),
                        attempts=failed_attempts,
                        retry_in=delay,
                    )
                mono = self.clock.monotonic()
                if self.hold_grants:
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
        finally:
            self._unpersisted -= 1
            self.metrics.unpersisted_grants.set(self._unpersisted)

    async def _sibling_grant(self, ts: TokenSet) -> RefreshResult | None:
        """After invalid_grant: did another worker refresh this set meanwhile? Then adopt.
        A store that cannot say raises StoreError: invalidating without knowing would be
        worse than trying again later."""
        current = await self.store.get(ts.id)
        if current is None:
            return RefreshResult("not_found")
        if current.version != ts.version or current.refresh_token != ts.refresh_token:
            self.metrics.adopted.labels(ts.provider).inc()
            await self._release_quietly(ts.id)
            return RefreshResult("adopted", token_set=current, reason="sibling_won")
        return None

    async def _moved_on(
        self,
        ts: TokenSet,
        eff: policy.EffectivePolicy | None = None,
        grace: float = 0.0,
        *,
        latency: float | None = None,
    ) -> RefreshResult:
        """begin_attempt refused: the version changed, the set is gone, our lease is, or the
        series' grace window closed with a send that may have been processed."""
        current = await self.store.get(ts.id)
        if current is None:
            return RefreshResult("not_found")
        if (
            eff is not None
            and current.version == ts.version
            and current.state is not State.INVALIDATED
            and policy.window_missed(
                current.attempt,
                version=ts.version,
                usage=eff.usage,
                grace_period=grace,
                latency=latency,
                now=self.clock.wall(),
            )
        ):
            assert current.attempt is not None
            return await self._missed(ts, current.attempt)
        if current.version != ts.version:
            self.metrics.adopted.labels(ts.provider).inc()
            await self._release_quietly(ts.id)
            return RefreshResult("adopted", token_set=current, reason="sibling_won")
        if current.state is State.INVALIDATED:
            return RefreshResult("invalidated", token_set=current, reason=current.invalid_reason)
        return RefreshResult("lease_lost", token_set=current, reason="lease_lost")

    async def _missed(
        self, ts: TokenSet, attempt: Attempt, *, last: Failure | None = None
    ) -> RefreshResult:
        """The series' grace window closed without a stored grant while a send of it may have
        been processed. The token is not sent again (docs/reliability.md, "A missed window"):
        the set is invalidated as refresherd's loss, not as the customer's revocation."""
        detail = (
            f"the grace window of a series begun {rfc3339(attempt.started_at)} closed without "
            f"a stored grant after {attempt.sends} send(s), {attempt.unsettled} of which the "
            "IdP may have processed; the token is not sent again"
        )
        if last is not None:
            detail += f" (last answer: {last.reason}: {last.detail})"
        failure = Failure(FailureKind.AMBIGUOUS, policy.GRACE_WINDOW_MISSED, detail)
        return await self._record(
            ts, failure, policy.Invalidate(reason=policy.GRACE_WINDOW_MISSED), attempt
        )

    async def _record(
        self,
        ts: TokenSet,
        failure: Failure,
        decision: policy.Decision,
        attempt: Attempt | None,
    ) -> RefreshResult:
        now = self.clock.wall()
        sends = attempt.sends if attempt is not None else 0
        # The journal is cleared only when no send of the series may have been processed (or
        # the set is given up); a series with an unsettled send stays on record for the next
        # refresh and for crash recovery, which continue it inside its window or name it
        # missed after.
        consumed_nothing = attempt is None or attempt.unsettled == 0
        error = f"{failure.reason}: {failure.detail}"
        if isinstance(decision, policy.OpenCircuit):
            until = self.circuits.open(ts.provider, now, self.schedule, self.rng.random())
            self.metrics.circuit_open.labels(ts.provider).set(1)
            log.error(
                "provider circuit open: the IdP refused our client credentials",
                provider=ts.provider,
                reason=failure.reason,
                detail=failure.detail,
                paused_for=round(until - now, 1),
            )
            # The token set keeps its state, tokens, plan and failure count: the problem is the
            # provider's. Only the error is noted.
            try:
                await self.store.record_failure(
                    ts.id,
                    owner=self.owner,
                    expected_version=ts.version,
                    state=ts.state,
                    next_refresh_at=ts.next_refresh_at,
                    error=error,
                    failures=ts.failures,
                    invalid_reason=ts.invalid_reason,
                    now=now,
                    resolve_attempt=consumed_nothing,
                )
            except StoreError as exc:
                self.storage_failed(exc, during="record failure")
                await self._release_quietly(ts.id)
            return RefreshResult(
                "circuit_open",
                attempt=sends,
                token_set=ts,
                reason=failure.reason,
                detail=failure.detail,
            )
        if isinstance(decision, policy.SuspectProvider):
            until = self.circuits.open(ts.provider, now, self.schedule, self.rng.random())
            self.metrics.circuit_open.labels(ts.provider).set(1)
            log.error(
                "provider circuit open: several token sets in a row were refused with "
                "invalid_grant; check the provider's client_id, secret and token_url. "
                "Token sets are kept (failing), not invalidated",
                provider=ts.provider,
                paused_for=round(until - now, 1),
            )
            state, next_at, reason = State.FAILING, until, None
        elif isinstance(decision, policy.Invalidate):
            state, next_at, reason = State.INVALIDATED, now, decision.reason
        else:
            assert isinstance(decision, policy.Backoff)
            state, next_at, reason = State.FAILING, decision.at, None
        resolve = consumed_nothing or state is State.INVALIDATED
        try:
            recorded = await self.store.record_failure(
                ts.id,
                owner=self.owner,
                expected_version=ts.version,
                state=state,
                next_refresh_at=next_at,
                error=error,
                failures=ts.failures + 1,
                invalid_reason=reason,
                now=now,
                resolve_attempt=resolve,
            )
        except StoreError as exc:
            self.storage_failed(exc, during="record failure")
            await self._release_quietly(ts.id)
            return RefreshResult(
                "storage_error", attempt=sends, token_set=ts, reason=failure.reason, detail=str(exc)
            )
        if not recorded:
            return await self._moved_on(ts)
        if state is State.INVALIDATED:
            self.metrics.invalidations.labels(ts.provider, reason).inc()
            if reason == policy.GRACE_WINDOW_MISSED and attempt is not None:
                # Once, by the process that recorded it (not by one whose lease had gone).
                log.error(
                    "grace window missed",
                    token_set=ts.id,
                    provider=ts.provider,
                    series_started_at=rfc3339(attempt.started_at),
                    sends=attempt.sends,
                    unsettled=attempt.unsettled,
                )
            if self.events is not None:
                series: dict[str, object] = {}
                if reason == policy.GRACE_WINDOW_MISSED and attempt is not None:
                    series = {
                        "series_started_at": rfc3339(attempt.started_at),
                        "sends": attempt.sends,
                    }
                await self.events.enqueue(
                    "token_set.invalidated",
                    ts.id,
                    ts.provider,
                    reason=reason,
                    detail=failure.detail,
                    **series,
                )
            return RefreshResult(
                "invalidated", token_set=ts, reason=reason, detail=failure.detail, attempt=sends
            )
        return RefreshResult(
            "failed", token_set=ts, reason=failure.reason, detail=failure.detail, attempt=sends
        )

    async def _unknown_provider(self, ts: TokenSet) -> RefreshResult:
        # A config change dropped the provider: keep the set, look again much later.
        now = self.clock.wall()
        await self.store.record_failure(
            ts.id,
            owner=self.owner,
            expected_version=ts.version,
            state=ts.state,
            next_refresh_at=now + self.schedule.backoff_max,
            error=f"unknown_provider: provider {ts.provider!r} is not in the configuration",
            failures=ts.failures,
            invalid_reason=None,
            now=now,
            resolve_attempt=False,
        )
        self.metrics.refresh_failures.labels(ts.provider, "unknown_provider").inc()
        result = RefreshResult("unknown_provider", token_set=ts, reason="unknown_provider")
        self._log_outcome(ts, result, 0.0)
        return result

    async def _release_quietly(self, token_set_id: str) -> None:
        try:
            await self.store.release(token_set_id, owner=self.owner)
        except StoreError as exc:
            self.storage_failed(exc, during="release")

    def _log_outcome(self, ts: TokenSet, result: RefreshResult, duration: float) -> None:
        fields = {
            "token_set": ts.id,
            "provider": ts.provider,
            "outcome": result.outcome,
            "duration": round(duration, 4),
        }
        if result.attempt is not None:
            fields["attempt"] = result.attempt
        if result.reason:
            fields["reason"] = result.reason
        if result.detail:
            fields["detail"] = result.detail
        if result.outcome in ("refreshed", "adopted"):
            log.info("refresh", **fields)
        elif result.outcome == "invalidated":
            log.error("refresh", **fields)
        else:
            log.warning("refresh", **fields)

    # ---- grants from outside a refresh (the token API's code exchange) -----------------------

    def detach(self, work: Callable[[], Awaitable[None]], *, name: str) -> bool:
        """Run ``work`` in the flight group, where no caller can cancel it (an API client that
        disconnects does not end it) and shutdown waits for it as for a refresh. Returns False,
        starting nothing, when there is no flight group: shutdown has begun, or nothing runs
        :meth:`run`. An error escaping ``work`` is logged here rather than ending every flight.
        """
        group = self._flight_group
        if group is None or self._closed:
            return False

        async def guarded() -> None:
            try:
                await work()
            except Exception:
                log.exception("background task failed", task=name)

        group.start_soon(guarded, name=name)
        return True

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
                    await self.store.add(new, now=now)
                except TokenSetExists:
                    current = await self.store.get(new.id)
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
                    again = await self.store.reauthorize(
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
            # Shielded as in _persist: a cancelled caller must not drop the only copy.
            with anyio.CancelScope(shield=True):
                saved, stored = await self._persist_retrying(mine, save, failed)
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
        self._storage_ok(via="grant")
        return saved


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


@dataclass(slots=True)
class _Answer:
    """What one send brought back. ``attempt``: the journal entry the send went out under."""

    attempt: Attempt
    grant: Grant | None
    failure: Failure | None
    duration: float  # monotonic seconds from send to answer (or to giving up)


_SeriesEnd = RefreshResult | Grant | tuple[Failure, policy.Decision]


class _Series:
    """The sends of one refresh token inside one refresh: journal each, send, read answers.

    For a one-time token the grace window is spent by time (policy): a send unanswered for
    ``hedge_after`` gets a hedge beside it, kept open rather than abandoned (a rotated answer
    may still come); fast failures are spaced by ``series_spacing``; a final decision waits
    until no send is out, since any of them may still bring the grant.

    Time: the policy plans in *series time*, the wall clock at the series' start in this
    process carried on by the monotonic clock, so that a wall-clock step while the series runs
    neither stretches a wait past the window nor ends it early. The journal in the database
    keeps to the wall clock (it is shared), and a send goes out only if both say the window is
    open.
    """

    def __init__(
        self,
        refresher: Refresher,
        ts: TokenSet,
        eff: policy.EffectivePolicy,
        grace: float,
        provider: ProviderConfig,
        endpoint: TokenEndpoint,
        times: AnswerTimes,
    ) -> None:
        self.r = refresher
        self.ts = ts
        self.eff = eff
        self.grace = grace
        self.provider = provider
        self.endpoint = endpoint
        self.times = times
        # The pace the window is planned with, fixed for the series: the margin (and so the
        # window's end) must not move between a plan and the journal's check of it.
        self.latency = times.hint()
        self.hedges = refresher.hedge_budget(ts.provider)
        self.attempt: Attempt | None = None
        self.in_flight = 0
        self.invalid_grant_retried = False
        self.last_failure: Failure | None = None
        # The first grant received, until the series ends (persisted by the caller).
        self.grant: Grant | None = None
        self._anchor = (refresher.clock.wall(), refresher.clock.monotonic())
        send, receive = anyio.create_memory_object_stream[_Answer](math.inf)
        self._answers_in = send
        self._answers = receive

    def now(self) -> float:
        """Series time: see the class docstring."""
        wall, mono = self._anchor
        return wall + (self.r.clock.monotonic() - mono)

    def close(self) -> None:
        self._answers_in.close()
        self._answers.close()

    def buffered_grant(self) -> Grant | None:
        """A grant that arrived but was not read yet (the series was cancelled)."""
        while True:
            try:
                answer = self._answers.receive_nowait()
            except (anyio.WouldBlock, anyio.EndOfStream, anyio.ClosedResourceError):
                return None
            if answer.grant is not None:
                return answer.grant

    def _last_send_at(self) -> float | None:
        """Series time by which a send that relies on the window must start (None: no window
        runs: a re-use token, or nothing journaled yet)."""
        if self.grace <= 0 or self.attempt is None:
            return None
        closes = policy.window_closes_at(self.attempt.started_at, self.grace, self.latency)
        return closes - policy.LAST_SEND_LEAD

    async def run(self, tg: anyio.abc.TaskGroup) -> _SeriesEnd:
        r, ts = self.r, self.ts
        # Two clocks for the next send (series time): a retry the policy planned after a
        # failed answer, and a hedge beside the sends still out (void once none is out).
        retry_at: float | None = self.now()
        hedge_at: float | None = None
        # Why no more sends may start; returned once none is out.
        stopped: RefreshResult | None = None
        refused = False
        pending: tuple[Failure, policy.Decision] | None = None
        while True:
            now = self.now()
            planned = [t for t in (retry_at, hedge_at if self.in_flight else None) if t is not None]
            next_send_at = min(planned) if planned else None
            may_send = (
                stopped is None
                and not refused
                and next_send_at is not None
                and self.in_flight < policy.MAX_SENDS_IN_FLIGHT
            )
            if may_send and next_send_at is not None and now >= next_send_at:
                hedge = self.in_flight > 0 and (retry_at is None or retry_at > now)
                retry_at = hedge_at = None
                last = self._last_send_at()
                if (
                    last is not None
                    and self.attempt is not None
                    and self.attempt.unsettled > 0
                    and now > last + policy.LAST_SEND_LEAD
                ):
                    # The window is over by this process's monotonic clock, whatever the
                    # wall clock (stepped back) and so the journal would say. (A send planned
                    # for the last send time itself, reached a moment late, still goes.)
                    if self.last_failure is not None:
                        pending = (
                            self.last_failure,
                            policy.Invalidate(reason=policy.GRACE_WINDOW_MISSED),
                        )
                    continue
                if hedge and not self.hedges.take():
                    # The provider's hedge budget is spent (a stalled IdP is not flooded):
                    # wait for the sends out.
                    continue
                journaled = await self._journal()
                if hedge and not isinstance(journaled, Attempt):
                    self.hedges.give_back()
                if journaled is None:
                    # The set moved on, our lease went, or the window closed: no more sends.
                    # What that means is read once no send is out (one may bring a grant).
                    refused = True
                elif isinstance(journaled, RefreshResult):
                    stopped = journaled
                else:
                    self.attempt = journaled
                    if hedge:
                        # A hedge: the sends out are late; they stay open beside this one.
                        r.metrics.grace_retries.labels(ts.provider).inc()
                        log.info(
                            "refresh hedge",
                            token_set=ts.id,
                            provider=ts.provider,
                            attempt=journaled.sends,
                            in_flight=self.in_flight,
                        )
                    else:
                        self.hedges.note_send()
                    self.in_flight += 1
                    tg.start_soon(self._send, journaled, self._leave_by(now))
                    hedge_at = self._hedge_at(now)
                continue
            if self.in_flight == 0:
                if stopped is not None:
                    await r._release_quietly(ts.id)
                    return stopped
                if refused:
                    return await self._refused()
                if pending is not None:
                    return pending
                if retry_at is None:  # pragma: no cover - every path plans or ends
                    raise AssertionError("a series with nothing out and nothing planned")
                await anyio.sleep(max(retry_at - now, 0.0))
                continue
            wait = (
                max(next_send_at - now, 0.0) if may_send and next_send_at is not None else math.inf
            )
            # Only the wait for an answer is bounded: what is done with one is never cut short.
            answer: _Answer | None = None
            with anyio.move_on_after(wait):
                answer = await self._answers.receive()
            if answer is None:
                continue
            self.in_flight -= 1
            end = await self._on_answer(answer)
            if isinstance(end, policy.SendAgain):
                retry_at = end.at if retry_at is None else min(retry_at, end.at)
                pending = None
            elif isinstance(end, tuple):
                # Final, unless a send still out brings the grant or reopens the question.
                pending, retry_at, hedge_at = end, None, None
            elif isinstance(end, RefreshResult) and self.in_flight:
                # Decided (a sibling's grant adopted, storage refused a read) while sends are
                # out: no more sends; the ones out may still bring a grant worth storing.
                stopped, retry_at, hedge_at = end, None, None
            else:
                return end

    async def _refused(self) -> RefreshResult:
        r, ts = self.r, self.ts
        try:
            return await r._moved_on(ts, self.eff, self.grace, latency=self.latency)
        except StoreError as exc:
            r.storage_failed(exc, during="journal")
            await r._release_quietly(ts.id)
            return RefreshResult(
                "storage_error", token_set=ts, reason="storage_error", detail=str(exc)
            )

    def _leave_by(self, now: float) -> float | None:
        """Seconds within which this send must leave (get a connection and be written), or
        never: a send of a one-time token that waits for a pooled connection past the window
        would arrive as a reuse. None for a token with no window."""
        last = self._last_send_at()
        if last is None:
            return None
        return max(last + policy.LAST_SEND_LEAD - now, 0.0)

    def _hedge_at(self, now: float) -> float | None:
        """When to send beside the sends now out if none has answered by then: only for a
        one-time token (a re-use token is never spent by a send), only with budget left, and
        never after the window closes (the last one planned to start before it does)."""
        attempt = self.attempt
        last = self._last_send_at()
        if last is None or attempt is None:
            return None
        if attempt.unsettled >= policy.MAX_UNSETTLED_SENDS or now >= last:
            return None
        # Each further hedge waits twice as long: a stalled IdP is raced, not flooded.
        wait = policy.hedge_after(self.grace, self.latency) * 2.0 ** max(self.in_flight - 1, 0)
        return min(now + wait, last)

    async def _journal(self) -> Attempt | RefreshResult | None:
        """Commit the send to the journal before it leaves; None if the store refused it."""
        r, ts = self.r, self.ts
        # The journal keeps to the wall clock: it is shared with every process.
        now = r.clock.wall()
        keep_since = policy.keep_series_since(now, self.grace, self.latency)
        try:
            return await r.store.begin_attempt(
                ts.id, owner=r.owner, version=ts.version, now=now, keep_since=keep_since
            )
        except StoreError as exc:
            # Nothing was sent: without a journal entry, nothing may be.
            r.storage_failed(exc, during="journal")
            r.metrics.refresh_failures.labels(ts.provider, "storage_error").inc()
            return RefreshResult(
                "storage_error", token_set=ts, reason="storage_error", detail=str(exc)
            )

    async def _send(self, attempt: Attempt, leave_by: float | None) -> None:
        started = self.r.clock.monotonic()
        grant: Grant | None = None
        failure: Failure | None = None
        try:
            grant = await self.endpoint.refresh(
                self.ts.refresh_token, timeout=self.provider.request_timeout, leave_by=leave_by
            )
        except EndpointError as exc:
            failure = exc.failure
        except Exception as exc:
            # Not a failure the endpoint knows (a bug, an endpoint retired by a reload): the
            # request may have left. An answer like any other, so the other sends live on.
            log.exception("token request failed unexpectedly", token_set=self.ts.id)
            failure = Failure(
                FailureKind.AMBIGUOUS, "internal_error", f"unexpected {type(exc).__name__}"
            )
        duration = self.r.clock.monotonic() - started
        self._answers_in.send_nowait(_Answer(attempt, grant, failure, duration))

    async def _on_answer(
        self, answer: _Answer
    ) -> RefreshResult | Grant | policy.SendAgain | tuple[Failure, policy.Decision]:
        r, ts = self.r, self.ts
        failure = answer.failure
        if answer.grant is not None or (failure is not None and failure.status is not None):
            self.times.observe(answer.duration)
        if answer.grant is not None:
            self.grant = answer.grant
            return answer.grant
        assert failure is not None and self.attempt is not None
        self.last_failure = failure
        r.metrics.refresh_failures.labels(ts.provider, failure.reason).inc()
        if failure.kind is not FailureKind.AMBIGUOUS:
            # The answer proves the IdP did not rotate on this send: note it in the journal,
            # so that neither a later window check nor a crash recovery counts it as a use.
            await self._settle(answer.attempt)
        maybe_consumed = self.grace > 0 and self.attempt.unsettled > 0
        storm = False
        if failure.kind is FailureKind.INVALID_GRANT:
            try:
                sibling = await r._sibling_grant(ts)
            except StoreError as exc:
                # Whether another worker stored a grant cannot be read: invalidating without
                # knowing would be worse than trying again later.
                r.storage_failed(exc, during="read after invalid_grant")
                return RefreshResult(
                    "storage_error", token_set=ts, reason="storage_error", detail=str(exc)
                )
            if sibling is not None:
                return sibling
            if not maybe_consumed:
                storm = policy.invalid_grant_storm(r.circuits.note_invalid_grant(ts.provider))
        if storm:
            # Several different token sets refused in a row, none accepted in between: far
            # more likely our configuration (another app's credentials, a wrong token_url or
            # realm) than that many customers revoking at once. Pause the provider and keep
            # the token sets, instead of invalidating a whole customer base.
            return failure, policy.SuspectProvider()
        if failure.kind is not FailureKind.CLIENT_REJECTED and r.circuits.close(ts.provider):
            r.metrics.circuit_open.labels(ts.provider).set(0)
            log.info("provider circuit closed", provider=ts.provider)
        decision = policy.decide(
            failure,
            policy.FailureContext(
                now=self.now(),
                usage=self.eff.usage,
                grace_period=self.grace,
                attempt=self.attempt,
                failures=ts.failures,
                invalid_grant_retried=self.invalid_grant_retried,
                latency=self.latency,
            ),
            r.schedule,
            r.rng.random(),
        )
        if not isinstance(decision, policy.SendAgain):
            return failure, decision
        if decision.grace:
            r.metrics.grace_retries.labels(ts.provider).inc()
        if failure.kind is FailureKind.INVALID_GRANT:
            self.invalid_grant_retried = True
        log.info(
            "refresh retry",
            token_set=ts.id,
            provider=ts.provider,
            reason=failure.reason,
            detail=failure.detail,
            attempt=self.attempt.sends,
            in_flight=self.in_flight,
            delay=round(max(decision.at - self.now(), 0.0), 3),
            grace=decision.grace,
        )
        return decision

    async def _settle(self, sent_under: Attempt) -> None:
        r, ts = self.r, self.ts
        try:
            await r.store.settle_send(
                ts.id, version=sent_under.version, started_at=sent_under.started_at
            )
        except StoreError as exc:
            # Left unsettled: the safe side (the send counts as a possible use).
            r.storage_failed(exc, during="journal")
            return
        attempt = self.attempt
        if attempt is not None and attempt.started_at == sent_under.started_at:
            self.attempt = Attempt(
                version=attempt.version,
                started_at=attempt.started_at,
                owner=attempt.owner,
                sends=attempt.sends,
                settled=min(attempt.settled + 1, attempt.sends),
            )
