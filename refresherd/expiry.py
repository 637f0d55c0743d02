"""Refresh tokens whose absolute expiry is near: said once per token set, ahead of time.

An absolute lifetime (counted from the first authorization, never extended by a refresh) cannot
be beaten by refreshing: the customer must authorize again before it ends. This watcher scans
the store every minute for token sets whose refresh token expires within the configured horizon
(``[schedule] refresh_token_expiry_warning``), logs one ``refresh token expiring`` line for
each, once per expiry (remembered in the database, so a restart does not repeat it), hands it to
an optional listener (the hooks), and keeps ``refresherd_refresh_tokens_expiring`` current.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from typing import Final

import anyio

from refresherd import policy
from refresherd.clock import Clock
from refresherd.logs import get_logger
from refresherd.metrics import Metrics
from refresherd.model import TokenSet, rfc3339
from refresherd.settings import ProviderConfig, ScheduleConfig
from refresherd.store import StoreError, TokenStore

log = get_logger("refresherd.expiry")

SCAN_INTERVAL: Final = 60.0
# At most this share of the time goes to scanning (a million sets stretch the interval).
SCAN_DUTY: Final = 0.05
# Sets handled per query: the scan's memory is bounded by this, not by the number of sets.
BATCH: Final = 500

# Called once per token set and expiry, after the log line; ``expires_at`` is Unix seconds.
ExpiringListener = Callable[[TokenSet, float], Awaitable[None]]


class ExpiryWatcher:
    def __init__(
        self,
        *,
        store: TokenStore,
        metrics: Metrics,
        clock: Clock,
        providers: Callable[[], Mapping[str, ProviderConfig]],
        schedule: Callable[[], ScheduleConfig],
        on_expiring: ExpiringListener | None = None,
    ) -> None:
        # Callables: a reload replaces the providers and the schedule; the next scan uses them.
        self.store = store
        self.metrics = metrics
        self.clock = clock
        self.providers = providers
        self.schedule = schedule
        self.on_expiring = on_expiring

    async def run(self) -> None:
        while True:
            started = self.clock.monotonic()
            try:
                await self.scan()
            except StoreError as exc:
                self.metrics.storage_errors.inc()
                log.warning("cannot check refresh-token expiry", error=str(exc))
            took = self.clock.monotonic() - started
            await anyio.sleep(max(SCAN_INTERVAL, took / SCAN_DUTY))

    async def scan(self) -> int:
        """One pass; returns how many token sets were warned about."""
        now = self.clock.wall()
        horizon = self.schedule().refresh_token_expiry_warning
        providers = self.providers()
        lifetimes = {name: p.refresh_token_lifetime for name, p in providers.items()}
        warned = 0
        for name, provider in providers.items():
            while True:
                batch = await self.store.refresh_expiring(
                    name, lifetime=provider.refresh_token_lifetime, until=now + horizon, limit=BATCH
                )
                due = [
                    (ts, expires_at)
                    for ts, expires_at in batch
                    if policy.expiry_warning_due(
                        expires_at=expires_at,
                        warned_for=ts.expiry_warned_for,
                        now=now,
                        horizon=horizon,
                    )
                ]
                for ts, expires_at in due:
                    await self._warn(ts, expires_at, now)
                # Sets not due (an expiry that moved a little) are marked too, so that the
                # query does not return them again; their warning was given already.
                await self.store.mark_expiry_warned([(ts.id, e) for ts, e in batch])
                warned += len(due)
                if len(batch) < BATCH:
                    break
        # Last: a gauge that is current means this pass's warnings were given.
        counts = await self.store.refresh_expiring_counts(lifetimes, until=now + horizon)
        for name, count in counts.items():
            self.metrics.refresh_tokens_expiring.labels(name).set(count)
        return warned

    async def _warn(self, ts: TokenSet, expires_at: float, now: float) -> None:
        log.warning(
            "refresh token expiring",
            token_set=ts.id,
            provider=ts.provider,
            refresh_token_expires_at=rfc3339(expires_at),
            expires_in_seconds=round(max(expires_at - now, 0.0)),
            detail="the absolute lifetime cannot be extended: the customer must authorize again",
        )
        if self.on_expiring is not None:
            try:
                await self.on_expiring(ts, expires_at)
            except StoreError:
                raise
            except Exception:
                # A listener's fault must not end the watcher (nor the daemon); it is logged.
                log.exception("expiry listener failed", token_set=ts.id, provider=ts.provider)
