"""One refresh of one token set, end to end: claim, journal, send, persist, decide, record.

The order of steps is the product's promise (DESIGN.md, "The refresh of one token set"):
claim the row and re-read it under the lease; journal the attempt durably; only then send the
refresh token; persist a grant with compare-and-swap before anything else sees it (metrics,
logs, waiters); on failure let :mod:`refresherd.policy` decide and record that decision.

The :class:`Refresher` composes the steps, each in a module of its own, in the data's order:
:mod:`~refresherd.refresh.flights` (single-flight), :mod:`~refresherd.refresh.leases`,
:mod:`~refresherd.refresh.series` (the sends of one token), :mod:`~refresherd.refresh.grants`
(the grant stored, held while the database refuses it), :mod:`~refresherd.refresh.record`
(what became of it). What it shares with the rest of the daemon is handed to it by the daemon,
which hands the same pieces to the scheduler and the token API: the providers' live set
(:mod:`~refresherd.refresh.providers`), the storage pause (:mod:`~refresherd.refresh.storage`),
the leases and the grants.
"""

from __future__ import annotations

import random
from collections.abc import Awaitable, Callable
from contextlib import AbstractAsyncContextManager, nullcontext

import anyio
import anyio.abc

from refresherd import policy
from refresherd.clock import Clock
from refresherd.idp.endpoint import TokenEndpoint
from refresherd.logs import get_logger
from refresherd.metrics import Metrics
from refresherd.model import Grant, RefreshTokenUsage, TokenSet
from refresherd.refresh.flights import Flights
from refresherd.refresh.grants import Grants
from refresherd.refresh.leases import Leases
from refresherd.refresh.outcome import Outcome, RefreshResult
from refresherd.refresh.providers import Providers
from refresherd.refresh.record import EventSink, Recorder, log_outcome
from refresherd.refresh.series import Series
from refresherd.refresh.storage import StorageWatch
from refresherd.settings import ProviderConfig
from refresherd.store import ClaimRefused, NewTokenSet, StoreError, TokenStore

log = get_logger("refresherd.refresh.refresher")


