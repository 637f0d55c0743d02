"""What becomes of a refresh, recorded: in the database (a failure, an invalidation, a circuit
opened), in the metrics, in the log (one ``refresh`` line per refresh) and as events
(``token_set.invalidated``, ``token_set.recovered``).

The decisions are :mod:`refresherd.policy`'s; here they are carried out, only while we hold the
lease (``record_failure`` compares the version and the owner). A set that moved on meanwhile
(another worker's grant, a removal, a lost lease) is read back and adopted or reported as it is.
"""

from __future__ import annotations

import random
from typing import Protocol

from refresherd import policy
from refresherd.clock import Clock
from refresherd.connect import reconnect_hint
from refresherd.logs import get_logger
from refresherd.metrics import Metrics
from refresherd.model import Attempt, Failure, FailureKind, State, TokenSet, rfc3339
from refresherd.refresh.leases import Leases
from refresherd.refresh.outcome import Outcome, RefreshResult
from refresherd.refresh.providers import Providers
from refresherd.refresh.storage import StorageWatch
from refresherd.store import StoreError, TokenStore

log = get_logger("refresherd.refresh.record")


class EventSink(Protocol):
    """Where token-set events go (refresherd.events.EventQueue, whose ``on_queued`` wakes a
    hook dispatcher in this process); never raises for a lost event."""

    async def enqueue(
        self, event_type: str, token_set_id: str, provider: str, **fields: object
    ) -> str | None: ...


