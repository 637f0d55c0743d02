"""Composition root: builds everything, runs it in one task group, handles signals.

Shutdown is cancellation: SIGTERM/SIGINT stop the scheduler from claiming, let the refreshes in
flight finish and persist for at most ``shutdown_timeout``, then cancel what is left (its
journal entry makes the next start recover it) and exit 0. SIGHUP reloads the config.
"""

from __future__ import annotations

import contextlib
import random
import signal
import socket
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Final

import anyio
import anyio.abc
import structlog
from starlette.middleware import Middleware
from starlette.routing import BaseRoute
from starlette.types import ASGIApp

from refresherd import logs
from refresherd.clock import Clock, SystemClock
from refresherd.config import load_config
from refresherd.connect import EXPIRED_STATE_KEPT
from refresherd.encryption import cipher_for
from refresherd.events import EventQueue
from refresherd.expiry import ExpiryWatcher
from refresherd.hooks import Hooks
from refresherd.idp.discovery import EX_UNAVAILABLE, DiscoveryError, resolve_providers
from refresherd.idp.endpoint import TokenEndpoint
from refresherd.intake import MAX_GRACE_PERIOD
from refresherd.metrics import BACKGROUND_TASKS, INVALIDATION_REASONS, Metrics
from refresherd.model import State, TokenSet, rfc3339
from refresherd.refresh.grants import PERSIST_DEADLINE, PERSIST_RETRY_MAX, Grants
from refresherd.refresh.leases import Leases
from refresherd.refresh.providers import Providers
from refresherd.refresh.refresher import Refresher
from refresherd.refresh.storage import StorageWatch
from refresherd.scheduler import Scheduler
from refresherd.sdnotify import Notifier
from refresherd.settings import (
    EX_CONFIG,
    Config,
    ConfigError,
    ProviderConfig,
    concurrency_ceiling,
    far_concurrency_ceiling,
    share_problem,
)
from refresherd.storage_health import StorageReason
from refresherd.store import DatabaseMisconfigured, StoreError, TokenStore, open_store
from refresherd.supervisor import supervise
from refresherd.web.app import bind_socket, bind_unix_socket, build_app, serve
from refresherd.web.auth import BearerAuth, BearerCheck
from refresherd.web.connect import ConnectRoutes
from refresherd.web.token_cache import FreshReads, TokenCache
from refresherd.web.tokens import TokenApi
from refresherd.worker_metrics import merged_registry
from refresherd.workers import (
    WorkerPool,
    process_share,
    publish_snapshots,
    wait_for_primary_to_end,
    write_snapshot,
)

log = logs.get_logger("refresherd.daemon")

GAUGE_INTERVAL: Final = 10.0
# How often old notifications are pruned (Daemon._prune_events).
PRUNE_INTERVAL: Final = 3600.0
# The gauge queries scan every token set: at most this share of the time goes to them, so a
# million sets stretch the interval rather than steal a core (20x their own duration).
GAUGE_DUTY: Final = 0.05
# The gauge task's readiness check (refresherd_ready) gives up on a database this slow.
READINESS_TIMEOUT: Final = 5.0
HEARTBEAT_INTERVAL: Final = 1.0
# The event loop is called stuck when the heartbeat is this late.
LIVENESS_LIMIT: Final = 15.0
# How long the HTTP listener may take to close after the refreshes have drained.
SERVER_STOP_TIMEOUT: Final = 5.0
# Exit status when the owner registration is lost (sysexits EX_TEMPFAIL): restart and retry.
EX_TEMPFAIL: Final = 75
# Beyond a worker's own drain and persist deadlines, for its store calls and its exit.
WORKER_STOP_MARGIN: Final = 10.0


def build_endpoints(providers: Mapping[str, ProviderConfig]) -> dict[str, TokenEndpoint]:
    return {name: TokenEndpoint(p) for name, p in providers.items()}


async def resolve_config(config: Config, *, fresh: bool = False) -> Config:
    """``config`` with the token URLs of providers given by ``issuer`` discovered."""
    if not any(p.issuer is not None and not p.token_url for p in config.providers.values()):
        return config
    return replace(config, providers=await resolve_providers(config.providers, fresh=fresh))


def max_grace(config: Config) -> float:
    return max((p.grace_period for p in config.providers.values()), default=0.0)


