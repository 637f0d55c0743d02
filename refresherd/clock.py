"""Time, injectable: the wall clock for expiries (they are shared with the IdP), the monotonic
clock for sleeps, timeouts and durations. Tests hand in their own :class:`Clock`."""

from __future__ import annotations

import time
from typing import Protocol


class Clock(Protocol):
    def wall(self) -> float: ...
    def monotonic(self) -> float: ...


class SystemClock:
    """Wall clock for expiries (they are shared with the IdP), monotonic for durations."""

    def wall(self) -> float:
        return time.time()

    def monotonic(self) -> float:
        return time.monotonic()
