"""The families of declared metrics computed when read, and the collectors that put
them in a MetricsCollector's exposition."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable
from typing import Generic, Protocol, TypeVar

from prometheus_client import CollectorRegistry
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from service.metrics.definitions import Declared, Values

__all__ = [
    "Read",
    "ScrapeView",
    "WithoutCreated",
    "computed_family",
    "counts",
    "pair_counts",
    "retriable_counts",
]

T = TypeVar("T")


class _Readable(Protocol):
    def read(self, name: str) -> Values: ...


def computed_family(d: Declared, values: Values) -> Metric:
    """The family of a metric computed when read, holding ``values``."""
    kind = CounterMetricFamily if d.kind == "counter" else GaugeMetricFamily
    out = kind(d.full_name, d.help, labels=list(d.labels))
    for label_values, v in values.items():
        out.add_metric(list(label_values), v)
    return out


class ScrapeView(Collector):
    """One declared metric computed when scraped. prometheus_client's Gauge cannot be
    absent while unknown, nor follow a set of labels that another component owns
    (partitions, hub queues, the ledger), nor count an outage still going on."""

    def __init__(self, d: Declared, read: Callable[[], Values]) -> None:
        self._d = d
        self._read = read

    def collect(self) -> Iterable[Metric]:
        values = self._read()
        if self._d.optional and not values:
            return []
        return [computed_family(self._d, values)]


class WithoutCreated(Collector):
    """The registry without the ``_created`` series prometheus_client adds to counters and
    histograms: the exposition never had them, and they carry the system clock's time
    of construction rather than anything a consumer could use."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self._registry = registry

    def collect(self) -> Iterable[Metric]:
        for family in self._registry.collect():
            family.samples = [s for s in family.samples if not s.name.endswith("_created")]
            yield family


def counts(v: Values) -> defaultdict[str, int]:
    return defaultdict(int, {k[0]: int(n) for k, n in v.items()})


def pair_counts(v: Values) -> defaultdict[tuple[str, str], int]:
    return defaultdict(int, {(k[0], k[1]): int(n) for k, n in v.items()})


def retriable_counts(v: Values) -> defaultdict[tuple[str, bool], int]:
    return defaultdict(int, {(k[0], k[1] == "true"): int(n) for k, n in v.items()})


class Read(Generic[T]):
    """A declared metric's current value(s) as a read-only attribute, for the callers
    (tests, the demo) that read one directly."""

    def __init__(self, name: str, form: Callable[[Values], T]) -> None:
        self._name = name
        self._form = form

    def __get__(self, m: _Readable, owner: type | None = None) -> T:
        return self._form(m.read(self._name))