@dataclass
class Runtime:
    """The parts one refresh needs, shared by the daemon and `refresherd refresh ID`: built by
    :func:`open_runtime`, each handed to what needs it (the refresher, the scheduler, the token
    API), never read back out of the refresher."""

    config: Config
    store: TokenStore
    owner: str
    metrics: Metrics
    # The providers' live set: settings, endpoints, throttles, circuits (a reload replaces it).
    providers: Providers
    # Is the database taking writes (the pause, its probes, the grants held in memory).
    storage: StorageWatch
    # This process's leases: the owner id and the lease duration (a reload sets it).
    leases: Leases
    # Grant persistence; ``hold`` while the daemon runs (a refused grant is held until stored).
    grants: Grants
    # Token-set events, queued in the database (a [hooks] dispatcher here is woken by them).
    events: EventQueue
    refresher: Refresher


@asynccontextmanager
async def open_runtime(
    config: Config, *, clock: Clock | None = None, metrics: Metrics | None = None
) -> AsyncIterator[Runtime]:
    """Open the store, register as a lease owner and build the refresher; undo it all on exit.

    Providers configured by ``issuer`` are resolved first (:class:`DiscoveryError` if one cannot).
    """
    config = await resolve_config(config)
    store = await open_store(config.daemon.database, cipher=cipher_for(config.encryption))
    endpoints: dict[str, TokenEndpoint] = {}
    try:
        async with store.owner(config.daemon.instance_name) as owner:
            try:
                metrics = metrics or Metrics()
                clock = clock or SystemClock()
                rng = random.Random()
                endpoints = build_endpoints(config.providers)
                providers = Providers(
                    config.providers,
                    endpoints,
                    config.schedule,
                    concurrency=concurrency_ceiling(config.daemon),
                    far_concurrency=far_concurrency_ceiling(config.daemon),
                )
                storage = StorageWatch(store=store, owner=owner, metrics=metrics, clock=clock)
                leases = Leases(
                    store=store,
                    owner=owner,
                    duration=config.daemon.lease_duration,
                    clock=clock,
                    storage=storage,
                )
                grants = Grants(
                    store=store, owner=owner, storage=storage, metrics=metrics, clock=clock, rng=rng
                )
                # Invalidations and recoveries, queued in the database whatever the process
                # and its [hooks] (refresherd.events).
                events = EventQueue(store=store, metrics=metrics, clock=clock)
                refresher = Refresher(
                    store=store,
                    providers=providers,
                    leases=leases,
                    grants=grants,
                    storage=storage,
                    metrics=metrics,
                    events=events,
                    clock=clock,
                    rng=rng,
                )
                yield Runtime(
                    config,
                    store,
                    owner,
                    metrics,
                    providers=providers,
                    storage=storage,
                    leases=leases,
                    grants=grants,
                    events=events,
                    refresher=refresher,
                )
            finally:
                with anyio.CancelScope(shield=True):
                    try:
                        await store.release_all(owner=owner)
                    except StoreError as exc:
                        log.warning("could not release leases at exit", error=str(exc))
                    for endpoint in endpoints.values():
                        await endpoint.aclose()
    finally:
        with anyio.CancelScope(shield=True):
            await store.close()


