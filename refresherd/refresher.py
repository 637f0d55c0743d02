"""One refresh of one token set, end to end: single-flight, lease, journal, send, persist, decide.

The order of steps is the product's promise (DESIGN.md, "The refresh of one token set"):
claim the row and re-read it under the lease; journal the attempt durably; only then send the
refresh token; persist a grant with compare-and-swap before anything else sees it (metrics,
logs, waiters); on failure let :mod:`refresherd.policy` decide and record that decision.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Final, Protocol

import anyio

from refresherd import policy
from refresherd.config import ProviderConfig, ScheduleConfig
from refresherd.endpoint import EndpointError, TokenEndpoint
from refresherd.logs import get_logger
from refresherd.metrics import Metrics
from refresherd.model import Failure, FailureKind, Grant, RefreshTokenUsage, State, TokenSet
from refresherd.store import ClaimRefused, Store, StoreError

log = get_logger("refresherd.refresher")

# A grant we hold but could not persist is retried at this pace until storage answers.
PERSIST_RETRY_INITIAL: Final = 0.2
PERSIST_RETRY_MAX: Final = 5.0
# How long a received grant is held while the database refuses it, shutdown included.
PERSIST_DEADLINE: Final = 30.0


class Clock(Protocol):
    def wall(self) -> float: ...
    def monotonic(self) -> float: ...


class SystemClock:
    """Wall clock for expiries (they are shared with the IdP), monotonic for durations."""

    def wall(self) -> float:
        return time.time()

    def monotonic(self) -> float:
        return time.monotonic()


@dataclass(frozen=True, slots=True)
class RefreshResult:
    """What became of one refresh request. ``outcome`` is a bounded vocabulary:

    refreshed, adopted, failed, invalidated, circuit_open, leased, not_found, lease_lost,
    storage_error, unknown_provider.
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
    done: anyio.Event = field(default_factory=anyio.Event)
    result: RefreshResult | None = None


