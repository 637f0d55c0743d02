"""A request deadline that a stopped process does not miss its answer through.

``anyio.fail_after`` counts monotonic time, which runs on while the process is stopped (SIGSTOP,
a frozen container, a paused VM). A refresh request whose answer arrived during such a pause
would then time out the moment the process resumes, before the waiting answer is read: for a
one-time refresh token that the IdP has already rotated, the new token is thrown away and the
token set is lost. :func:`fail_after` notices that its timer fired far later than asked and
gives the body a moment to read what is waiting before it gives up.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Final

import anyio

# A timer firing later than this is taken for a pause of the process, not event-loop lag.
PAUSE_TOLERANCE: Final = 1.0
# After a pause, how long the body may still run: time to read an answer already received.
AFTER_PAUSE: Final = 1.0


async def _expire(seconds: float, clock: Callable[[], float]) -> None:
    """Return once ``seconds`` have passed, not counting a pause of the process."""
    remaining = seconds
    while True:
        start = clock()
        await anyio.sleep(remaining)
        if clock() - start - remaining <= PAUSE_TOLERANCE:
            return
        remaining = AFTER_PAUSE


@asynccontextmanager
async def fail_after(
    seconds: float, *, clock: Callable[[], float] = time.monotonic
) -> AsyncIterator[None]:
    """Like ``anyio.fail_after(seconds)`` (raises TimeoutError when the body is cut short), but
    a pause of the whole process extends the deadline by :data:`AFTER_PAUSE` only."""
    expired = False
    finished = False
    try:
        async with anyio.create_task_group() as tg:

            async def watch() -> None:
                nonlocal expired
                await _expire(seconds, clock)
                expired = True
                tg.cancel_scope.cancel()

            tg.start_soon(watch)
            try:
                yield
                finished = True
            finally:
                tg.cancel_scope.cancel()
    except BaseExceptionGroup as group:
        # The task group wraps what the body raised; the caller expects it as it was raised.
        if len(group.exceptions) == 1:
            raise group.exceptions[0] from None
        raise
    if expired and not finished:
        raise TimeoutError
