"""How the metrics of worker processes (``[daemon] workers``) join the primary's /metrics.

Pure: a worker turns its registry into a snapshot (JSON-safe), the primary keeps the latest
snapshot of each worker and merges them into its own families at every scrape. Counters and
histograms add up; the few gauges that describe one process's own state combine by the rule in
metrics.PER_PROCESS_GAUGES; every other gauge is the primary's alone. The database-wide figures
(metrics.DATABASE_FIGURES) are never shipped: a worker never holds the exporter role, and the
primary exports them (or not) as the one exporter of the database. When a worker ends, its
last counts are kept (``retire``), so that the merged counters never go down when a worker is
restarted.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector
from prometheus_client.samples import Sample

from refresherd.metrics import DATABASE_FIGURES, PER_PROCESS_GAUGES

# family name -> {(sample name, sorted labels): value}, in the order the worker exposed them.
SampleKey = tuple[str, tuple[tuple[str, str], ...]]
Snapshot = dict[str, dict[SampleKey, float]]

_COMBINE: dict[str, Callable[[float, float], float]] = {
    "sum": float.__add__,
    "max": max,
    "min": min,
}


def _shipped(family: Metric) -> str | None:
    """How this family's values combine across processes; None: the primary's alone."""
    if family.name in DATABASE_FIGURES:
        return None
    if family.type in ("counter", "histogram"):
        return "sum"
    if family.type == "gauge":
        return PER_PROCESS_GAUGES.get(family.name)
    return None


def _combine(rule: str, sample_name: str) -> Callable[[float, float], float]:
    # A counter's _created is when its series began: the earliest of them, not a sum.
    return min if sample_name.endswith("_created") else _COMBINE[rule]


def take_snapshot(registry: CollectorRegistry) -> Snapshot:
    """The shipped families of a worker's registry."""
    snapshot: Snapshot = {}
    for family in registry.collect():
        if _shipped(family) is not None:
            snapshot[family.name] = {
                (s.name, tuple(sorted(s.labels.items()))): s.value for s in family.samples
            }
    return snapshot


def encode(snapshot: Snapshot) -> dict[str, Any]:
    return {
        name: [[key[0], dict(key[1]), value] for key, value in samples.items()]
        for name, samples in snapshot.items()
    }


def decode(data: object) -> Snapshot:
    """A snapshot from its JSON form; ValueError if it is not one."""
    if not isinstance(data, dict):
        raise ValueError("a metrics snapshot is a JSON object")
    snapshot: Snapshot = {}
    for name, samples in data.items():
        if not isinstance(samples, list):
            raise ValueError(f"metrics snapshot: {name!r} is not a list")
        family: dict[SampleKey, float] = {}
        for sample in samples:
            match sample:
                case [str(sample_name), dict(labels), int() | float() as value] if all(
                    isinstance(k, str) and isinstance(v, str) for k, v in labels.items()
                ):
                    family[(sample_name, tuple(sorted(labels.items())))] = float(value)
                case _:
                    raise ValueError(f"metrics snapshot: a sample of {name!r} is malformed")
        snapshot[str(name)] = family
    return snapshot


def retire(retired: Snapshot, last: Snapshot) -> None:
    """Keep an ended worker's counters and histograms (never its gauges) in ``retired``."""
    for name, samples in last.items():
        if name in PER_PROCESS_GAUGES:  # the only gauges a snapshot holds
            continue
        kept = retired.setdefault(name, {})
        for key, value in samples.items():
            kept[key] = _combine("sum", key[0])(kept[key], value) if key in kept else value


def merge(families: Iterable[Metric], snapshots: Iterable[Snapshot]) -> Iterator[Metric]:
    """The primary's families with every snapshot's values combined into them."""
    snapshots = list(snapshots)
    for family in families:
        rule = _shipped(family)
        if rule is None or not any(family.name in s for s in snapshots):
            yield family
            continue
        values: dict[SampleKey, float] = {}
        samples: dict[SampleKey, Sample] = {}
        for s in family.samples:
            key = (s.name, tuple(sorted(s.labels.items())))
            values[key], samples[key] = s.value, s
        for snapshot in snapshots:
            for key, value in snapshot.get(family.name, {}).items():
                if key in values:
                    values[key] = _combine(rule, key[0])(values[key], value)
                else:  # a series only a worker has (say, a failure reason the primary never saw)
                    values[key] = value
                    samples[key] = Sample(key[0], dict(key[1]), value)
        merged = Metric(family.name, family.documentation, family.type, family.unit)
        merged.samples = [samples[key]._replace(value=values[key]) for key in samples]
        yield merged


class MergedCollector(Collector):
    """The primary's families with the workers' values merged in, at every collect()."""

    def __init__(
        self, registry: CollectorRegistry, snapshots: Callable[[], list[Snapshot]]
    ) -> None:
        self.registry = registry
        self.snapshots = snapshots

    def collect(self) -> Iterator[Metric]:
        return merge(self.registry.collect(), self.snapshots())


def merged_registry(
    registry: CollectorRegistry, snapshots: Callable[[], list[Snapshot]]
) -> CollectorRegistry:
    """What /metrics exposes on a primary with workers."""
    # auto_describe off: the merged families carry the names of the primary's registry.
    exposed = CollectorRegistry(auto_describe=False)
    exposed.register(MergedCollector(registry, snapshots))
    return exposed
