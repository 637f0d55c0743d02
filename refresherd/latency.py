"""How fast a provider answers: recent answer times, for planning sends inside a grace window.

Pure: the refresher measures each answered request on its monotonic clock and feeds it here;
policy turns the quantile into a hedge delay, a retry spacing and the window's end margin.
"""

from __future__ import annotations

import math
from collections import deque
from typing import Final

# Enough answers for a quantile that one outlier does not make; few enough that a provider
# whose pace changes (an incident, a deploy) is followed within a minute of refreshes.
WINDOW: Final = 64
MIN_SAMPLES: Final = 5


class AnswerTimes:
    """The last :data:`WINDOW` answer times of one provider, in seconds.

    Only answers count (a grant, an OAuth error, a 5xx): a timeout says nothing about the
    provider's pace but that it was slower than the timeout, and a refused connection is
    faster than any answer.
    """

    __slots__ = ("_samples", "_sorted")

    def __init__(self) -> None:
        self._samples: deque[float] = deque(maxlen=WINDOW)
        self._sorted: list[float] | None = None

    def observe(self, seconds: float) -> None:
        if seconds >= 0.0:
            self._samples.append(seconds)
            self._sorted = None

    def quantile(self, q: float) -> float | None:
        """The ``q`` quantile (nearest rank) of the recent answers; None while too few."""
        if len(self._samples) < MIN_SAMPLES:
            return None
        if self._sorted is None:
            self._sorted = sorted(self._samples)
        rank = min(len(self._sorted) - 1, max(0, math.ceil(q * len(self._sorted)) - 1))
        return self._sorted[rank]

    def hint(self) -> float | None:
        """The pace to plan with: the median of recent answers. Not a high percentile: the
        tail is where a struggling IdP's stalls land, and a pace taken from them would make
        every hedge late and every window's margin long."""
        return self.quantile(0.5)

    def __len__(self) -> int:
        return len(self._samples)


class HedgeBudget:
    """How many hedges a provider may get: a fifth of its sends, with a burst of 20.

    Enough for an IdP that stalls one request in ten (each stalled send may take two hedges);
    a daemon just restarted after a crash, recovering its predecessor's stalled sends, starts
    with the whole burst.

    A token bucket filled by each ordinary send (``share`` of a token) and emptied by each
    hedge: an IdP that stalls every request is raced for a while, then waited for, not
    flooded with three sends per refresh.
    """

    __slots__ = ("burst", "share", "tokens")

    def __init__(self, *, share: float = 0.2, burst: float = 20.0) -> None:
        self.share = share
        self.burst = burst
        self.tokens = burst

    def note_send(self) -> None:
        self.tokens = min(self.burst, self.tokens + self.share)

    def take(self) -> bool:
        # A hair of tolerance: ten shares of 0.1 add up to 0.9999999999999999.
        if self.tokens >= 1.0 - 1e-9:
            self.tokens = max(self.tokens - 1.0, 0.0)
            return True
        return False

    def give_back(self) -> None:
        """A hedge taken but not sent (the journal refused it)."""
        self.tokens = min(self.burst, self.tokens + 1.0)
