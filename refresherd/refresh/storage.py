"""Is the database taking writes, as the refreshes see it: the pause, its probes, and the grants
held in memory meanwhile.

:class:`refresherd.storage_health.StorageHealth` decides (pure); this adds what a refused write
means to the process: it is counted, the pause it starts is logged once, a probe write ends it,
and so does a stored grant. One is shared by everything that writes for refreshes (the
refresher, the scheduler) and read by what reports on them (the daemon's /readyz and gauges,
the token API, which will not spend a code while storage is paused).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from refresherd.clock import Clock
from refresherd.logs import get_logger
from refresherd.metrics import Metrics
from refresherd.storage_health import StorageHealth
from refresherd.store import StoreError, TokenStore

log = get_logger("refresherd.refresh.storage")


class StorageWatch:
    """The storage pause of one process; see the module docstring."""

    def __init__(self, *, store: TokenStore, owner: str, metrics: Metrics, clock: Clock) -> None:
        self._store = store
        self._owner = owner
        self._metrics = metrics
        self._clock = clock
        # Is the database taking writes? While it is not, no refresh starts (storage_health).
        self.health = StorageHealth()
        # Received grants the database has refused so far, held in memory and retried
        # (refresh.grants): refresherd_unpersisted_grants, and a /readyz problem.
        self.held_grants = 0

    @property
    def paused(self) -> bool:
        return self.health.paused

    def failed(self, exc: StoreError, *, during: str) -> None:
        """Count a failed database operation and pause refreshes (logged once per pause).
        ``during`` names the operation, for the log."""
        self._metrics.storage_errors.inc()
        if self.health.note_failure(exc.reason, str(exc), now=self._clock.monotonic()):
            self._metrics.storage_writable.set(0)
            self._metrics.storage_pauses.labels(exc.reason.value).inc()
            log.error(
                "storage refuses writes: refreshes paused until a probe write succeeds",
                reason=exc.reason.value,
                during=during,
                error=str(exc),
                unpersisted_grants=self.held_grants,
            )

    def took_write(self, *, via: str) -> None:
        """A write went in: storage takes writes (again, if a pause was on)."""
        paused_since = self.health.paused_since
        if self.health.note_recovered():
            self._metrics.storage_writable.set(1)
            assert paused_since is not None
            log.warning(
                "storage takes writes again: refreshes resume",
                via=via,
                paused_for=round(self._clock.monotonic() - paused_since, 1),
            )

    async def probe(self) -> bool:
        """One harmless write; a success ends the pause. Returns whether storage took it."""
        try:
            await self._store.probe_write(owner=self._owner, now=self._clock.wall())
        except StoreError as exc:
            self._metrics.storage_errors.inc()
            self._metrics.storage_probes.labels("failed").inc()
            self.health.note_probe_failed(exc.reason, str(exc), now=self._clock.monotonic())
            log.debug("storage probe failed", reason=exc.reason.value, error=str(exc))
            return False
        self._metrics.storage_probes.labels("ok").inc()
        self.took_write(via="probe")
        return True

    @contextmanager
    def holding_grant(self) -> Iterator[None]:
        """Count a received grant as held in memory while the body retries storing it."""
        self.held_grants += 1
        self._metrics.unpersisted_grants.set(self.held_grants)
        try:
            yield
        finally:
            self.held_grants -= 1
            self._metrics.unpersisted_grants.set(self.held_grants)
