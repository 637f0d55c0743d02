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
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Final

import anyio

# A timer firing later than this is taken for a pause of the process, not event-loop lag.
PAUSE_TOLERANCE: Final = 1.0
# After a pause, how long the body may still run: time to read an answer already received.
AFTER_PAUSE: Final = 1.0


class _Timer:
    """The deadline's timer. A class, not a closure: a closure that re-arms itself refers to
    itself, and that cycle (with the cancel scope and the loop's handle it holds) was left
    to the garbage collector after every token request."""

    __slots__ = ("clock", "expired", "handle", "loop", "scope")

    def __init__(
        self, loop: asyncio.AbstractEventLoop, scope: anyio.CancelScope, clock: Callable[[], float]
    ) -> None:
        self.loop = loop
        self.scope = scope
        self.clock = clock
        self.expired = False
        self.handle: asyncio.TimerHandle | None = None

    def arm(self, wait: float) -> None:
        self.handle = self.loop.call_later(wait, self.fire, self.clock(), wait)

    def fire(self, armed_at: float, wait: float) -> None:
        if self.clock() - armed_at - wait > PAUSE_TOLERANCE:
            # Fired far too late: the process was stopped. Let the body read what waits.
            self.arm(AFTER_PAUSE)
            return
        self.expired = True
        self.scope.cancel()

    def disarm(self) -> None:
        if self.handle is not None:
            self.handle.cancel()
            self.handle = None


@asynccontextmanager
async def fail_after(
    seconds: float, *, clock: Callable[[], float] = time.monotonic
) -> AsyncIterator[None]:
    """Like ``anyio.fail_after(seconds)`` (raises TimeoutError when the body is cut short), but
    a pause of the whole process extends the deadline by :data:`AFTER_PAUSE` only.

    A timer on the event loop, not a watcher task: this wraps every token request, and a task
    (with its task group) per request was a measurable share of the daemon's CPU."""
    with anyio.CancelScope() as scope:
        timer = _Timer(asyncio.get_running_loop(), scope, clock)
        timer.arm(seconds)
        try:
            yield
        finally:
            timer.disarm()
    if timer.expired and scope.cancelled_caught:
        raise TimeoutError
