"""The attempt loop: the sends of one refresh token inside one refresh (:class:`Series`).

Each send is journaled before it leaves and runs with the provider's full ``request_timeout``;
what an answer means is the policy's (:func:`refresherd.policy.decide`). Where sends may overlap
(a one-time token's grace window: hedges), each runs in a task the series owns (:class:`_Sends`);
where they cannot (no window), each runs in the series' own task. The series ends with a grant
(stored by the caller), a final decision on a failure (recorded by the caller), or a result
decided on the way.
"""

from __future__ import annotations

import asyncio
import math
import random
from collections import deque
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import Any

import anyio

from refresherd import policy
from refresherd.clock import Clock
from refresherd.idp.endpoint import TokenEndpoint
from refresherd.idp.failures import EndpointError, FailureReason
from refresherd.latency import AnswerTimes
from refresherd.logs import exception_fields, get_logger
from refresherd.metrics import Metrics
from refresherd.model import Attempt, Failure, FailureKind, Grant, RefreshTokenUsage, TokenSet
from refresherd.refresh.leases import Leases
from refresherd.refresh.outcome import Outcome, RefreshResult
from refresherd.refresh.providers import Providers
from refresherd.refresh.record import Recorder
from refresherd.refresh.storage import StorageWatch
from refresherd.settings import ProviderConfig
from refresherd.store import StoreError, TokenStore

log = get_logger("refresherd.refresh.series")

# Failures that say the IdP (or the way to it) had more than it could take: the adaptive
# limit backs off. Any other answer (an OAuth error, a malformed body) is timed like a grant.
_OVERLOAD = frozenset(
    {
        FailureReason.CONNECT_ERROR,
        FailureReason.TIMEOUT,
        FailureReason.NETWORK_ERROR,
        FailureReason.SERVER_ERROR,
        FailureReason.RATE_LIMITED,
    }
)


@dataclass(slots=True)
class _Answer:
    """What one send brought back. ``attempt``: the journal entry the send went out under."""

    attempt: Attempt
    grant: Grant | None
    failure: Failure | None
    duration: float  # monotonic seconds from send to answer (or to giving up)


SeriesEnd = RefreshResult | Grant | tuple[Failure, policy.Decision]


def _resolve(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)


