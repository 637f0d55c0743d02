"""Every metric in one place. The names and labels are a public contract (README).

Labels are bounded: provider names come from the config, reasons and outcomes from a fixed
vocabulary in the code. A token-set id is never a label.

Most metrics describe the process that exports them. The database-wide ones (DATABASE_FIGURES:
token-set counts, expiry figures, the database's invalidation count, the hook queue, the WAL
size) would be the same on every daemon of one database, so only one daemon per database
exports them, the one whose store grants it the role (TokenStore.hold_exporter; the gauge
shows who, refresherd_database_exporter): a plain ``sum`` across daemons is then right
whether they share one database or each has its own.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Final

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from refresherd.model import InvalidationReason

# Token requests take 50 ms to a few seconds; the upper buckets catch timeouts.
DURATION_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
# The reasons of refresherd_invalidations_total (policy.decide). Their series exist from the
# start, so that increase() sees the first invalidation after a restart, too.
INVALIDATION_REASONS: Final = tuple(reason.value for reason in InvalidationReason)
# The background loops refresherd.supervisor keeps running: the task label's values.
BACKGROUND_TASKS: Final = ("hooks", "expiry", "gauges")
# The families DatabaseFigures holds (sample names without _total): exported by one daemon per
# database, never shipped from a worker.
DATABASE_FIGURES: Final = frozenset(
    {
        "refresherd_token_sets",
        "refresherd_token_sets_expired",
        "refresherd_refresh_token_expires_soonest_timestamp_seconds",
        "refresherd_refresh_tokens_expiring",
        "refresherd_database_invalidations",
        "refresherd_hook_queue",
        "refresherd_database_wal_bytes",
    }
)
_EXPORTER_NOTE: Final = " Exported by one daemon per database (refresherd_database_exporter)."
# With [daemon] workers > 1, each worker process's counters and histograms add to the
# primary's (refresherd.worker_metrics). These gauges are each process's own state and combine
# so; the other gauges are the primary's alone (its own state, or DATABASE_FIGURES).
PER_PROCESS_GAUGES: Final = {
    "refresherd_refreshes_in_flight": "sum",
    "refresherd_concurrency_limit": "sum",
    "refresherd_unpersisted_grants": "sum",
    "refresherd_provider_circuit_open": "max",
    "refresherd_storage_writable": "min",
}


class DatabaseFigures(Collector):
    """The database-wide metrics, kept in a registry of their own and exported only while
    ``exporting``: while this process holds the database's exporter role and has brought
    them up to date (Daemon._gauges). A process that does not exports none of their series,
    not even zeros, so a sum across daemons counts each database once."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = CollectorRegistry()
        self.exporting = False
        registry.register(self)

    def describe(self) -> list[Metric]:
        # The names, whether exporting or not: the outer registry checks them for clashes.
        return list(self.registry.collect())

    def collect(self) -> list[Metric]:
        return list(self.registry.collect()) if self.exporting else []


class DatabaseCounter(Collector):
    """A counter whose values are read from the database, not counted in this process (the
    exporting daemon's gauge scan sets them)."""

    def __init__(
        self,
        name: str,
        documentation: str,
        labelnames: Sequence[str],
        registry: CollectorRegistry,
    ) -> None:
        self.name = name
        self.documentation = documentation
        self.labelnames = tuple(labelnames)
        self._values: dict[tuple[str, ...], float] = {}
        registry.register(self)

    def set_all(self, values: Mapping[tuple[str, ...], float]) -> None:
        """Replace every series with ``values`` (label values in ``labelnames`` order)."""
        self._values = dict(values)

    def _family(self, values: Iterable[tuple[tuple[str, ...], float]]) -> CounterMetricFamily:
        family = CounterMetricFamily(self.name, self.documentation, labels=self.labelnames)
        for labels, value in values:
            family.add_metric(list(labels), value)
        return family

    def describe(self) -> list[Metric]:
        return [self._family(())]

    def collect(self) -> list[Metric]:
        return [self._family(sorted(self._values.items()))]


