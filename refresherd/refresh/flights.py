"""Single-flight: at most one refresh of a token set in the air in this process; later callers
join it and take its result. An exclusive hold (revoking and removing a set, say) stands in the
same slot, so no refresh of that set starts meanwhile.

Flights fly in a task group of their own (:meth:`Flights.run`, inside the daemon's work group),
so that a caller that goes away (an API client that disconnects) never cancels a refresh
half-way nor fails its waiters. Without ``run`` (the CLI's one-off refresh, unit tests) a
refresh flies in its first caller's task.
"""

from __future__ import annotations

import functools
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass

import anyio
import anyio.abc

from refresherd.logs import get_logger
from refresherd.metrics import Metrics
from refresherd.model import TokenSet
from refresherd.refresh.leases import Leases
from refresherd.refresh.outcome import Outcome, RefreshResult
from refresherd.store import ClaimRefused

log = get_logger("refresherd.refresh.flights")


@dataclass(slots=True)
class _Flight:
    result: RefreshResult | None = None
    # An exclusive hold (Flights.exclusive), not a refresh: callers wait for it to end and
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


class Flights:
    """The flights of one process; see the module docstring."""

    def __init__(self, *, metrics: Metrics, leases: Leases) -> None:
        self._metrics = metrics
        self._leases = leases
        self._flights: dict[str, _Flight] = {}
        self._group: anyio.abc.TaskGroup | None = None
        self._closing: anyio.Event | None = None
        self._closed = False

    async def run(
        self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Own the task group every flight flies in, until :meth:`close`; then return once the
        flights in the air have landed (the owner bounds that wait by cancelling)."""
        self._closing = closing = anyio.Event()
        async with anyio.create_task_group() as tg:
            self._group = tg
            task_status.started()
            await closing.wait()
            self._group = None

    def close(self) -> None:
        """Take no more flights (shutdown); :meth:`run` returns when the last one lands."""
        self._closed = True
        if self._closing is not None:
            self._closing.set()

    async def join(
        self,
        token_set_id: str,
        fly: Callable[[], Awaitable[RefreshResult]],
        *,
        in_this_task: bool = False,
    ) -> RefreshResult:
        """The result of the refresh of this set in flight, or of ``fly`` flown now.

        ``in_this_task``: the caller's task is owned by the same task group as the flights and
        never leaves half-way (the scheduler's): the refresh flies in it, handled exactly as in
        the flight group, rather than in a second task per refresh."""
        while (flight := self._flights.get(token_set_id)) is not None and flight.hold:
            await flight.wait()
        if flight is not None:
            self._metrics.singleflight_coalesced.inc()
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
            return RefreshResult(Outcome.FAILED, reason="cancelled", detail="shutdown")
        flight = _Flight()
        self._flights[token_set_id] = flight
        self._metrics.in_flight.set(len(self._flights))
        if self._group is None:
            await self._fly(token_set_id, flight, fly, owned=False)
        elif in_this_task:
            await self._fly(token_set_id, flight, fly, owned=True)
        else:
            self._group.start_soon(
                functools.partial(self._fly, token_set_id, flight, fly, owned=True),
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
            claimed = await self._leases.claim(token_set_id)
            try:
                yield claimed
            finally:
                if not isinstance(claimed, ClaimRefused):
                    with anyio.CancelScope(shield=True):
                        await self._leases.release_quietly(token_set_id)
        finally:
            del self._flights[token_set_id]
            mine.land()

    def detach(self, work: Callable[[], Awaitable[None]], *, name: str) -> bool:
        """Run ``work`` in the flight group, where no caller can cancel it (an API client that
        disconnects does not end it) and shutdown waits for it as for a refresh. Returns False,
        starting nothing, when there is no flight group: shutdown has begun, or nothing runs
        :meth:`run`. An error escaping ``work`` is logged here rather than ending every flight.
        """
        group = self._group
        if group is None or self._closed:
            return False

        async def guarded() -> None:
            try:
                await work()
            except Exception:
                log.exception("background task failed", task=name)

        group.start_soon(guarded, name=name)
        return True

    async def _fly(
        self,
        token_set_id: str,
        flight: _Flight,
        fly: Callable[[], Awaitable[RefreshResult]],
        *,
        owned: bool,
    ) -> None:
        try:
            flight.result = await fly()
        except Exception:
            if not owned:
                raise  # the caller's task: the scheduler logs it and releases the lease
            # In the flight group an escaping error would end every other flight with it.
            log.exception("refresh crashed", token_set=token_set_id)
            await self._leases.release_quietly(token_set_id)
            flight.result = RefreshResult(Outcome.FAILED, reason="internal_error")
        finally:
            if flight.result is None:
                flight.result = RefreshResult(Outcome.FAILED, reason="cancelled", detail="shutdown")
            del self._flights[token_set_id]
            self._metrics.in_flight.set(len(self._flights))
            flight.land()