class Recorder:
    """Records the outcomes of one process's refreshes; see the module docstring."""

    def __init__(
        self,
        *,
        store: TokenStore,
        owner: str,
        providers: Providers,
        leases: Leases,
        storage: StorageWatch,
        metrics: Metrics,
        events: EventSink | None,
        clock: Clock,
        rng: random.Random,
    ) -> None:
        self._store = store
        self._owner = owner
        self._providers = providers
        self._leases = leases
        self._storage = storage
        self._metrics = metrics
        self._events = events
        self._clock = clock
        self._rng = rng

    async def refreshed(self, ts: TokenSet) -> None:
        """A grant of ``ts`` (as it was before) is stored: count it; a set that was failing
        has recovered, and so has its provider."""
        circuits = self._providers.circuits
        self._metrics.of_provider(ts.provider).refresh_success.inc()
        if ts.failures and self._events is not None:
            await self._events.enqueue(
                "token_set.recovered",
                ts.id,
                ts.provider,
                failures=ts.failures,
                last_error=ts.last_error,
            )
        circuits.note_success(ts.provider)
        if circuits.close(ts.provider):
            self._metrics.circuit_open.labels(ts.provider).set(0)
            log.info("provider circuit closed", provider=ts.provider)

    async def sibling_grant(self, ts: TokenSet) -> RefreshResult | None:
        """After invalid_grant: did another worker refresh this set meanwhile? Then adopt.
        A store that cannot say raises StoreError: invalidating without knowing would be
        worse than trying again later."""
        current = await self._store.get(ts.id)
        if current is None:
            return RefreshResult(Outcome.NOT_FOUND)
        if current.version != ts.version or current.refresh_token != ts.refresh_token:
            self._metrics.adopted.labels(ts.provider).inc()
            await self._leases.release_quietly(ts.id)
            return RefreshResult(Outcome.ADOPTED, token_set=current, reason="sibling_won")
        return None

    async def moved_on(
        self,
        ts: TokenSet,
        eff: policy.EffectivePolicy | None = None,
        grace: float = 0.0,
        *,
        latency: float | None = None,
    ) -> RefreshResult:
        """begin_attempt refused: the version changed, the set is gone, our lease is, or the
        series' grace window closed with a send that may have been processed."""
        current = await self._store.get(ts.id)
        if current is None:
            return RefreshResult(Outcome.NOT_FOUND)
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
                now=self._clock.wall(),
            )
        ):
            assert current.attempt is not None
            return await self.missed(ts, current.attempt)
        if current.version != ts.version:
            self._metrics.adopted.labels(ts.provider).inc()
            await self._leases.release_quietly(ts.id)
            return RefreshResult(Outcome.ADOPTED, token_set=current, reason="sibling_won")
        if current.state is State.INVALIDATED:
            return RefreshResult(
                Outcome.INVALIDATED, token_set=current, reason=current.invalid_reason
            )
        return RefreshResult(Outcome.LEASE_LOST, token_set=current, reason="lease_lost")

    async def missed(
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
        return await self.record(
            ts, failure, policy.Invalidate(reason=policy.GRACE_WINDOW_MISSED), attempt
        )

    async def record(
        self,
        ts: TokenSet,
        failure: Failure,
        decision: policy.Decision,
        attempt: Attempt | None,
    ) -> RefreshResult:
        """Carry out the policy's final ``decision`` on a refresh that ended with ``failure``:
        the circuit opened, or the set failing (backed off) or invalidated."""
        now = self._clock.wall()
        sends = attempt.sends if attempt is not None else 0
        # The journal is cleared only when no send of the series may have been processed (or
        # the set is given up); a series with an unsettled send stays on record for the next
        # refresh and for crash recovery, which continue it inside its window or name it
        # missed after.
        consumed_nothing = attempt is None or attempt.unsettled == 0
        error = f"{failure.reason}: {failure.detail}"
        if isinstance(decision, policy.OpenCircuit):
            until = self._providers.circuits.open(
                ts.provider, now, self._providers.schedule, self._rng.random()
            )
            self._metrics.circuit_open.labels(ts.provider).set(1)
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
                await self._store.record_failure(
                    ts.id,
                    owner=self._owner,
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
                self._storage.failed(exc, during="record failure")
                await self._leases.release_quietly(ts.id)
            return RefreshResult(
                Outcome.CIRCUIT_OPEN,
                attempt=sends,
                token_set=ts,
                reason=failure.reason,
                detail=failure.detail,
            )
        if isinstance(decision, policy.SuspectProvider):
            until = self._providers.circuits.open(
                ts.provider, now, self._providers.schedule, self._rng.random()
            )
            self._metrics.circuit_open.labels(ts.provider).set(1)
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
            recorded = await self._store.record_failure(
                ts.id,
                owner=self._owner,
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
            self._storage.failed(exc, during="record failure")
            await self._leases.release_quietly(ts.id)
            return RefreshResult(
                Outcome.STORAGE_ERROR,
                attempt=sends,
                token_set=ts,
                reason=failure.reason,
                detail=str(exc),
            )
        if not recorded:
            return await self.moved_on(ts)
        if state is State.INVALIDATED:
            self._metrics.invalidations.labels(ts.provider, reason).inc()
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
            if self._events is not None:
                series: dict[str, object] = {}
                if reason == policy.GRACE_WINDOW_MISSED and attempt is not None:
                    series = {
                        "series_started_at": rfc3339(attempt.started_at),
                        "sends": attempt.sends,
                    }
                # The way back, where the provider is set up for connecting customers.
                hint = reconnect_hint(ts.id, self._providers.config(ts.provider))
                await self._events.enqueue(
                    "token_set.invalidated",
                    ts.id,
                    ts.provider,
                    reason=reason,
                    detail=failure.detail,
                    **series,
                    **({"reconnect": hint} if hint else {}),
                )
            return RefreshResult(
                Outcome.INVALIDATED,
                token_set=ts,
                reason=reason,
                detail=failure.detail,
                attempt=sends,
            )
        return RefreshResult(
            Outcome.FAILED,
            token_set=ts,
            reason=failure.reason,
            detail=failure.detail,
            attempt=sends,
        )

    async def unknown_provider(self, ts: TokenSet) -> RefreshResult:
        # A config change dropped the provider: keep the set, look again much later.
        now = self._clock.wall()
        await self._store.record_failure(
            ts.id,
            owner=self._owner,
            expected_version=ts.version,
            state=ts.state,
            next_refresh_at=now + self._providers.schedule.backoff_max,
            error=f"unknown_provider: provider {ts.provider!r} is not in the configuration",
            failures=ts.failures,
            invalid_reason=None,
            now=now,
            resolve_attempt=False,
        )
        self._metrics.refresh_failures.labels(ts.provider, "unknown_provider").inc()
        result = RefreshResult(Outcome.UNKNOWN_PROVIDER, token_set=ts, reason="unknown_provider")
        log_outcome(ts, result, 0.0)
        return result


def log_outcome(ts: TokenSet, result: RefreshResult, duration: float) -> None:
    fields = {
        "token_set": ts.id,
        "provider": ts.provider,
        "outcome": result.outcome.value,
        "duration": round(duration, 4),
    }
    if result.attempt is not None:
        fields["attempt"] = result.attempt
    if result.reason:
        fields["reason"] = result.reason
    if result.detail:
        fields["detail"] = result.detail
    if result.ok:
        log.info("refresh", **fields)
    elif result.outcome is Outcome.INVALIDATED:
        log.error("refresh", **fields)
    else:
        log.warning("refresh", **fields)