class ProviderSeries:
    """The series a refresh of one provider's token set touches on its way, looked up once:
    ``labels()`` on every refresh was a measurable share of its CPU."""

    __slots__ = ("refresh_duration", "refresh_success")

    def __init__(self, metrics: Metrics, provider: str) -> None:
        self.refresh_success = metrics.refresh_success.labels(provider)
        self.refresh_duration = metrics.refresh_duration.labels(provider)


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self._of_provider: dict[str, ProviderSeries] = {}
        # The database-wide figures: registered in ``db``, exported only while exporting.
        self.database = DatabaseFigures(r)
        db = self.database.registry
        self.database_exporter = Gauge(
            "refresherd_database_exporter",
            "1 in the one daemon of a database that exports its database-wide figures "
            "(the metrics whose help says so), 0 in the others.",
            registry=r,
        )
        self.refresh_success = Counter(
            "refresherd_refresh_success",
            "Refreshes whose new grant was persisted.",
            ["provider"],
            registry=r,
        )
        self.refresh_failures = Counter(
            "refresherd_refresh_failures",
            "Failed refresh attempts, by reason.",
            ["provider", "reason"],
            registry=r,
        )
        self.invalidations = Counter(
            "refresherd_invalidations",
            "Token sets marked invalidated: the customer must authorize again.",
            ["provider", "reason"],
            registry=r,
        )
        self.database_invalidations = DatabaseCounter(
            "refresherd_database_invalidations",
            "Token sets invalidated, counted in the database by whichever process invalidated "
            "them (a daemon, a fleet member, refresherd refresh, the API)." + _EXPORTER_NOTE,
            ["provider", "reason"],
            registry=db,
        )
        self.refresh_duration = Histogram(
            "refresherd_refresh_duration_seconds",
            "Time from claim to persisted outcome of one refresh, retries included.",
            ["provider"],
            buckets=DURATION_BUCKETS,
            registry=r,
        )
        self.token_sets = Gauge(
            "refresherd_token_sets",
            "Token sets in the database, by provider and state." + _EXPORTER_NOTE,
            ["provider", "state"],
            registry=db,
        )
        self.token_sets_expired = Gauge(
            "refresherd_token_sets_expired",
            "Active or failing token sets whose access token has expired (expires_at < now)."
            + _EXPORTER_NOTE,
            ["provider"],
            registry=db,
        )
        self.refresh_token_expires_soonest = Gauge(
            "refresherd_refresh_token_expires_soonest_timestamp_seconds",
            "Soonest absolute refresh-token expiry among a provider's live token sets (Unix "
            "time): that customer must authorize again before it. Absent where unknown."
            + _EXPORTER_NOTE,
            ["provider"],
            registry=db,
        )
        self.refresh_tokens_expiring = Gauge(
            "refresherd_refresh_tokens_expiring",
            "Live token sets whose refresh token reaches its absolute expiry within the warning "
            "horizon ([schedule] refresh_token_expiry_warning), or has reached it."
            + _EXPORTER_NOTE,
            ["provider"],
            registry=db,
        )
        self.singleflight_coalesced = Counter(
            "refresherd_singleflight_coalesced",
            "Refresh requests that joined a refresh already in flight instead of starting one.",
            registry=r,
        )
        self.grace_retries = Counter(
            "refresherd_grace_retries",
            "Retries of a possibly consumed one-time refresh token inside its grace window.",
            ["provider"],
            registry=r,
        )
        self.adopted = Counter(
            "refresherd_refresh_adopted",
            "Refreshes that found another worker had already stored a newer grant.",
            ["provider"],
            registry=r,
        )
        self.circuit_open = Gauge(
            "refresherd_provider_circuit_open",
            "1 while a provider's refreshes are paused because it refused our client credentials.",
            ["provider"],
            registry=r,
        )
        self.refresh_lateness = Histogram(
            "refresherd_refresh_lateness_seconds",
            "How long after its planned time a refresh started.",
            buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 15.0, 60.0, 300.0),
            registry=r,
        )
        self.storage_errors = Counter(
            "refresherd_storage_errors",
            "Database operations that failed.",
            registry=r,
        )
        # Storage faults (storage_health): refreshes pause while the database refuses writes.
        self.storage_writable = Gauge(
            "refresherd_storage_writable",
            "0 while the database refuses writes and refreshes are paused; 1 otherwise.",
            registry=r,
        )
        self.storage_pauses = Counter(
            "refresherd_storage_pauses",
            "Times refreshes were paused because the database refused a write, by reason.",
            ["reason"],
            registry=r,
        )
        self.storage_probes = Counter(
            "refresherd_storage_probes",
            "Probe writes made while paused, by result (ok ends the pause).",
            ["result"],
            registry=r,
        )
        self.unpersisted_grants = Gauge(
            "refresherd_unpersisted_grants",
            "Grants received from an IdP and held in memory because the database refuses "
            "them: their rotated refresh tokens exist nowhere else.",
            registry=r,
        )
        self.wal_bytes = Gauge(
            "refresherd_database_wal_bytes",
            "Size of the database's write-ahead log file (SQLite; 0 on PostgreSQL)."
            + _EXPORTER_NOTE,
            registry=db,
        )
        self.in_flight = Gauge(
            "refresherd_refreshes_in_flight",
            "Refreshes currently running.",
            registry=r,
        )
        self.concurrency_limit = Gauge(
            "refresherd_concurrency_limit",
            "Refreshes of a provider that may be in flight now: its adaptive limit"
            " (refresherd.concurrency), within [daemon] concurrency (auto: 512, up to 1,024"
            " for a distant IdP).",
            ["provider"],
            registry=r,
        )
        self.config_reloads = Counter(
            "refresherd_config_reloads",
            "SIGHUP reloads, by result.",
            ["result"],
            registry=r,
        )
        self.hook_deliveries = Counter(
            "refresherd_hook_deliveries",
            "Notification delivery attempts by target (webhook, command) and outcome "
            "(delivered, failed: retried later, given_up, lost: could not be queued).",
            ["target", "outcome"],
            registry=r,
        )
        self.hook_queue = Gauge(
            "refresherd_hook_queue",
            "Notifications queued and not yet delivered or given up." + _EXPORTER_NOTE,
            registry=db,
        )
        self.worker_processes = Gauge(
            "refresherd_worker_processes",
            "Worker processes running beside the primary ([daemon] workers - 1 when all are up).",
            registry=r,
        )
        self.worker_restarts = Counter(
            "refresherd_worker_restarts",
            "Worker processes that ended unasked and were started again.",
            registry=r,
        )
        self.http_internal_errors = Counter(
            "refresherd_http_internal_errors",
            "Requests whose handler failed unexpectedly (answered 500 and logged), by route "
            "template.",
            ["route"],
            registry=r,
        )
        self.api_token_cache_catch_ups = Counter(
            "refresherd_api_token_cache_catch_ups",
            "Reads of the database's change feed by the token cache (after any commit, by "
            "any process; on PostgreSQL one per batch of concurrent reads).",
            registry=r,
        )
        self.background_task_failures = Counter(
            "refresherd_background_task_failures",
            "Unexpected failures of a background loop (hooks: notification delivery, expiry: "
            "the refresh-token expiry watcher, gauges: the database gauges), each logged and "
            "the loop started again after a backoff.",
            ["task"],
            registry=r,
        )
        self.connect_links = Counter(
            "refresherd_connect_links",
            "Connect links handed out (their state kept in the database), by provider.",
            ["provider"],
            registry=r,
        )
        self.connections = Counter(
            "refresherd_connections",
            "Connect callbacks, by provider and outcome (connected, reconnected, access_denied, "
            "..., or why one was refused: unknown_state, ...).",
            ["provider", "outcome"],
            registry=r,
        )
        self.ready = Gauge(
            "refresherd_ready",
            "1 while the database and config are usable (what /readyz says).",
            registry=r,
        )

    def of_provider(self, provider: str) -> ProviderSeries:
        """One provider's per-refresh series (:class:`ProviderSeries`)."""
        series = self._of_provider.get(provider)
        if series is None:
            series = self._of_provider[provider] = ProviderSeries(self, provider)
        return series
