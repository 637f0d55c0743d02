"""A Refresher built from its real parts as ``daemon.open_runtime`` builds it, for the tests that
drive one directly (no daemon, no scheduler), with the parts kept for the test to look at: the
providers' live set, the storage pause, the leases, the grants."""

from __future__ import annotations

import random
from collections.abc import Mapping
from dataclasses import dataclass

from refresherd.clock import Clock, SystemClock
from refresherd.events import EventQueue
from refresherd.idp.endpoint import TokenEndpoint
from refresherd.metrics import Metrics
from refresherd.refresh.grants import Grants
from refresherd.refresh.leases import Leases
from refresherd.refresh.providers import Providers
from refresherd.refresh.refresher import Refresher
from refresherd.refresh.storage import StorageWatch
from refresherd.settings import ProviderConfig, ScheduleConfig
from refresherd.store import TokenStore


@dataclass
class RefreshParts:
    providers: Providers
    storage: StorageWatch
    leases: Leases
    grants: Grants
    refresher: Refresher


def build_refresher(
    *,
    store: TokenStore,
    providers: Mapping[str, ProviderConfig],
    endpoints: Mapping[str, TokenEndpoint],
    schedule: ScheduleConfig,
    metrics: Metrics,
    owner: str,
    lease_duration: float = 30.0,
    clock: Clock | None = None,
    rng: random.Random | None = None,
) -> RefreshParts:
    clock = clock or SystemClock()
    rng = rng or random.Random()
    live = Providers(providers, endpoints, schedule)
    storage = StorageWatch(store=store, owner=owner, metrics=metrics, clock=clock)
    leases = Leases(store=store, owner=owner, duration=lease_duration, clock=clock, storage=storage)
    grants = Grants(
        store=store, owner=owner, storage=storage, metrics=metrics, clock=clock, rng=rng
    )
    refresher = Refresher(
        store=store,
        providers=live,
        leases=leases,
        grants=grants,
        storage=storage,
        metrics=metrics,
        events=EventQueue(store=store, metrics=metrics, clock=clock),
        clock=clock,
        rng=rng,
    )
    return RefreshParts(live, storage, leases, grants, refresher)