class Daemon:
    def __init__(
        self,
        config: Config,
        *,
        config_path: Path | None = None,
        clock: Clock | None = None,
        on_ready: Callable[[Daemon], None] | None = None,
        worker: int | None = None,
    ) -> None:
        self.config = config
        # None: the primary; 1..workers-1: a worker process it started (refresherd.workers).
        self.worker = worker
        self.pool: WorkerPool | None = None
        self.config_path = config_path
        self.clock = clock or SystemClock()
        self.on_ready = on_ready
        self._stop = anyio.Event()
        self._beat = self.clock.monotonic()
        self._rt: Runtime | None = None
        self._scheduler: Scheduler | None = None
        self._tg: anyio.abc.TaskGroup | None = None
        self.listen_address: tuple[str, int] | None = None
        self.notifier = Notifier()
        self._ready = False
        # The hook dispatcher (None without a [hooks] target). Events are queued without it.
        self.hooks: Hooks | None = None
        self._pruned_at = float("-inf")
        self._exit_code = 0
        # Whether the last gauge cycle found this daemon the database's exporter (_gauges).
        self._exporter = False

    def request_stop(self) -> None:
        self._stop.set()

    @property
    def index(self) -> int:
        """This process's number among [daemon] workers: 0 for the primary."""
        return self.worker or 0

    async def run(self) -> int:
        config = self.config
        for warning in config.warnings:
            log.warning("config", warning=warning)
        if self.worker is not None:
            structlog.contextvars.bind_contextvars(worker=self.worker)
        if self.worker is None and self.config_path is None and config.daemon.workers > 1:
            log.warning("[daemon] workers needs a config file; running one process")
            config = replace(config, daemon=replace(config.daemon, workers=1))
        try:
            config = self.config = process_share(await resolve_config(config), self.index)
        except DiscoveryError as exc:
            log.error(
                "cannot discover the token endpoint",
                provider=exc.provider,
                url=exc.url,
                error=str(exc),
            )
            return EX_UNAVAILABLE
        sock = None
        unix_sock = None
        if self.worker is None and config.api.enabled and config.api.unix_socket is not None:
            try:
                unix_sock = bind_unix_socket(config.api.unix_socket, config.api.unix_socket_mode)
            except OSError as exc:
                log.error("cannot listen", socket=str(config.api.unix_socket), error=str(exc))
                return 1
        if self.worker is None and config.server.enabled:
            try:
                sock = bind_socket(config.server.host, config.server.port)
            except OSError as exc:
                log.error(
                    "cannot listen",
                    address=f"{config.server.host}:{config.server.port}",
                    error=str(exc),
                )
                if unix_sock is not None:
                    unix_sock.close()
                return 1
            self.listen_address = sock.getsockname()[:2]
        sockets = [s for s in (sock, unix_sock) if s is not None]
        try:
            async with open_runtime(config, clock=self.clock) as rt:
                self._rt = rt
                return await self._run(rt, sockets)
        except DatabaseMisconfigured as exc:
            # Where the config puts the database cannot work: a restart would fail the same
            # way, so exit EX_CONFIG, which systemd does not restart (RestartPreventExitStatus).
            log.error("cannot use the database", error=str(exc), exit_code=EX_CONFIG)
            return EX_CONFIG
        except StoreError as exc:
            log.error("cannot use the database", error=str(exc))
            return 1
        finally:
            for s in sockets:
                s.close()
            if unix_sock is not None and config.api.unix_socket is not None:
                with contextlib.suppress(OSError):
                    config.api.unix_socket.unlink()

    async def _run(self, rt: Runtime, sockets: list[socket.socket]) -> int:
        config = self.config
        self._init_metrics(rt)
        scheduler = Scheduler(
            store=rt.store,
            refresher=rt.refresher,
            leases=rt.leases,
            storage=rt.storage,
            metrics=rt.metrics,
            providers=rt.providers,
            poll_interval=config.daemon.poll_interval,
            max_grace_period=max_grace(config),
            clock=self.clock,
        )
        self._scheduler = scheduler
        server_stop = anyio.Event()
        server_done = anyio.Event()
        if self.worker is None and config.daemon.workers > 1:
            assert self.config_path is not None  # run() made it one process otherwise
            self.pool = WorkerPool(
                count=config.daemon.workers - 1,
                config_path=self.config_path,
                database=str(config.daemon.database),
                metrics=rt.metrics,
                timeout=config.daemon.worker_timeout,
            )
        async with self._token_cache(rt, sockets) as cache, anyio.create_task_group() as tg:
            app = self._app(rt, scheduler, cache)
            self._tg = tg
            # Handlers first: from the "started" line on, a signal is handled, never fatal.
            await tg.start(self._signals, tg.cancel_scope)
            log.info(
                "refresherd started",
                database=str(config.daemon.database),
                owner=rt.owner,
                workers=config.daemon.workers,
                providers=sorted(config.providers),
                listen=f"{self.listen_address[0]}:{self.listen_address[1]}"
                if self.listen_address
                else None,
            )
            tg.start_soon(self._heartbeat)
            tg.start_soon(self._watch_owner, rt)
            if config.hooks.enabled:
                hooks = Hooks(
                    store=rt.store, config=config.hooks, metrics=rt.metrics, clock=self.clock
                )
                self.hooks = hooks
                # Events queued in this process (the refresher's, the expiry watcher's) wake
                # the dispatcher at once.
                rt.events.on_queued = hooks.wake
                tg.start_soon(self._notify, hooks)
            if self.worker is None:
                # The whole database's gauges, expiry and event pruning (after the hooks,
                # which it may notify): the primary's job alone. Supervised (as the hook
                # dispatcher): a fault of theirs must not end the daemon.
                gauges = partial(self._gauges, rt)
                tg.start_soon(partial(supervise, "gauges", gauges, metrics=rt.metrics))
                expiry = self._expiry_watcher(rt).run
                tg.start_soon(partial(supervise, "expiry", expiry, metrics=rt.metrics))
            else:
                tg.start_soon(publish_snapshots, rt.metrics)
                tg.start_soon(self._stop_with_primary)
            if sockets:
                tg.start_soon(self._serve, app, sockets, server_stop, server_done)
            else:
                server_done.set()
            # A grant the database refuses is held until it takes it (until shutdown starts);
            # set before the scheduler starts, whose crash recovery may refresh at once.
            rt.grants.hold = True
            await tg.start(self._work, scheduler, server_stop, server_done, tg.cancel_scope)
            if self.pool is not None:
                tg.start_soon(self.pool.run)
            # The store is open and migrated, the listener bound, the scheduler running.
            self.notifier.notify("READY=1", "STATUS=refreshing token sets")
            self._ready = True
            if self.on_ready is not None:
                self.on_ready(self)
        if self.worker is not None:
            write_snapshot(rt.metrics)  # the last counts, for the primary's totals
        log.info("refresherd stopped", exit_code=self._exit_code)
        return self._exit_code

    async def _stop_with_primary(self) -> None:
        await wait_for_primary_to_end()
        if not self._stop.is_set():
            log.warning("the primary process is gone; stopping")
            self.request_stop()

    async def _watch_owner(self, rt: Runtime) -> None:
        """Stop when this process's owner registration is lost (PostgreSQL: the session that
        holds it ended): other daemons may take our leases over from then on, so no new
        refresh may start here. Refreshes in flight drain and persist by compare-and-swap."""
        await rt.store.owner_lost()
        log.error(
            "lost the owner registration that keeps this daemon's leases; stopping so that "
            "a restart registers again",
            owner=rt.owner,
        )
        self._exit_code = EX_TEMPFAIL
        self.request_stop()

    @staticmethod
    async def _notify(hooks: Hooks) -> None:
        """The hook dispatcher; cancelled at shutdown, its queue kept in the database."""
        try:
            await supervise("hooks", hooks.run, metrics=hooks.metrics)
        finally:
            with anyio.CancelScope(shield=True):
                await hooks.aclose()

    @asynccontextmanager
    async def _token_cache(
        self, rt: Runtime, sockets: list[socket.socket]
    ) -> AsyncIterator[TokenCache | None]:
        """The token API's answers in memory, with the store's change feed open for as long
        as the server runs; None when nothing serves the API or ``cache_size`` is 0."""
        api = self.config.api
        if not (api.enabled and sockets and api.cache_size > 0):
            yield None
            return
        async with rt.store.change_feed() as feed:
            yield TokenCache(feed, size=api.cache_size, metrics=rt.metrics)

    def _app(self, rt: Runtime, scheduler: Scheduler, cache: TokenCache | None) -> ASGIApp:
        """Health and metrics, the token API when ``[api] enabled`` (connect links with it),
        and the public connect callback: one app."""
        api = self.config.api
        routes: list[BaseRoute] = []
        middleware: list[Middleware] = []
        check: BearerCheck | None = None
        connecting = ConnectRoutes(
            store=rt.store,
            refresher=rt.refresher,
            providers=rt.providers,
            storage=rt.storage,
            events=rt.events,
            metrics=rt.metrics,
            config=api,
            clock=self.clock,
            wake=scheduler.wake,
        )
        if api.enabled:
            assert api.bearer_token is not None  # the config requires it
            token_api = TokenApi(
                store=rt.store,
                refresher=rt.refresher,
                providers=rt.providers,
                storage=rt.storage,
                events=rt.events,
                config=api,
                clock=self.clock,
                wake=scheduler.wake,
                cache=cache,
            )
            routes = token_api.routes() + connecting.link_routes()
            check = BearerCheck(bearer=api.bearer_token, tcp=api.tcp)
            middleware = [Middleware(BearerAuth, check=check)]
        # Public, whatever [api] says: the customer's browser comes back here from the IdP.
        routes += connecting.callback_routes()
        app = build_app(
            metrics=rt.metrics,
            liveness=self._liveness,
            readiness=self._readiness,
            api_routes=routes,
            middleware=middleware,
            exposed=(
                None
                if self.pool is None
                else merged_registry(rt.metrics.registry, self.pool.snapshots)
            ),
        )
        if cache is None or check is None:
            return app
        # Fresh answers from memory in front of the whole app (web/token_cache.py).
        return FreshReads(app, cache=cache, check=check, clock=self.clock)

    @staticmethod
    async def _serve(
        app: ASGIApp,
        sockets: list[socket.socket],
        server_stop: anyio.Event,
        server_done: anyio.Event,
    ) -> None:
        try:
            await serve(app, sockets, server_stop)
        finally:
            server_done.set()

    async def _work(
        self,
        scheduler: Scheduler,
        server_stop: anyio.Event,
        server_done: anyio.Event,
        root: anyio.CancelScope,
        *,
        task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
    ) -> None:
        """Run the scheduler until asked to stop, drain in-flight refreshes, end everything."""
        assert self._rt is not None
        refresher = self._rt.refresher
        async with anyio.create_task_group() as work:
            # Flights live in the work group: the drain deadline below bounds them too.
            await work.start(refresher.run)
            await work.start(scheduler.run)
            task_status.started()
            await self._stop.wait()
            log.info("shutting down", in_flight=scheduler.running)
            if self.pool is not None:
                # The workers drain alongside; each may also hold a grant the database
                # refuses for PERSIST_DEADLINE, between retries up to PERSIST_RETRY_MAX apart.
                await self.pool.begin_stop(
                    max(self.config.daemon.shutdown_timeout, PERSIST_DEADLINE + PERSIST_RETRY_MAX)
                    + WORKER_STOP_MARGIN
                )
            if self._rt is not None:
                # From now on a grant storage refuses is held for PERSIST_DEADLINE (grants).
                self._rt.grants.hold = False
            self.notifier.notify("STOPPING=1", "STATUS=draining in-flight refreshes")
            scheduler.stop()
            refresher.close()
            # Bounded drain: refreshes in flight may finish and persist until the deadline.
            work.cancel_scope.deadline = anyio.current_time() + self.config.daemon.shutdown_timeout
        if work.cancel_scope.cancelled_caught:
            log.warning(
                "shutdown timeout: cancelled refreshes still in flight; "
                "their journal entries will be recovered at the next start"
            )
        if self.pool is not None:
            await self.pool.stop()  # /metrics stays up meanwhile
        # Let the listener close its connections (a scraper's keep-alive one, say) and finish
        # the requests in progress before the root scope is cancelled.
        server_stop.set()
        with anyio.move_on_after(SERVER_STOP_TIMEOUT):
            await server_done.wait()
        root.cancel()

    async def _signals(
        self,
        root: anyio.CancelScope,
        *,
        task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
    ) -> None:
        signalled = False
        with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
            task_status.started()
            async for signum in signals:
                if signum == signal.SIGHUP:
                    await self.reload()
                    if self.pool is not None:
                        self.pool.reload()
                elif signalled:
                    log.warning("second stop signal: cancelling at once")
                    root.cancel()
                else:
                    # The first stop *signal*: a stop for another reason (a worker's primary
                    # gone, the owner registration lost) does not make it the second.
                    signalled = True
                    log.info("stop signal", signal=signal.Signals(signum).name)
                    self._stop.set()

    async def reload(self) -> None:
        """Re-read the config; keep the old one, and say why, if the new one is bad."""
        self.notifier.notify("RELOADING=1")
        try:
            await self._reload()
        finally:
            self.notifier.notify("READY=1")

    async def _reload(self) -> None:
        assert self._rt is not None
        rt = self._rt
        if self.config_path is None:
            log.warning("reload requested but the config did not come from a file")
            return
        try:
            new = await resolve_config(load_config(self.config_path), fresh=True)
            file_workers = new.daemon.workers
            # The processes running are what they are until a restart; a changed `workers`
            # is logged below, and the limits are shared out among those running.
            new = replace(new, daemon=replace(new.daemon, workers=self.config.daemon.workers))
            problem = share_problem(new.daemon, new.providers)
            if problem is not None:
                raise ConfigError(str(self.config_path), *problem)
            new = process_share(new, self.index)
        except (ConfigError, DiscoveryError) as exc:
            rt.metrics.config_reloads.labels("error").inc()
            log.error("reload failed, keeping the running config", error=str(exc))
            return
        old = self.config
        for changed, what in (
            (new.daemon.database != old.daemon.database, "daemon.database"),
            (new.server != old.server, "server.listen"),
            (new.api != old.api, "api"),
            (new.hooks != old.hooks, "hooks"),
            (new.encryption != old.encryption, "encryption"),
            (file_workers != old.daemon.workers, "daemon.workers"),
        ):
            if changed:
                log.warning("this setting only takes effect after a restart", key=what)
        for warning in new.warnings:
            log.warning("config", warning=warning)
        old_endpoints = rt.providers.endpoints
        endpoints = {
            name: old_endpoints[name]
            if name in old_endpoints and old.providers.get(name) == p
            else TokenEndpoint(p)
            for name, p in new.providers.items()
        }
        # In-flight refreshes keep the settings and endpoint they started with.
        rt.providers.reconfigure(
            providers=new.providers,
            endpoints=endpoints,
            schedule=new.schedule,
            concurrency=concurrency_ceiling(new.daemon),
            far_concurrency=far_concurrency_ceiling(new.daemon),
        )
        rt.leases.duration = new.daemon.lease_duration
        retired = [e for name, e in old_endpoints.items() if endpoints.get(name) is not e]
        if self._scheduler is not None:
            self._scheduler.poll_interval = new.daemon.poll_interval
            self._scheduler.max_grace_period = max_grace(new)
            self._scheduler.wake()
        if self.pool is not None:
            self.pool.timeout = new.daemon.worker_timeout
        self.config = new
        self._init_metrics(rt)
        rt.metrics.config_reloads.labels("ok").inc()
        # Announced at the more verbose of the old and new levels, so that a reload that changes
        # the log level (say, info to warning) is still confirmed; then the new level applies.
        verbose = min(old.log.level, new.log.level, key=lambda level: logs.LEVELS[level])
        logs.configure(verbose, new.log.format)
        log.info("config reloaded", providers=sorted(new.providers), log_level=new.log.level)
        logs.configure(new.log.level, new.log.format)
        # Refreshes in flight may still use a retired endpoint: close it once they are done.
        if retired:
            # A retry series may run through a whole grace window: the provider's, or a token
            # set's own (per-set policy), which may be longer.
            try:
                set_grace = await rt.store.max_set_grace_period()
            except StoreError:
                set_grace = MAX_GRACE_PERIOD  # unknown: assume the longest a set may carry
            longest = max(
                p.request_timeout + max(p.grace_period, set_grace) for p in old.providers.values()
            )
            await self._close_later(retired, longest)

    async def _close_later(self, endpoints: list[TokenEndpoint], delay: float) -> None:
        async def close() -> None:
            try:
                await anyio.sleep(delay * 2 + 5)
            finally:
                with anyio.CancelScope(shield=True):
                    for e in endpoints:
                        await e.aclose()

        # Owned by the root task group: it ends with the daemon at the latest.
        assert self._tg is not None
        self._tg.start_soon(close)

    def _init_metrics(self, rt: Runtime) -> None:
        """Every provider's series exist from the start, so rate() and alerts work at once."""
        for name in self.config.providers:
            rt.metrics.refresh_success.labels(name)
            rt.metrics.grace_retries.labels(name)
            rt.metrics.token_sets_expired.labels(name)
            rt.metrics.refresh_tokens_expiring.labels(name)
            for reason in INVALIDATION_REASONS:
                rt.metrics.invalidations.labels(name, reason)
            rt.metrics.circuit_open.labels(name).set(
                1 if rt.providers.circuits.is_open(name) else 0
            )
            for state in State:
                rt.metrics.token_sets.labels(name, state.value)
        rt.metrics.storage_writable.set(0 if rt.storage.paused else 1)
        for reason in StorageReason:
            rt.metrics.storage_pauses.labels(reason.value)
        for result in ("ok", "failed"):
            rt.metrics.storage_probes.labels(result)
        for task in BACKGROUND_TASKS:
            rt.metrics.background_task_failures.labels(task)

    def _expiry_watcher(self, rt: Runtime) -> ExpiryWatcher:
        # Queued with or without [hooks]: the warning is given once per expiry (marked in the
        # database), and a daemon of the fleet that has [hooks] delivers it.
        events = rt.events

        async def expiring(ts: TokenSet, expires_at: float) -> None:
            if events is not None:
                await events.enqueue(
                    "refresh_token.expiring",
                    ts.id,
                    ts.provider,
                    refresh_expires_at=expires_at,
                    refresh_expires_at_rfc3339=rfc3339(expires_at),
                )

        return ExpiryWatcher(
            store=rt.store,
            metrics=rt.metrics,
            clock=self.clock,
            providers=lambda: self.config.providers,
            schedule=lambda: self.config.schedule,
            on_expiring=expiring,
        )

    async def _heartbeat(self) -> None:
        """Proves the event loop runs: for /healthz, and for systemd's watchdog."""
        interval = HEARTBEAT_INTERVAL
        if self.notifier.watchdog_interval is not None:
            interval = min(interval, self.notifier.watchdog_interval)
        while True:
            self._beat = self.clock.monotonic()
            # Pings start after READY=1: before it, systemd's start timeout is the guard.
            if self._ready and self.notifier.watchdog_interval is not None:
                self.notifier.notify("WATCHDOG=1")
            await anyio.sleep(interval)

    async def _gauges(self, rt: Runtime) -> None:
        while True:
            started = self.clock.monotonic()
            if await self._hold_exporter(rt):
                await self._database_figures(rt)
            took = self.clock.monotonic() - started
            await self._prune_events(rt)
            await self._checkpoint(rt)
            # What /readyz would say, also when nothing polls /readyz (a scrape of /metrics only).
            problems = ["timed out"]
            with anyio.move_on_after(READINESS_TIMEOUT):
                problems = await self._readiness()
            rt.metrics.ready.set(0 if problems else 1)
            await anyio.sleep(max(GAUGE_INTERVAL, took / GAUGE_DUTY))

    async def _hold_exporter(self, rt: Runtime) -> bool:
        """Is this daemon the one of its database that exports the database-wide figures
        (metrics.DATABASE_FIGURES)? It becomes it if none is; asked every cycle, so when the
        exporter dies another daemon takes over at its next cycle. One that is not exports
        none of their series, and runs none of their queries."""
        try:
            exporter = await rt.store.hold_exporter()
        except StoreError as exc:
            log.warning(
                "cannot tell whether this daemon exports the database's figures; exporting none",
                error=str(exc),
            )
            exporter = False
        if exporter != self._exporter:
            self._exporter = exporter
            if exporter:
                log.info("this daemon now exports the database-wide figures")
            else:
                log.warning("this daemon no longer exports the database-wide figures")
        rt.metrics.database_exporter.set(1 if exporter else 0)
        if not exporter:
            rt.metrics.database.exporting = False
        return exporter

    async def _database_figures(self, rt: Runtime) -> None:
        """Bring the database-wide figures up to date, and export them once they are: a
        daemon that just took the role shows nothing older than this cycle. (On a failure
        later on, the exporter keeps its last figures, as a gauge does.)"""
        current = await self._token_set_figures(rt)
        current = await self._database_invalidations(rt) and current
        try:
            rt.metrics.hook_queue.set(await rt.store.pending_hooks())
        except StoreError as exc:
            log.warning("cannot count queued notifications", error=str(exc))
            current = False
        if current:
            rt.metrics.database.exporting = True

    async def _token_set_figures(self, rt: Runtime) -> bool:
        try:
            counts = await rt.store.counts()
            expired = await rt.store.expired_counts(now=self.clock.wall())
            soonest = await rt.store.refresh_expiry_soonest(
                {n: p.refresh_token_lifetime for n, p in self.config.providers.items()}
            )
        except StoreError as exc:
            log.warning("cannot count token sets", error=str(exc))
            return False
        providers = set(self.config.providers) | {p for p, _ in counts}
        for provider in providers:
            for state in State:
                rt.metrics.token_sets.labels(provider, state.value).set(
                    counts.get((provider, state.value), 0)
                )
            rt.metrics.token_sets_expired.labels(provider).set(expired.get(provider, 0))
            # Absent, not 0, where no expiry is known: 0 would read as "long expired".
            if provider in soonest:
                rt.metrics.refresh_token_expires_soonest.labels(provider).set(soonest[provider])
            else:
                with contextlib.suppress(KeyError):
                    rt.metrics.refresh_token_expires_soonest.remove(provider)
        return True

    async def _database_invalidations(self, rt: Runtime) -> bool:
        """refresherd_database_invalidations_total from the database's own count, which every
        process's invalidations add to (the CLI's too). Every configured provider's series of
        the known reasons exist from the start, at 0, so that increase() sees the first one."""
        try:
            counts = await rt.store.invalidation_counts()
        except StoreError as exc:
            log.warning("cannot count invalidations", error=str(exc))
            return False
        values: dict[tuple[str, ...], float] = {
            (provider, reason): 0.0
            for provider in self.config.providers
            for reason in INVALIDATION_REASONS
        }
        values.update({key: float(count) for key, count in counts.items()})
        rt.metrics.database_invalidations.set_all(values)
        return True

    async def _prune_events(self, rt: Runtime) -> None:
        """Events that no daemon with [hooks] took within hooks.give_up_after (none delivers
        for this database, or none ran for that long) and finished deliveries that old are
        deleted: the queue stays bounded whether or not anyone delivers. So are connect links
        expired for longer than connect.EXPIRED_STATE_KEPT."""
        now = self.clock.monotonic()
        if now < self._pruned_at + PRUNE_INTERVAL:
            return
        self._pruned_at = now
        if rt.storage.paused:  # a paused store is probed, not written to
            return
        try:
            events, deliveries = await rt.store.prune_events(
                before=self.clock.wall() - self.config.hooks.give_up_after
            )
        except StoreError as exc:
            log.warning("cannot prune old notifications", error=str(exc))
            return
        if events:
            # Info: where no daemon has [hooks], this is the expected end of every event.
            log.info(
                "notifications dropped: no daemon with [hooks] took them in time",
                events=events,
                give_up_after=self.config.hooks.give_up_after,
            )
        if deliveries:
            log.info("old notification deliveries pruned", deliveries=deliveries)
        try:
            links = await rt.store.prune_connect_states(
                expired_before=self.clock.wall() - EXPIRED_STATE_KEPT
            )
        except StoreError as exc:
            log.warning("cannot prune expired connect links", error=str(exc))
            return
        if links:
            log.info("expired connect links pruned", links=links)

    async def _checkpoint(self, rt: Runtime) -> None:
        """A passive checkpoint, so the WAL is copied back while the daemon is idle, too (a
        long-lived reader may have held it back); the file's size is a gauge."""
        if not rt.storage.paused:  # a paused store is probed, not written to
            try:
                await rt.store.checkpoint()
            except StoreError as exc:
                log.warning("cannot checkpoint the database", error=str(exc))
        rt.metrics.wal_bytes.set(rt.store.wal_bytes())

    def _liveness(self) -> list[str]:
        late = self.clock.monotonic() - self._beat
        if late > LIVENESS_LIMIT:
            return [f"event loop heartbeat is {late:.0f}s late"]
        return []

    async def _readiness(self) -> list[str]:
        problems: list[str] = []
        if self._stop.is_set():
            problems.append("shutting down")
        if self._rt is None:
            return [*problems, "not started"]
        health = self._rt.storage.health
        if health.paused and health.reason is not None:
            # Known without asking the database, which may be locked: a ping would only queue
            # behind the blocked writes and time the answer out.
            problems.append(
                f"storage: the database refuses writes ({health.reason.value}); refreshes are "
                f"paused until it takes them again: {health.detail}"
            )
        else:
            try:
                await self._rt.store.ping()
            except StoreError as exc:
                problems.append(f"database: {exc}")
        if self._scheduler is not None and not self._scheduler.storage_ok:
            problems.append("database: the scheduler cannot read it")
        held = self._rt.storage.held_grants
        if held:
            problems.append(
                f"storage: {held} received grant(s) held in memory, not yet persisted; "
                "do not kill refresherd"
            )
        return problems