class _Sends:
    """The sends out of one series side by side, each in a task the series owns, and their
    answers in the order they land.

    asyncio tasks rather than an anyio task group: a task group, an anyio task and a memory
    stream per refresh cost about a fifth of the daemon's CPU per refresh (docs/benchmarks.md).
    Ownership is kept by hand instead: a send's task is never cancelled by its caller's cancel
    scope, so :meth:`close` (awaited by the series' owner on every way out) cancels the sends
    still out and waits for them; a grant that landed meanwhile is kept for :meth:`grants`."""

    __slots__ = ("_answers", "_closing", "_error", "_out", "_raised", "_waiter")

    def __init__(self) -> None:
        # In the order they started (a dict keeps it), for close() to harvest in that order.
        self._out: dict[asyncio.Task[_Answer], None] = {}
        self._answers: deque[_Answer] = deque()
        self._waiter: asyncio.Future[None] | None = None
        # What a send raised past its own handling (a bug), or a send cancelled by anything
        # but close(): raised to the series by next(), as a task group would, rather than an
        # answer that never comes; close() hands back one that next() never raised.
        self._error: BaseException | None = None
        self._raised = False
        self._closing = False

    def start(self, send: Coroutine[Any, Any, _Answer]) -> None:
        task = asyncio.get_running_loop().create_task(send)
        self._out[task] = None
        task.add_done_callback(self._landed)

    def _landed(self, task: asyncio.Task[_Answer]) -> None:
        if task not in self._out:
            return  # already taken by close()
        del self._out[task]
        # A send catches every Exception into its answer: only close() should end one
        # without an answer.
        if task.cancelled():
            if not self._closing and self._error is None:
                self._error = RuntimeError("a token request was cancelled outside its series")
        elif (error := task.exception()) is not None:
            if self._error is None:
                self._error = error
        else:
            self._answers.append(task.result())
        if self._waiter is not None:
            _resolve(self._waiter)

    async def next(self, timeout: float | None = None) -> _Answer | None:
        """The next answer, waiting for it at most ``timeout`` seconds (None: no answer yet).
        Raises what a send raised instead of answering, once every answer in is taken."""
        if not self._answers and self._error is None:
            loop = asyncio.get_running_loop()
            self._waiter = waiter = loop.create_future()
            timer = None if timeout is None else loop.call_later(timeout, _resolve, waiter)
            try:
                await waiter
            finally:
                self._waiter = None
                if timer is not None:
                    timer.cancel()
        if self._answers:  # an answer (a grant, maybe) before any error
            return self._answers.popleft()
        if self._error is not None:
            self._raised = True
            raise self._error
        return None

    async def close(self) -> BaseException | None:
        """Cancel the sends still out and wait until each has ended, whatever cancels the
        caller meanwhile (they end at once: a cancelled request is abandoned). Returns what a
        send raised that :meth:`next` never raised, for the caller to log."""
        self._closing = True
        if self._out:
            with anyio.CancelScope(shield=True):
                # A send whose answer is in (the future it awaits resolved, its task runnable)
                # runs first: Task.cancel() would throw CancelledError in place of that
                # answer, a rotated token lost (anyio's cancellation never lands on such a task).
                await asyncio.sleep(0)
                out = list(self._out)
                for task in out:
                    task.cancel()
                if out:
                    await asyncio.wait(out)
            for task in out:
                self._landed(task)
        return None if self._raised else self._error

    def grants(self) -> list[Grant]:
        return [a.grant for a in self._answers if a.grant is not None]