class Refresher:
    def __init__(
        self,
        *,
        store: Store,
        providers: Mapping[str, ProviderConfig],
        endpoints: Mapping[str, TokenEndpoint],
        schedule: ScheduleConfig,
        metrics: Metrics,
        owner: str,
        lease_duration: float,
        clock: Clock | None = None,
        rng: random.Random | None = None,
        owner_alive: Callable[[str], bool] | None = None,
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
        self._flights: dict[str, _Flight] = {}
        # Is the process behind a lease owner id still alive? Unknown means alive: never send
        # a token that another live process may be sending.
        self.owner_alive = owner_alive or (lambda owner: True)

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

    async def refresh(self, token_set_id: str, *, scheduled: bool = False) -> RefreshResult:
        """Refresh now, or join the refresh of this token set that is already in flight."""
        flight = self._flights.get(token_set_id)
        if flight is not None:
            self.metrics.singleflight_coalesced.inc()
            await flight.done.wait()
            assert flight.result is not None
            return RefreshResult(
                outcome=flight.result.outcome,
                token_set=flight.result.token_set,
                reason=flight.result.reason,
                detail=flight.result.detail,
                coalesced=True,
            )
        flight = _Flight()
        self._flights[token_set_id] = flight
        self.metrics.in_flight.set(len(self._flights))
        try:
            flight.result = await self._refresh_once(token_set_id, scheduled=scheduled)
            return flight.result
        finally:
            if flight.result is None:
                flight.result = RefreshResult("failed", reason="cancelled", detail="shutdown")
            del self._flights[token_set_id]
            self.metrics.in_flight.set(len(self._flights))
            flight.done.set()

    # ---- one refresh -------------------------------------------------------------------------

    async def _refresh_once(self, token_set_id: str, *, scheduled: bool) -> RefreshResult:
        started = self.clock.monotonic()
        now = self.clock.wall()
        try:
            claimed = await self.store.claim(
                token_set_id, owner=self.owner, now=now, lease_until=now + self.lease_duration
            )
        except StoreError as exc:
            self.metrics.storage_errors.inc()
            log.error("refresh", token_set=token_set_id, outcome="storage_error", error=str(exc))
            return RefreshResult("storage_error", detail=str(exc))
        if isinstance(claimed, ClaimRefused):
            return RefreshResult(
                claimed.reason,
                detail=f"leased by {claimed.owner}" if claimed.reason == "leased" else None,
            )
        ts = claimed
        if scheduled and ts.next_refresh_at <= now:
            self.metrics.refresh_lateness.observe(now - ts.next_refresh_at)
        provider = self.providers.get(ts.provider)
        endpoint = self.endpoints.get(ts.provider)
        if provider is None or endpoint is None:
            return await self._unknown_provider(ts)
        if self._sent_elsewhere(ts, provider):
            # A live process (paused past its lease, say) sent this very token moments ago and
            # has not resolved it. Sending it too would be a second use; look again shortly.
            await self._defer_quietly(ts.id, now + 1.0)
            return RefreshResult("leased", token_set=ts, reason="attempt_in_flight_elsewhere")
        if not self.circuits.admit(ts.provider, now):
            await self._release_quietly(ts.id)
            return RefreshResult("circuit_open", token_set=ts, reason="invalid_client")
        # Admitted while the circuit is open: this refresh is the provider's one probe.
        probe = self.circuits.is_open(ts.provider)

        result: RefreshResult | None = None
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._keep_lease, ts.id)
                try:
                    result = await self._attempts(ts, provider, endpoint)
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

    def _sent_elsewhere(self, ts: TokenSet, provider: ProviderConfig) -> bool:
        attempt = ts.attempt
        if attempt is None or attempt.owner == self.owner or attempt.version != ts.version:
            return False
        # A re-use token is not spent by a send: a second one is harmless.
        if policy.effective_policy(ts, provider).usage is not RefreshTokenUsage.ONE_TIME:
            return False
        # The IdP may have rotated the token already, its answer waiting in that live (paused)
        # process, which stores it when it resumes. Inside the grace window our send would race
        # it; after the window it would be a reuse outside grace, which kills the token set. So
        # the attempt is left to its owner for as long as that lives (tests/test_races.py).
        return self.owner_alive(attempt.owner)

    async def _defer_quietly(self, token_set_id: str, until: float) -> None:
        try:
            await self.store.defer(token_set_id, owner=self.owner, next_refresh_at=until)
        except StoreError:
            self.metrics.storage_errors.inc()

    async def _keep_lease(self, token_set_id: str) -> None:
        """Renew our lease while the refresh runs, so a slow IdP does not cost us the row."""
        while True:
            await anyio.sleep(self.lease_duration / 3)
            try:
                until = self.clock.wall() + self.lease_duration
                await self.store.renew_lease(token_set_id, owner=self.owner, lease_until=until)
            except StoreError as exc:
                self.metrics.storage_errors.inc()
                log.warning("lease renewal failed", token_set=token_set_id, error=str(exc))

    async def _attempts(
        self, ts: TokenSet, provider: ProviderConfig, endpoint: TokenEndpoint
    ) -> RefreshResult:
        # The set's own policy where it has one (an IdP change applies to newer sets only).
        eff = policy.effective_policy(ts, provider)
        grace = policy.effective_grace(eff.usage, eff.grace_period)
        invalid_grant_retried = False
        while True:
            now = self.clock.wall()
            keep_since = now - (grace - policy.grace_safety(grace)) if grace > 0 else float("inf")
            try:
                attempt = await self.store.begin_attempt(
                    ts.id, owner=self.owner, version=ts.version, now=now, keep_since=keep_since
                )
            except StoreError as exc:
                # Nothing was sent: without a journal entry, nothing may be.
                self.metrics.storage_errors.inc()
                self.metrics.refresh_failures.labels(ts.provider, "storage_error").inc()
                await self._release_quietly(ts.id)
                return RefreshResult(
                    "storage_error", token_set=ts, reason="storage_error", detail=str(exc)
                )
            if attempt is None:
                return await self._moved_on(ts)
            timeout = policy.attempt_timeout(
                usage=eff.usage,
                grace_period=grace,
                request_timeout=provider.request_timeout,
                now=now,
                attempt=attempt,
            )
            try:
                grant = await endpoint.refresh(ts.refresh_token, timeout=timeout)
            except EndpointError as exc:
                failure = exc.failure
            else:
                return await self._persist(ts, grant, sends=attempt.sends)

            self.metrics.refresh_failures.labels(ts.provider, failure.reason).inc()
            storm = False
            if failure.kind is FailureKind.INVALID_GRANT:
                sibling = await self._sibling_grant(ts)
                if sibling is not None:
                    return sibling
                storm = policy.invalid_grant_storm(self.circuits.note_invalid_grant(ts.provider))
            if storm:
                # Several different token sets refused in a row, none accepted in between: far
                # more likely our configuration (another app's credentials, a wrong token_url
                # or realm) than that many customers revoking at once. Pause the provider and
                # keep the token sets, instead of invalidating a whole customer base.
                return await self._record(ts, failure, policy.SuspectProvider(), attempt.sends)
            if failure.kind is not FailureKind.CLIENT_REJECTED and self.circuits.close(ts.provider):
                self.metrics.circuit_open.labels(ts.provider).set(0)
                log.info("provider circuit closed", provider=ts.provider)
            decision = policy.decide(
                failure,
                policy.FailureContext(
                    now=self.clock.wall(),
                    usage=eff.usage,
                    grace_period=grace,
                    attempt=attempt,
                    failures=ts.failures,
                    invalid_grant_retried=invalid_grant_retried,
                ),
                self.schedule,
                self.rng.random(),
            )
            if isinstance(decision, policy.RetryNow):
                if decision.grace:
                    self.metrics.grace_retries.labels(ts.provider).inc()
                if failure.kind is FailureKind.INVALID_GRANT:
                    invalid_grant_retried = True
                log.info(
                    "refresh retry",
                    token_set=ts.id,
                    provider=ts.provider,
                    reason=failure.reason,
                    attempt=attempt.sends,
                    delay=round(decision.delay, 3),
                    grace=decision.grace,
                )
                await anyio.sleep(decision.delay)
                continue
            return await self._record(ts, failure, decision, attempt.sends)

    # ---- outcomes ----------------------------------------------------------------------------

    async def _persist(self, ts: TokenSet, grant: Grant, *, sends: int) -> RefreshResult:
        now = self.clock.wall()
        lifetime = (
            grant.expires_in if grant.expires_in is not None else self.schedule.default_expires_in
        )
        expires_at = now + grant.expires_in if grant.expires_in is not None else None
        next_at = policy.plan_next_refresh(
            now=now,
            expires_at=now + lifetime,
            lifetime=lifetime,
            cfg=self.schedule,
            rand=self.rng.random(),
            not_before=now + self.schedule.min_interval,
        )
        # The IdP may omit refresh_token: then the old one stays valid (re-use tokens).
        refresh_token = grant.refresh_token or ts.refresh_token
        saved: TokenSet | None = None
        stored = False
        delay = PERSIST_RETRY_INITIAL
        # We hold the only copy of a rotated token: shutdown waits for it (bounded), and a
        # failing store is retried, loudly, rather than the grant dropped.
        with anyio.CancelScope(shield=True), anyio.move_on_after(PERSIST_DEADLINE):
            while True:
                try:
                    saved = await self.store.save_grant(
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
                            now + grant.refresh_expires_in
                            if grant.refresh_expires_in is not None
                            else None
                        ),
                    )
                    stored = True
                    break
                except StoreError as exc:
                    self.metrics.storage_errors.inc()
                    log.error(
                        "cannot persist grant, retrying",
                        token_set=ts.id,
                        provider=ts.provider,
                        error=str(exc),
                        retry_in=delay,
                    )
                    await anyio.sleep(delay)
                    delay = min(delay * 2, PERSIST_RETRY_MAX)
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
        self.circuits.note_success(ts.provider)
        if self.circuits.close(ts.provider):
            self.metrics.circuit_open.labels(ts.provider).set(0)
            log.info("provider circuit closed", provider=ts.provider)
        return RefreshResult("refreshed", token_set=saved, detail=f"sends={sends}", attempt=sends)

    async def _sibling_grant(self, ts: TokenSet) -> RefreshResult | None:
        """After invalid_grant: did another worker refresh this set meanwhile? Then adopt."""
        try:
            current = await self.store.get(ts.id)
        except StoreError:
            return None
        if current is None:
            return RefreshResult("not_found")
        if current.version != ts.version or current.refresh_token != ts.refresh_token:
            self.metrics.adopted.labels(ts.provider).inc()
            await self._release_quietly(ts.id)
            return RefreshResult("adopted", token_set=current, reason="sibling_won")
        return None

    async def _moved_on(self, ts: TokenSet) -> RefreshResult:
        """begin_attempt refused: the version changed, the set is gone, or our lease is."""
        current = await self.store.get(ts.id)
        if current is None:
            return RefreshResult("not_found")
        if current.version != ts.version:
            self.metrics.adopted.labels(ts.provider).inc()
            await self._release_quietly(ts.id)
            return RefreshResult("adopted", token_set=current, reason="sibling_won")
        if current.state is State.INVALIDATED:
            return RefreshResult("invalidated", token_set=current, reason=current.invalid_reason)
        return RefreshResult("lease_lost", token_set=current, reason="lease_lost")

    async def _record(
        self, ts: TokenSet, failure: Failure, decision: policy.Decision, sends: int
    ) -> RefreshResult:
        now = self.clock.wall()
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
            # provider's. Only the error is noted, and the journal is resolved when this send
            # was the series' only one (a 401 says the IdP processed nothing); then a later
            # send is not mistaken for the retry of a lost answer.
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
                    resolve_attempt=sends <= 1,
                )
            except StoreError:
                self.metrics.storage_errors.inc()
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
        # The journal is cleared only when the IdP's answer settles that this series consumed
        # nothing; an ambiguous send stays on record for the next attempt and for recovery.
        settled = (
            failure.kind
            in (FailureKind.NOT_SENT, FailureKind.RATE_LIMITED, FailureKind.OAUTH_ERROR)
            and sends <= 1
        )
        resolve = settled or state is State.INVALIDATED
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
            self.metrics.storage_errors.inc()
            await self._release_quietly(ts.id)
            return RefreshResult(
                "storage_error", attempt=sends, token_set=ts, reason=failure.reason, detail=str(exc)
            )
        if not recorded:
            return await self._moved_on(ts)
        if state is State.INVALIDATED:
            self.metrics.invalidations.labels(ts.provider, reason).inc()
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
        except StoreError:
            self.metrics.storage_errors.inc()

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
