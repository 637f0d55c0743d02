"""How many refreshes of one provider may be in flight: a limit that finds the IdP's pace.

A gradient limiter in the family of TCP Vegas, after Netflix's concurrency-limits
(``Gradient2Limit`` over a ``WindowedLimit``) and Envoy's adaptive concurrency filter. Pure:
the refresher feeds it each answered request's time and each overload sign (a timeout, a
connection that failed, a 429 or 5xx), with ``now`` and the provider's refreshes in flight as
arguments; the scheduler reads :attr:`GradientLimit.limit` and claims no more than that.

Samples are taken in windows (at least :data:`WINDOW` seconds and :data:`WINDOW_SAMPLES`
answers). At the end of each window:

- an overload sign in it: the limit falls by :data:`BACKOFF` (multiplicative decrease);
- the limit was not in use (at most half of it in flight): it stays — a quiet steady state
  neither needs nor earns a larger one, so the limit grows only with a backlog;
- otherwise the window's median answer time (``short``) is compared with a slow average of
  the past windows' (``long``): ``gradient = clamp(TOLERANCE * long / short, 0.5, 1)``. While
  answers hold near their usual pace (gradient 1) the limit grows by :data:`GROWTH` of itself
  a window — doubling at first (slow start, as TCP's, until the first window whose answers
  slowed or showed overload), so that a backlog finds its pace within a second or two; once
  they slow, it moves to ``limit * gradient + sqrt(limit)``: down when the answers slow by
  more than the tolerance, and up by a square root at most.

A limit made with a ``far_ceiling`` (the default config's, refresherd.settings) may rise above
its ``ceiling`` for a distant IdP, as far as Little's law says :data:`FAR_RATE` refreshes a
second need at the IdP's own pace: the fastest answer of the last :data:`FASTEST_WINDOWS`
windows, which queueing in this process does not slow (the usual answer time does: at 512 in
flight on loopback it is 40 ms, all of it this process's own queue). An IdP 200 ms away then
gets up to 1,000 in flight, where 1,024 did 17-35 % more than 512 (docs/benchmarks.md); one
0-100 ms away stays at ``ceiling``, where more in flight only costs CPU. An IdP that is slow
rather than far looks the same from here (Little's law cannot tell them apart): what keeps a
struggling one from more than it can take is what always did, its answers slowing as the
limit grows (the gradient) and its overload signs, under ``max_concurrent_refreshes``.

The answer time is measured in this process, so it holds the IdP's time and the wait for this
process's event loop: a daemon whose CPU is the bound sees its answers slow and stops growing
as an IdP that is the bound does. ``long`` follows the pace slowly (:data:`LONG_WEIGHT` per
window) and is pulled down at once when the pace recovers (as Gradient2 does), so that a
limit that shrank in an incident grows back.
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from typing import Final

# The lowest limit: enough for a provider to show its pace, and for a few refreshes at once.
FLOOR: Final = 4
# Where a provider's limit starts (and starts again after a reload that changes its ceiling
# below it).
INITIAL: Final = 32
WINDOW: Final = 0.25
WINDOW_SAMPLES: Final = 8
# A window with fewer answers ends anyway after this long (a slow IdP at a small limit).
WINDOW_MAX: Final = 2.0
# Answers up to this many times slower than their usual pace count as holding it.
TOLERANCE: Final = 2.0
# Growth per window while answers hold their pace, as a share of the limit (after slow start,
# which doubles it).
GROWTH: Final = 0.25
# The limit's fall at a window with an overload sign (429, 5xx, timeout, connect failure).
BACKOFF: Final = 0.75
# The weight of one window's median in the slow average of answer times.
LONG_WEIGHT: Final = 0.1
# The slow average is pulled down when a window is this many times faster.
RECOVERY: Final = 2.0
# With a far ceiling: the refreshes a second the limit may reach for at the IdP's own pace,
# more than one process does on any machine measured (about 3,000 on two cores).
FAR_RATE: Final = 5000.0
# The IdP's own pace: the fastest answer of this many windows (a few seconds or more).
FASTEST_WINDOWS: Final = 20


class GradientLimit:
    """One provider's adaptive limit on refreshes in flight, within ``[floor, ceiling]`` (a
    ceiling below the floor wins), or with a ``far_ceiling`` within ``[floor, reach]``."""

    __slots__ = (
        "_answers",
        "_drops",
        "_fastest",
        "_limit",
        "_long",
        "_peak_in_flight",
        "_slow_start",
        "_window_start",
        "ceiling",
        "far_ceiling",
        "floor",
    )

    def __init__(
        self,
        *,
        ceiling: int,
        now: float,
        floor: int = FLOOR,
        initial: int = INITIAL,
        far_ceiling: int | None = None,
    ) -> None:
        if ceiling < 1:
            raise ValueError("ceiling must be at least 1")
        self.ceiling = ceiling
        self.far_ceiling = far_ceiling
        self.floor = floor
        # Each recent window's fastest answer (see reach).
        self._fastest: deque[float] = deque(maxlen=FASTEST_WINDOWS)
        self._limit = float(min(max(initial, floor), ceiling))
        self._long: float | None = None
        self._answers: list[float] = []
        self._drops = 0
        self._peak_in_flight = 0
        self._slow_start = True
        self._window_start = now

    @property
    def limit(self) -> int:
        """Refreshes of this provider that may be in flight now."""
        return int(self._limit)

    @property
    def reach(self) -> int:
        """How high the limit may go now: ``ceiling``, or with a far ceiling what FAR_RATE
        refreshes a second need at the IdP's own pace, between the two."""
        if self.far_ceiling is None or not self._fastest or self.far_ceiling <= self.ceiling:
            return self.ceiling
        need = int(FAR_RATE * min(self._fastest))
        return min(self.far_ceiling, max(self.ceiling, need))

    @property
    def usual_answer_time(self) -> float | None:
        """The slow average of answer times (None before the first window ends)."""
        return self._long

    def set_ceiling(self, ceiling: int, far_ceiling: int | None = None) -> None:
        """A reload changed the ceilings: the limit keeps what it learned, within the new
        ones."""
        if ceiling < 1:
            raise ValueError("ceiling must be at least 1")
        self.ceiling = ceiling
        self.far_ceiling = far_ceiling
        self._limit = min(max(self._limit, float(self._floor())), float(self.reach))

    def answered(self, seconds: float, *, in_flight: int, now: float) -> None:
        """A request answered in ``seconds`` (a grant or an OAuth error alike), with
        ``in_flight`` of the provider's refreshes in flight when it was sent or answered."""
        if seconds >= 0.0:
            self._answers.append(seconds)
        self._note(in_flight, now)

    def overloaded(self, *, in_flight: int, now: float) -> None:
        """A sign that the IdP (or the way to it) had more than it could take: a 429 or 5xx
        answer, a timeout, a connection that could not be made."""
        self._drops += 1
        self._note(in_flight, now)

    def _note(self, in_flight: int, now: float) -> None:
        self._peak_in_flight = max(self._peak_in_flight, in_flight)
        elapsed = now - self._window_start
        if elapsed < WINDOW:
            if elapsed < 0:  # a clock that stepped back (it is monotonic): start again
                self._window_start = now
            return
        if len(self._answers) < WINDOW_SAMPLES and not self._drops and elapsed < WINDOW_MAX:
            return
        self._end_window()
        self._window_start = now

    def _end_window(self) -> None:
        answers, drops, peak = self._answers, self._drops, self._peak_in_flight
        self._answers, self._drops, self._peak_in_flight = [], 0, 0
        short = statistics.median(answers) if answers else None
        if answers:
            self._fastest.append(min(answers))
        if short is not None:
            if self._long is None:
                self._long = short
            elif self._long / max(short, 1e-9) > RECOVERY:
                # The pace recovered after a slow spell: do not wait for the slow average.
                self._long = self._long * 0.5 + short * 0.5
            else:
                self._long += LONG_WEIGHT * (short - self._long)
        limit = self._limit
        if drops:
            self._slow_start = False
            limit *= BACKOFF
        elif peak * 2 <= limit or short is None or self._long is None:
            pass  # not in use (or nothing to judge by): no reason to move
        else:
            gradient = max(0.5, min(1.0, TOLERANCE * self._long / max(short, 1e-9)))
            if gradient >= 1.0:
                limit += max(1.0, (1.0 if self._slow_start else GROWTH) * limit)
            else:
                self._slow_start = False
                limit = limit * gradient + math.sqrt(limit)
        self._limit = min(max(limit, float(self._floor())), float(self.reach))

    def _floor(self) -> int:
        return min(self.floor, self.ceiling)
