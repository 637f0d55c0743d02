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

# A timer firing later than this is taken for a pause of the process, not event-loop lag.
PAUSE_TOLERANCE: Final = 1.0
# After a pause, how long the body may still run: time to read an answer already received.
AFTER_PAUSE: Final = 1.0
# How a deadline's cancellation introduces itself: as an anyio cancel scope's does (anyio
# recognises a cancellation as one of its scopes' by this start of the message,
# anyio._backends._asyncio.is_anyio_cancellation). The deadline was such a scope, and it still
# must read as one: when an enclosing scope is cancelled in the same turn as the deadline
# passes, the one CancelledError that comes out may carry the deadline's message, and a scope
# that did not recognise it would let it through instead of ending there.
CANCEL_MESSAGE_START: Final = "Cancelled via cancel scope "


class Deadline:
    """:func:`fail_after`'s context: a loop timer that cancels the task running the body.

    Not an anyio cancel scope: this wraps every token request, and a scope there cost about
    5 % of a refresh's CPU (docs/benchmarks.md). The cancellation is delivered as anyio
    delivers a scope's, and for the same reasons: never to a task whose awaited future is
    already done (it is about to resume with that result, say the answer with a rotated
    token in it; throwing CancelledError in its place would lose it), and again at every
    turn of the loop until the body has left (a body that catches one CancelledError and
    waits again is cancelled again). Each cancellation sent is taken back when the body
    leaves (``Task.uncancel``), so enclosing anyio scopes count exactly what they sent;
    TimeoutError replaces the CancelledError only when nothing else cancelled the task
    meanwhile (a shutdown's cancellation goes on up as it came).

    A class, not a generator-based context manager or a closure: a closure that re-arms
    itself refers to itself, a cycle left to the garbage collector after every request."""

    __slots__ = (
        "cancelling",
        "clock",
        "expired",
        "handle",
        "inside",
        "seconds",
        "sent",
        "task",
    )

    def __init__(self, seconds: float, clock: Callable[[], float]) -> None:
        self.seconds = seconds
        self.clock = clock
        self.expired = False
        self.inside = False
        self.sent = 0  # cancellations sent to the task, each taken back on the way out
        self.handle: asyncio.Handle | None = None
        self.task: asyncio.Task[object] | None = None
        self.cancelling = 0

    async def __aenter__(self) -> None:
        task = asyncio.current_task()
        if task is None:  # pragma: no cover - only ever awaited in a task
            raise RuntimeError("a deadline needs a task to cancel")
        self.task = task
        self.cancelling = task.cancelling()
        self.inside = True
        self._arm(self.seconds)

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.inside = False
        if self.handle is not None:
            self.handle.cancel()
            self.handle = None
        task = self.task
        assert task is not None
        for _ in range(self.sent):
            task.uncancel()
        if (
            self.sent
            and exc_type is asyncio.CancelledError
            and task.cancelling() <= self.cancelling
        ):
            # Only the deadline cancelled the body: it timed out.
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
        self._deliver()

    def _deliver(self) -> None:
        """Cancel the body's task if it waits on something not yet done; look again at the
        next turn of the loop for as long as the body has not left."""
        if not self.inside:
            return
        task = self.task
        assert task is not None
        if task.done():
            return
        # What anyio's CancelScope._deliver_cancellation looks at, read the same way.
        waiter = task._fut_waiter  # type: ignore[attr-defined]
        pending = task._must_cancel  # type: ignore[attr-defined]
        if not pending and (not isinstance(waiter, asyncio.Future) or not waiter.done()):
            task.cancel(f"{CANCEL_MESSAGE_START}{id(self):x} (refresherd deadline)")
            self.sent += 1
        self.handle = asyncio.get_running_loop().call_soon(self._deliver)


def fail_after(seconds: float, *, clock: Callable[[], float] = time.monotonic) -> Deadline:
    """Like ``anyio.fail_after(seconds)`` (raises TimeoutError when the body is cut short), but
    a pause of the whole process extends the deadline by :data:`AFTER_PAUSE` only.

    A timer on the event loop, not a watcher task: this wraps every token request, and a task
    (with its task group) per request was a measurable share of the daemon's CPU."""
    return Deadline(seconds, clock)