class Series:
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
        ts: TokenSet,
        eff: policy.EffectivePolicy,
        grace: float,
        provider: ProviderConfig,
        endpoint: TokenEndpoint,
        times: AnswerTimes,
        *,
        store: TokenStore,
        owner: str,
        providers: Providers,
        leases: Leases,
        storage: StorageWatch,
        record: Recorder,
        metrics: Metrics,
        clock: Clock,
        rng: random.Random,
    ) -> None:
        self._store = store
        self._owner = owner
        self._providers = providers
        self._leases = leases
        self._storage = storage
        self._record = record
        self._metrics = metrics
        self._clock = clock
        self._rng = rng
        self.ts = ts
        self.eff = eff
        self.grace = grace
        self.provider = provider
        self.endpoint = endpoint
        self.times = times
        # The pace the window is planned with, fixed for the series: the margin (and so the
        # window's end) must not move between a plan and the journal's check of it.
        self.latency = times.hint()
        self.hedges = providers.hedge_budget(ts.provider)
        self.attempt: Attempt | None = None
        self.in_flight = 0
        self.invalid_grant_retried = False
        self.last_failure: Failure | None = None
        # The first grant received, until the series ends (persisted by the caller).
        self.grant: Grant | None = None
        self._anchor = (clock.wall(), clock.monotonic())
        # Sends may be out side by side only where a one-time token's grace window plans
        # hedges (_hedge_at); without one a send is answered before the next can start, and
        # runs in the series' own task (no task per send: a fifth of the CPU per refresh).
        self._sends = _Sends() if self.grace > 0 else None

    def now(self) -> float:
        """Series time: see the class docstring."""
        wall, mono = self._anchor
        return wall + (self._clock.monotonic() - mono)

    async def close(self) -> None:
        """End the sends still out (their answers are not needed once the series has ended);
        awaited by the series' owner on every way out, cancelled or not."""
        if self._sends is None:
            return
        error = await self._sends.close()
        if error is not None:
            # A bug in a send, after the series ended another way (a grant from another
            # send): said, never silently dropped.
            log.error(
                "token request failed unexpectedly",
                token_set=self.ts.id,
                **exception_fields(error, [self.ts.refresh_token.reveal()]),
            )

    def buffered_grant(self) -> Grant | None:
        """A grant that landed but was not read (the series was cancelled), after
        :meth:`close`."""
        grants = self._sends.grants() if self._sends is not None else []
        return grants[0] if grants else None

    def _last_send_at(self) -> float | None:
        """Series time by which a send that relies on the window must start (None: no window
        runs: a re-use token, or nothing journaled yet)."""
        if self.grace <= 0 or self.attempt is None:
            return None
        closes = policy.window_closes_at(self.attempt.started_at, self.grace, self.latency)
        return closes - policy.LAST_SEND_LEAD

    async def run(self) -> SeriesEnd:
        """The series to its end; :meth:`close` must follow, whichever way it ends."""
        ts = self.ts
        # Two clocks for the next send (series time): a retry the policy planned after a
        # failed answer, and a hedge beside the sends still out (void once none is out).
        retry_at: float | None = self.now()
        hedge_at: float | None = None
        # Why no more sends may start; returned once none is out.
        stopped: RefreshResult | None = None
        refused = False
        pending: tuple[Failure, policy.Decision] | None = None
        # An answer in hand, from a send run in this task (no window).
        answer: _Answer | None = None
        while True:
            if answer is not None:
                # Handled as an answer from the stream below is; with nothing else out, a
                # final decision is final at once.
                self.in_flight -= 1
                end = await self._on_answer(answer)
                answer = None
                if isinstance(end, policy.SendAgain):
                    retry_at = end.at
                    pending = None
                    continue
                return end
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
                        self._metrics.grace_retries.labels(ts.provider).inc()
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
                    if self._sends is None:
                        answer = await self._answer(journaled, None)
                    else:
                        self._sends.start(self._answer(journaled, self._leave_by(now)))
                        hedge_at = self._hedge_at(now)
                continue
            if self.in_flight == 0:
                if stopped is not None:
                    await self._leases.release_quietly(ts.id)
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
            assert self._sends is not None  # sends out side by side
            received = await self._sends.next(None if wait == math.inf else wait)
            if received is None:
                continue
            self.in_flight -= 1
            end = await self._on_answer(received)
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
        ts = self.ts
        try:
            return await self._record.moved_on(ts, self.eff, self.grace, latency=self.latency)
        except StoreError as exc:
            self._storage.failed(exc, during="journal")
            await self._leases.release_quietly(ts.id)
            return RefreshResult(
                Outcome.STORAGE_ERROR, token_set=ts, reason="storage_error", detail=str(exc)
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
        """Commit the send to the journal before it leaves; None if the store refused it.

        Only a one-time token's sends are journaled: the journal is what crash recovery and
        the other processes read to keep a possibly spent token inside its grace window. A
        re-use token is not spent by a send (a second send, a lost answer, a crash after the
        IdP answered: the same token still works), so its sends are counted here, in memory,
        and the save of the grant is its one write (a journal write per refresh was a tenth of
        the daemon's CPU per refresh: docs/benchmarks.md)."""
        ts = self.ts
        # The journal keeps to the wall clock: it is shared with every process.
        now = self._clock.wall()
        if self.eff.usage is not RefreshTokenUsage.ONE_TIME:
            return self._counted_send(now)
        keep_since = policy.keep_series_since(now, self.grace, self.latency)
        try:
            return await self._store.begin_attempt(
                ts.id, owner=self._owner, version=ts.version, now=now, keep_since=keep_since
            )
        except StoreError as exc:
            # Nothing was sent: without a journal entry, nothing may be.
            self._storage.failed(exc, during="journal")
            self._metrics.refresh_failures.labels(ts.provider, "storage_error").inc()
            return RefreshResult(
                Outcome.STORAGE_ERROR, token_set=ts, reason="storage_error", detail=str(exc)
            )

    def _counted_send(self, now: float) -> Attempt:
        """The series' record of one more send of a re-use token (never journaled)."""
        attempt = self.attempt
        if attempt is None:
            return Attempt(version=self.ts.version, started_at=now, owner=self._owner, sends=1)
        return Attempt(
            version=attempt.version,
            started_at=attempt.started_at,
            owner=attempt.owner,
            sends=attempt.sends + 1,
            settled=attempt.settled,
        )

    async def _answer(self, attempt: Attempt, leave_by: float | None) -> _Answer:
        """Send the refresh token once (journaled as ``attempt``) and take what comes back."""
        started = self._clock.monotonic()
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
        ended = self._clock.monotonic()
        duration = ended - started
        self._pace(failure, duration, ended)
        return _Answer(attempt, grant, failure, duration)

    def _pace(self, failure: Failure | None, duration: float, now: float) -> None:
        """Feed the provider's adaptive limit (refresherd.concurrency): an answer's time, or a
        sign of overload (429/503, 5xx, timeout, connection failure)."""
        provider = self.ts.provider
        limit = self._providers.limit(provider)
        in_flight = self._providers.sending[provider]
        if failure is None or failure.reason not in _OVERLOAD:
            limit.answered(duration, in_flight=in_flight, now=now)
        else:
            limit.overloaded(in_flight=in_flight, now=now)

    async def _on_answer(
        self, answer: _Answer
    ) -> RefreshResult | Grant | policy.SendAgain | tuple[Failure, policy.Decision]:
        ts = self.ts
        failure = answer.failure
        if answer.grant is not None or (failure is not None and failure.status is not None):
            self.times.observe(answer.duration)
        if answer.grant is not None:
            self.grant = answer.grant
            return answer.grant
        assert failure is not None and self.attempt is not None
        self.last_failure = failure
        self._metrics.refresh_failures.labels(ts.provider, failure.reason).inc()
        if failure.kind is not FailureKind.AMBIGUOUS:
            # The answer proves the IdP did not rotate on this send: note it in the journal,
            # so that neither a later window check nor a crash recovery counts it as a use.
            await self._settle(answer.attempt)
        maybe_consumed = self.grace > 0 and self.attempt.unsettled > 0
        storm = False
        if failure.kind is FailureKind.INVALID_GRANT:
            try:
                sibling = await self._record.sibling_grant(ts)
            except StoreError as exc:
                # Whether another worker stored a grant cannot be read: invalidating without
                # knowing would be worse than trying again later.
                self._storage.failed(exc, during="read after invalid_grant")
                return RefreshResult(
                    Outcome.STORAGE_ERROR, token_set=ts, reason="storage_error", detail=str(exc)
                )
            if sibling is not None:
                return sibling
            if not maybe_consumed:
                storm = policy.invalid_grant_storm(
                    self._providers.circuits.note_invalid_grant(ts.provider)
                )
        if storm:
            # Several different token sets refused in a row, none accepted in between: far
            # more likely our configuration (another app's credentials, a wrong token_url or
            # realm) than that many customers revoking at once. Pause the provider and keep
            # the token sets, instead of invalidating a whole customer base.
            return failure, policy.SuspectProvider()
        if failure.kind is not FailureKind.CLIENT_REJECTED and self._providers.circuits.close(
            ts.provider
        ):
            self._metrics.circuit_open.labels(ts.provider).set(0)
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
            self._providers.schedule,
            self._rng.random(),
        )
        if not isinstance(decision, policy.SendAgain):
            return failure, decision
        if decision.grace:
            self._metrics.grace_retries.labels(ts.provider).inc()
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
        ts = self.ts
        if self.eff.usage is RefreshTokenUsage.ONE_TIME:  # only its sends are journaled
            try:
                await self._store.settle_send(
                    ts.id, version=sent_under.version, started_at=sent_under.started_at
                )
            except StoreError as exc:
                # Left unsettled: the safe side (the send counts as a possible use).
                self._storage.failed(exc, during="journal")
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
