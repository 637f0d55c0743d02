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
        """The pace to plan with: the 95th percentile of recent answers."""
        return self.quantile(0.95)

    def __len__(self) -> int:
        return len(self._samples)
