"""A request deadline that a stopped process does not miss its answer through.

``anyio.fail_after`` counts monotonic time, which runs on while the process is stopped (SIGSTOP,
a frozen container, a paused VM). A refresh request whose answer arrived during such a pause
would then time out the moment the process resumes, before the waiting answer is read: for a
one-time refresh token that the IdP has already rotated, the new token is thrown away and the
token set is lost. :func:`fail_after` notices that its timer fired far later than asked and
gives the body a moment to read what is waiting before it gives up.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from types import TracebackType
from typing import Final

import anyio

# A timer firing later than this is taken for a pause of the process, not event-loop lag.
PAUSE_TOLERANCE: Final = 1.0
# After a pause, how long the body may still run: time to read an answer already received.
AFTER_PAUSE: Final = 1.0


class Deadline:
    """:func:`fail_after`'s context: a cancel scope and the loop timer that cancels it. A
    class, not a generator-based context manager or a closure: it wraps every token request,
    and a closure that re-arms itself refers to itself, a cycle (with the cancel scope and the
    loop's handle it holds) that was left to the garbage collector after every request."""

    __slots__ = ("clock", "expired", "handle", "scope", "seconds")

    def __init__(self, seconds: float, clock: Callable[[], float]) -> None:
        self.seconds = seconds
        self.clock = clock
        self.expired = False
        self.handle: asyncio.TimerHandle | None = None
        self.scope = anyio.CancelScope()

    async def __aenter__(self) -> None:
        self.scope.__enter__()
        self._arm(self.seconds)

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self.handle is not None:
            self.handle.cancel()
            self.handle = None
        # Only the timer cancels this scope, so what it catches is the deadline: TimeoutError
        # in place of the cancellation. Anything else passes through.
        self.scope.__exit__(exc_type, exc, tb)
        if self.expired and self.scope.cancelled_caught:
            raise TimeoutError

    def _arm(self, wait: float) -> None:
        loop = asyncio.get_running_loop()
        self.handle = loop.call_later(wait, self._fire, self.clock(), wait)

    def _fire(self, armed_at: float, wait: float) -> None:
        if self.clock() - armed_at - wait > PAUSE_TOLERANCE:
            # Fired far too late: the process was stopped. Let the body read what waits.
            self._arm(AFTER_PAUSE)
            return
        self.expired = True
        self.scope.cancel()


def fail_after(seconds: float, *, clock: Callable[[], float] = time.monotonic) -> Deadline:
    """Like ``anyio.fail_after(seconds)`` (raises TimeoutError when the body is cut short), but
    a pause of the whole process extends the deadline by :data:`AFTER_PAUSE` only.

    A timer on the event loop, not a watcher task: this wraps every token request, and a task
    (with its task group) per request was a measurable share of the daemon's CPU."""
    return Deadline(seconds, clock)