class Refresher:
    """Refreshes token sets: :meth:`refresh` (joined by every caller of one set), and the
    set held against refreshes (:meth:`exclusive`), work that must outlive its caller
    (:meth:`detach`) and a grant from outside a refresh (:meth:`add_granted`)."""

    def __init__(
        self,
        *,
        store: TokenStore,
        providers: Providers,
        leases: Leases,
        grants: Grants,
        storage: StorageWatch,
        metrics: Metrics,
        events: EventSink | None,
        clock: Clock,
        rng: random.Random | None = None,
    ) -> None:
        self._store = store
        self._owner = leases.owner
        self._providers = providers
        self._leases = leases
        self._grants = grants
        self._storage = storage
        self._metrics = metrics
        self._clock = clock
        self._rng = rng or random.Random()
        self._flights = Flights(metrics=metrics, leases=leases)
        self._record = Recorder(
            store=store,
            owner=leases.owner,
            providers=providers,
            leases=leases,
            storage=storage,
            metrics=metrics,
            events=events,
            clock=clock,
            rng=self._rng,
        )

    async def run(
        self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Own the task group every refresh flies in, and the lease keeper, until
        :meth:`close`.

        Callers of :meth:`refresh` only wait on a flight, so a caller that goes away (an API
        client that disconnects) never cancels a refresh half-way nor fails its waiters.
        After :meth:`close` this returns once the flights in the air have landed; the owner
        bounds that wait by cancelling. Without ``run`` (the CLI's one-off refresh, unit
        tests) a refresh flies in its first caller's task.
        """
        async with anyio.create_task_group() as keeper:
            keeper.start_soon(self._leases.keep_all)
            await self._flights.run(task_status=task_status)
            # Every flight has landed: no lease left to keep.
            keeper.cancel_scope.cancel()

    def close(self) -> None:
        """Take no more refreshes (shutdown); :meth:`run` returns when the last one lands."""
        self._flights.close()

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

        def fly() -> Awaitable[RefreshResult]:
            return self._refresh_once(token_set_id, scheduled=scheduled, claimed=claimed)

        return await self._flights.join(token_set_id, fly, in_this_task=in_this_task)

    def exclusive(self, token_set_id: str) -> AbstractAsyncContextManager[TokenSet | ClaimRefused]:
        """Hold a token set against every refresh while the body runs (Flights.exclusive):
        yields the set as read under our lease, or why it could not be leased."""
        return self._flights.exclusive(token_set_id)

    def detach(self, work: Callable[[], Awaitable[None]], *, name: str) -> bool:
        """Run ``work`` in the flight group, out of its caller's reach (Flights.detach);
        False, starting nothing, once shutdown has begun or when nothing runs :meth:`run`."""
        return self._flights.detach(work, name=name)

    async def add_granted(
        self, new: NewTokenSet, *, now: float, reauthorize: bool = False
    ) -> TokenSet | None:
        """Store a new token set whose grant the IdP has just issued (an exchanged code),
        held and retried as a refresh's grant is (Grants.add_granted); ``reauthorize``: or
        over an invalidated set of that id and provider, in place (a connect link)."""
        return await self._grants.add_granted(new, now=now, reauthorize=reauthorize)

    # ---- one refresh -------------------------------------------------------------------------

    async def _refresh_once(
        self, token_set_id: str, *, scheduled: bool, claimed: TokenSet | ClaimRefused | None
    ) -> RefreshResult:
        started = self._clock.monotonic()
        health = self._storage.health
        if health.paused:
            # The journal could not be written, so nothing could be sent: do not even claim.
            reason = health.reason.value if health.reason else "other"
            return RefreshResult(Outcome.STORAGE_PAUSED, reason=reason, detail=health.detail)
        if claimed is None:
            try:
                claimed = await self._leases.claim(token_set_id)
            except StoreError as exc:
                self._storage.failed(exc, during="claim")
                log.error(
                    "refresh", token_set=token_set_id, outcome="storage_error", error=str(exc)
                )
                return RefreshResult(Outcome.STORAGE_ERROR, detail=str(exc))
        if isinstance(claimed, ClaimRefused):
            return RefreshResult(
                Outcome(claimed.reason),
                detail=f"leased by {claimed.owner}" if claimed.reason == "leased" else None,
            )
        try:
            return await self._refresh_claimed(claimed, scheduled=scheduled, started=started)
        except StoreError as exc:
            # An outcome path's read or write (a sibling's grant, a failure, an invalidation)
            # failed: the same storage pause as any other refused write, never a crash.
            self._storage.failed(exc, during="refresh")
            await self._leases.release_quietly(claimed.id)
            result = RefreshResult(
                Outcome.STORAGE_ERROR, token_set=claimed, reason="storage_error", detail=str(exc)
            )
            log_outcome(claimed, result, self._clock.monotonic() - started)
            return result

    async def _refresh_claimed(
        self, ts: TokenSet, *, scheduled: bool, started: float
    ) -> RefreshResult:
        """The refresh of a set this process has leased and read under the lease."""
        now = self._clock.wall()
        if scheduled and ts.next_refresh_at <= now:
            self._metrics.refresh_lateness.observe(now - ts.next_refresh_at)
        provider = self._providers.config(ts.provider)
        endpoint = self._providers.endpoint(ts.provider)
        if provider is None or endpoint is None:
            return await self._record.unknown_provider(ts)
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
            return RefreshResult(Outcome.LEASED, token_set=ts, reason="attempt_in_flight_elsewhere")
        if scheduled:
            # Keep-alive: planned from the access token at import, or before the provider was
            # switched to keep-alive; only the sliding lifetime decides when to spend the token.
            schedule = self._providers.schedule
            earliest = policy.keep_alive_at(ts, eff, schedule, rand=1.0)
            if earliest is not None and now < earliest:
                planned = policy.keep_alive_at(ts, eff, schedule, rand=self._rng.random())
                assert planned is not None
                await self._defer_quietly(ts.id, planned)
                return RefreshResult(Outcome.DEFERRED, token_set=ts, reason="keep_alive")
        circuits = self._providers.circuits
        if not circuits.admit(ts.provider, now):
            await self._leases.release_quietly(ts.id)
            return RefreshResult(Outcome.CIRCUIT_OPEN, token_set=ts, reason="invalid_client")
        # Admitted while the circuit is open: this refresh is the provider's one probe.
        probe = circuits.is_open(ts.provider)

        result: RefreshResult | None = None
        try:
            async with self._leases.renewed(ts.id):
                # A scheduled refresh's result is read by nobody (a caller that joined it
                # reads the set itself): its grant is stored without reading the row back.
                result = await self._attempts_in_slot(
                    ts, eff, provider, endpoint, read_back=not scheduled
                )
        finally:
            if probe:
                circuits.end_probe(ts.provider)
        assert result is not None
        duration = self._clock.monotonic() - started
        if result.outcome is not Outcome.CIRCUIT_OPEN:
            self._metrics.of_provider(ts.provider).refresh_duration.observe(duration)
        log_outcome(ts, result, duration)
        return result

    async def _sent_elsewhere(self, ts: TokenSet, eff: policy.EffectivePolicy) -> bool:
        attempt = ts.attempt
        if attempt is None or attempt.owner == self._owner or attempt.version != ts.version:
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
        return await self._store.owner_alive(attempt.owner)

    async def _defer_quietly(self, token_set_id: str, until: float) -> None:
        try:
            await self._store.defer(token_set_id, owner=self._owner, next_refresh_at=until)
        except StoreError as exc:
            self._storage.failed(exc, during="defer")

    async def _attempts_in_slot(
        self,
        ts: TokenSet,
        eff: policy.EffectivePolicy,
        provider: ProviderConfig,
        endpoint: TokenEndpoint,
        *,
        read_back: bool,
    ) -> RefreshResult:
        # Before the first send is journalled, so waiting costs no grace time; retries inside
        # the refresh keep this slot (refresherd.throttle).
        throttle = self._providers.throttle(provider)
        async with throttle.slot() if throttle else nullcontext():
            # What the provider's adaptive limit counts as in use (refresherd.concurrency).
            sending = self._providers.sending
            sending[ts.provider] += 1
            try:
                return await self._attempts(ts, eff, provider, endpoint, read_back=read_back)
            finally:
                sending[ts.provider] -= 1

    async def _attempts(
        self,
        ts: TokenSet,
        eff: policy.EffectivePolicy,
        provider: ProviderConfig,
        endpoint: TokenEndpoint,
        *,
        read_back: bool,
    ) -> RefreshResult:
        """One series of sends of the set's refresh token, and what became of it."""
        grace = policy.effective_grace(eff.usage, eff.grace_period)
        times = self._providers.answer_times(ts.provider)
        if policy.window_missed(
            ts.attempt,
            version=ts.version,
            usage=eff.usage,
            grace_period=grace,
            latency=times.hint(),
            now=self._clock.wall(),
        ):
            assert ts.attempt is not None
            return await self._record.missed(ts, ts.attempt)
        series = Series(
            ts,
            eff,
            grace,
            provider,
            endpoint,
            times,
            store=self._store,
            owner=self._owner,
            providers=self._providers,
            leases=self._leases,
            storage=self._storage,
            record=self._record,
            metrics=self._metrics,
            clock=self._clock,
            rng=self._rng,
        )
        try:
            end = await series.run()
        except BaseException:
            # Cancelled (shutdown past its deadline) or failed with a grant in hand: the IdP
            # may have rotated, and this is the only copy. Store it before going.
            with anyio.CancelScope(shield=True):
                await series.close()
                grant = series.grant or series.buffered_grant()
                if grant is not None and series.attempt is not None:
                    await self._persist(ts, eff, grant, sends=series.attempt.sends, read_back=False)
            raise
        # The other sends still out: their answers are not needed (inside the window any grant
        # is good, and the first one is ours). Usually none is out.
        await series.close()
        if isinstance(end, RefreshResult):
            return end
        if isinstance(end, Grant):
            assert series.attempt is not None
            return await self._persist(
                ts, eff, end, sends=series.attempt.sends, read_back=read_back
            )
        failure, decision = end
        assert series.attempt is not None
        if decision == policy.Invalidate(reason=policy.GRACE_WINDOW_MISSED):
            return await self._record.missed(ts, series.attempt, last=failure)
        return await self._record.record(ts, failure, decision, series.attempt)

    async def _persist(
        self,
        ts: TokenSet,
        eff: policy.EffectivePolicy,
        grant: Grant,
        *,
        sends: int,
        read_back: bool,
    ) -> RefreshResult:
        """Store the grant (before anything else sees it), then count the success."""
        result = await self._grants.store_refreshed(
            ts, eff, grant, sends=sends, schedule=self._providers.schedule, read_back=read_back
        )
        if result.outcome is Outcome.REFRESHED:
            await self._record.refreshed(ts)
        return result
