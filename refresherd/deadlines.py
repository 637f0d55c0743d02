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


@asynccontextmanager
async def fail_after(
    seconds: float, *, clock: Callable[[], float] = time.monotonic
) -> AsyncIterator[None]:
    """Like ``anyio.fail_after(seconds)`` (raises TimeoutError when the body is cut short), but
    a pause of the whole process extends the deadline by :data:`AFTER_PAUSE` only.

    A timer on the event loop, not a watcher task: this wraps every token request, and a task
    (with its task group) per request was a measurable share of the daemon's CPU."""
    loop = asyncio.get_running_loop()
    expired = False
    timer: asyncio.TimerHandle | None = None
    with anyio.CancelScope() as scope:

        def fire(armed_at: float, wait: float) -> None:
            nonlocal expired, timer
            if clock() - armed_at - wait > PAUSE_TOLERANCE:
                # Fired far too late: the process was stopped. Let the body read what waits.
                timer = loop.call_later(AFTER_PAUSE, fire, clock(), AFTER_PAUSE)
                return
            expired = True
            scope.cancel()

        timer = loop.call_later(seconds, fire, clock(), seconds)
        try:
            yield
        finally:
            assert timer is not None
            timer.cancel()
    if expired and scope.cancelled_caught:
        raise TimeoutError
