"""How worker processes' metrics join the primary's /metrics (refresherd.worker_metrics): pure,
on real prometheus_client registries, read back with prometheus_client's own parser."""

from __future__ import annotations

import json

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from refresherd.metrics import DATABASE_FIGURES, Metrics
from refresherd.worker_metrics import (
    Snapshot,
    decode,
    encode,
    merged_registry,
    retire,
    take_snapshot,
)


def exposed(primary: Metrics, snapshots: list[Snapshot]) -> dict[tuple[str, frozenset], float]:
    text = generate_latest(merged_registry(primary.registry, lambda: snapshots)).decode()
    values = {}
    names = set()
    for family in text_string_to_metric_families(text):
        assert family.name not in names, f"{family.name} exposed twice"
        names.add(family.name)
        for s in family.samples:
            values[(s.name, frozenset(s.labels.items()))] = s.value
    return values


def value(values: dict[tuple[str, frozenset], float], name: str, **labels: str) -> float:
    return values[(name, frozenset(labels.items()))]


def shipped(worker: Metrics) -> Snapshot:
    """What the primary receives: through JSON, as on the pipe."""
    return decode(json.loads(json.dumps(encode(take_snapshot(worker.registry)))))


def test_counters_and_histograms_add_up() -> None:
    primary, worker = Metrics(), Metrics()
    primary.refresh_success.labels("p").inc(3)
    worker.refresh_success.labels("p").inc(4)
    primary.refresh_duration.labels("p").observe(0.02)
    worker.refresh_duration.labels("p").observe(0.2)
    worker.refresh_duration.labels("p").observe(3.0)
    values = exposed(primary, [shipped(worker)])
    assert value(values, "refresherd_refresh_success_total", provider="p") == 7
    assert value(values, "refresherd_refresh_duration_seconds_count", provider="p") == 3
    assert value(values, "refresherd_refresh_duration_seconds_sum", provider="p") == pytest.approx(
        3.22
    )
    bucket = "refresherd_refresh_duration_seconds_bucket"
    assert value(values, bucket, provider="p", le="0.025") == 1
    assert value(values, bucket, provider="p", le="0.25") == 2
    assert value(values, bucket, provider="p", le="+Inf") == 3


def test_a_series_only_a_worker_has_is_exposed() -> None:
    primary, worker = Metrics(), Metrics()
    worker.refresh_failures.labels("p", "timeout").inc()
    worker.refresh_duration.labels("q").observe(1.0)
    values = exposed(primary, [shipped(worker)])
    assert value(values, "refresherd_refresh_failures_total", provider="p", reason="timeout") == 1
    assert value(values, "refresherd_refresh_duration_seconds_count", provider="q") == 1


def test_per_process_gauges_combine_by_their_rule_and_database_gauges_are_the_primarys() -> None:
    primary, w1, w2 = Metrics(), Metrics(), Metrics()
    for m, in_flight, circuit, writable in ((primary, 2, 0, 1), (w1, 5, 1, 1), (w2, 1, 0, 0)):
        m.in_flight.set(in_flight)
        m.circuit_open.labels("p").set(circuit)
        m.storage_writable.set(writable)
        # Counted from the database by the exporting primary alone: a worker's value is never
        # added, not even from a worker that (wrongly) exported them.
        m.token_sets.labels("p", "active").set(100)
        m.database_invalidations.set_all({("p", "invalid_grant"): 3.0})
        m.hook_queue.set(7)
        m.database.exporting = True
    values = exposed(primary, [shipped(w1), shipped(w2)])
    assert value(values, "refresherd_refreshes_in_flight") == 8
    assert value(values, "refresherd_provider_circuit_open", provider="p") == 1
    assert value(values, "refresherd_storage_writable") == 0
    assert value(values, "refresherd_token_sets", provider="p", state="active") == 100
    invalidations = "refresherd_database_invalidations_total"
    assert value(values, invalidations, provider="p", reason="invalid_grant") == 3
    assert value(values, "refresherd_hook_queue") == 7
    snapshot = take_snapshot(w1.registry)
    assert not DATABASE_FIGURES & set(snapshot), DATABASE_FIGURES & set(snapshot)


def test_a_primary_that_is_not_the_exporter_exposes_no_database_figure() -> None:
    primary, worker = Metrics(), Metrics()
    for m in (primary, worker):
        m.token_sets.labels("p", "active").set(100)
        m.database_invalidations.set_all({("p", "invalid_grant"): 3.0})
    primary.database_exporter.set(0)
    values = exposed(primary, [shipped(worker)])
    names = {name for name, _ in values}
    assert not {n for n in names if n.removesuffix("_total") in DATABASE_FIGURES}, names
    assert value(values, "refresherd_database_exporter") == 0


def test_database_figures_names_the_families_kept_apart() -> None:
    """DATABASE_FIGURES (what worker_metrics never ships) is exactly what DatabaseFigures
    holds, so a database-wide metric cannot be added to one and not the other."""
    m = Metrics()
    assert {f.name for f in m.database.registry.collect()} == DATABASE_FIGURES
    main = {f.name for f in m.registry.collect()}
    assert not main & DATABASE_FIGURES, "not exporting: none of them"
    m.database.exporting = True
    exported = {f.name for f in m.registry.collect()}
    assert exported >= DATABASE_FIGURES


def test_a_retired_workers_counts_stay_and_its_gauges_go() -> None:
    primary, first, second = Metrics(), Metrics(), Metrics()
    first.refresh_success.labels("p").inc(10)
    first.in_flight.set(4)
    retired: Snapshot = {}
    retire(retired, shipped(first))
    # The worker was started again: its counters start from zero.
    second.refresh_success.labels("p").inc(2)
    values = exposed(primary, [retired, shipped(second)])
    assert value(values, "refresherd_refresh_success_total", provider="p") == 12
    assert value(values, "refresherd_refreshes_in_flight") == 0
    # Retired twice: the sums accumulate.
    retire(retired, shipped(second))
    values = exposed(primary, [retired])
    assert value(values, "refresherd_refresh_success_total", provider="p") == 12


def test_created_is_the_earliest_not_a_sum() -> None:
    primary, worker = Metrics(), Metrics()
    primary.refresh_success.labels("p").inc()
    worker.refresh_success.labels("p").inc()
    snapshot = shipped(worker)
    [key] = [k for k in snapshot["refresherd_refresh_success"] if k[0].endswith("_created")]
    snapshot["refresherd_refresh_success"][key] = 1.0
    values = exposed(primary, [snapshot])
    assert value(values, "refresherd_refresh_success_created", provider="p") == 1.0


@pytest.mark.parametrize(
    "data",
    [
        [],
        {"refresherd_refresh_success": {}},
        {"refresherd_refresh_success": [["x_total", {"provider": "p"}]]},
        {"refresherd_refresh_success": [["x_total", {"provider": 1}, 1.0]]},
        {"refresherd_refresh_success": [["x_total", {"provider": "p"}, "1"]]},
    ],
)
def test_a_malformed_snapshot_is_refused(data: object) -> None:
    with pytest.raises(ValueError, match="snapshot"):
        decode(data)
