"""Politeness towards an IdP: a per-provider cap on refreshes in flight and an optional rate.

The refresher takes a provider's :meth:`ProviderThrottle.slot` once per refresh, before its
first send is journalled, and holds it until the refresh ends. Retries inside that refresh
(a one-time token re-sent within the IdP's grace window) run in the slot they already hold and
take no new rate token: queueing them behind other refreshes could outlast the grace window and
lose the rotated token, and policy bounds how many they can be. Waiting for a slot costs no
request time either: the attempt's timeout and grace clock start only once it is sent.

:class:`TokenBucket` is the pure decision (``now`` is an argument); the wait uses the
monotonic clock.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass

import anyio

from refresherd.settings import ProviderConfig


class TokenBucket:
    """``rate`` requests per second on average, at most ``burst`` at once after a quiet spell.

    :meth:`reserve` books the next send and says how long to wait for it. Bookings are made in
    call order and may run into the future (the level goes negative), so waiters are served
    first come, first served without a queue of their own.
    """

    def __init__(self, rate: float, burst: float, now: float) -> None:
        if rate <= 0 or burst < 1:
            raise ValueError("rate must be > 0 and burst >= 1")
        self.rate = rate
        self.burst = burst
        self._level = burst
        self._at = now

    def reserve(self, now: float) -> float:
        """Book one send; return the seconds to wait before making it (0.0: send now)."""
        # A clock that stepped back (it should not: monotonic) refills nothing.
        elapsed = max(now - self._at, 0.0)
        self._level = min(self.burst, self._level + elapsed * self.rate)
        self._at = max(now, self._at)
        self._level -= 1.0
        return 0.0 if self._level >= 0 else -self._level / self.rate


@dataclass(frozen=True, slots=True)
class _Limits:
    max_concurrent: int | None
    per_second: float | None


class ProviderThrottle:
    """One provider's limits, shared by all its refreshes."""

    def __init__(
        self,
        *,
        max_concurrent: int | None,
        per_second: float | None,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.limits = _Limits(max_concurrent, per_second)
        self._monotonic = monotonic
        self._limiter = (
            anyio.CapacityLimiter(max_concurrent) if max_concurrent is not None else None
        )
        # One second's worth may go at once after a quiet spell (at least one request).
        self._bucket = (
            TokenBucket(per_second, max(1.0, per_second), monotonic())
            if per_second is not None
            else None
        )

    @property
    def waiting(self) -> int:
        """Refreshes waiting for a concurrency slot."""
        return self._limiter.statistics().tasks_waiting if self._limiter is not None else 0

    @asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        """Wait for a concurrency slot, then for the rate, and hold the slot until exit."""
        if self._limiter is not None:
            await self._limiter.acquire()
        try:
            # The rate is booked only with a slot in hand, so at most max_concurrent
            # bookings run ahead of the clock.
            if self._bucket is not None:
                delay = self._bucket.reserve(self._monotonic())
                if delay > 0:
                    await anyio.sleep(delay)
            yield
        finally:
            if self._limiter is not None:
                self._limiter.release()


class Throttles:
    """The throttle of each provider, kept across config reloads while its limits stay."""

    def __init__(self, monotonic: Callable[[], float] = time.monotonic) -> None:
        self._monotonic = monotonic
        self._by_provider: dict[str, ProviderThrottle] = {}

    def of(self, provider: ProviderConfig) -> ProviderThrottle | None:
        """The provider's throttle, or None when it has no limit of its own."""
        limits = _Limits(provider.max_concurrent_refreshes, provider.max_requests_per_second)
        if limits.max_concurrent is None and limits.per_second is None:
            self._by_provider.pop(provider.name, None)
            return None
        throttle = self._by_provider.get(provider.name)
        if throttle is None or throttle.limits != limits:
            # New limits take effect for refreshes that start from now on.
            throttle = ProviderThrottle(
                max_concurrent=limits.max_concurrent,
                per_second=limits.per_second,
                monotonic=self._monotonic,
            )
            self._by_provider[provider.name] = throttle
        return throttle
