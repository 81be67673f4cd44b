"""MetricsCollector: components report through ``on_*`` hooks; nothing else touches metrics.

Every metric is declared once in :mod:`service.metrics.definitions`; that table drives the
prometheus_client objects the hooks update, the exposition, the ``/status`` snapshot
and the bus metrics. Values that depend on when they are read (rates, durations of an
ongoing outage, the components' own views) are computed when someone asks: a scrape,
``/status`` or the periodic publish. Hooks and readers all run on the event loop.
"""

from __future__ import annotations

import asyncio
import copy
import logging
import math
from collections import defaultdict, deque
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, Final, TypeVar

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4, generate_latest

from service.core.clock import Clock, SystemClock
from service.core.events import REJECT_REASONS, Aggregate, Metric
from service.metrics.definitions import (
    DECLARED,
    PREFIX,
    RATE_WINDOW_S,
    Declared,
    Values,
    count,
    flags,
)
from service.metrics.recent import RateMeter, Reservoir
from service.metrics.views import (
    Read,
    ScrapeView,
    WithoutCreated,
    counts,
    pair_counts,
    retriable_counts,
)

__all__ = ["MetricsCollector"]

log = logging.getLogger(__name__)

RESERVOIR_SIZE: Final = 10_000
LATEST_AGGREGATES: Final = 10
_KNOWN_REASONS: Final = frozenset(REJECT_REASONS)
_DECLARED: Final = {d.name: d for d in DECLARED}
# the sample that holds a stored metric's value(s), by kind
_VALUE_SUFFIX: Final = {"counter": "_total", "gauge": "", "histogram": "_count"}

M = TypeVar("M", Counter, Gauge, Histogram)
_Children = dict[tuple[str, tuple[str, ...]], M]


def _child(
    metrics: Mapping[str, M], children: _Children[M], name: str, label_values: tuple[str, ...]
) -> M:
    key = (name, label_values)
    child = children.get(key)
    if child is None:
        child = children[key] = metrics[name].labels(*label_values)
    return child


class MetricsCollector:
    """The service's metrics, with three read-outs.

    ``exposition()`` (Prometheus text 0.0.4 from a private registry, so several
    collectors can live in one process), ``snapshot()`` (JSON-able dict for
    ``/status``) and ``to_bus_metrics()`` (what :meth:`publish_forever` sends).
    Label values are bounded by construction: transports, sinks and subscribers are
    names chosen by the code, and an unknown reject reason is counted as ``other``.
    """

    content_type: Final = CONTENT_TYPE_PLAIN_0_0_4

    events_received = Read("events_received", count)
    events_aggregated = Read("events_aggregated", count)
    events_late = Read("events_late", count)
    events_late_applied = Read("events_late_applied", count)
    events_ahead = Read("events_ahead", count)
    series_overflow = Read("series_overflow", count)
    aggregates_emitted = Read("aggregates_emitted", count)
    metrics_publish_errors = Read("metrics_publish_errors", count)
    lease_lost = Read("lease_lost", count)
    replays_dropped = Read("replays_dropped", count)
    dead_letters_rolled_up = Read("dead_letters_rolled_up", count)
    stage_rewinds = Read("stage_rewinds", count)
    messages_received = Read("messages_received", counts)
    events_rejected = Read("events_rejected", counts)
    state_dropped = Read("state_dropped", counts)
    bus_errors = Read("bus_errors", retriable_counts)
    bus_protocol_errors = Read("bus_protocol_errors", pair_counts)
    sink_retries = Read("sink_retries", counts)
    sink_circuit_open = Read("sink_circuit_open", flags)

    def __init__(self, clock: Clock | None = None, bus_labels: Mapping[str, str] = {}) -> None:
        self.clock = clock or SystemClock()
        # on every metric sent to the bus: {"worker": "<i>"} in a worker of WORKERS=N, so
        # that the bus's consumers can tell the workers' series apart
        self.bus_labels = dict(bus_labels)
        self.watermark: float | None = None
        self.lease_leader: bool | None = None  # None: no lease (the bus needs none)
        self.queue_depth: dict[str, int] = {}
        self.latest_aggregates: deque[Aggregate] = deque(maxlen=LATEST_AGGREGATES)
        self._sink_degraded_s: defaultdict[str, float] = defaultdict(float)
        self._sink_degraded_since: dict[str, float] = {}
        self._latencies = Reservoir(RESERVOIR_SIZE)
        self._events_rate = RateMeter(self.clock.monotonic(), RATE_WINDOW_S)
        self._partition_view: Callable[[], Mapping[str, Mapping[str, Any]]] = dict
        self._ledger_view: Callable[[], Mapping[str, int]] = dict
        self._queue_view: Callable[[], Mapping[str, int]] = dict
        # VABUS_URL's sources: the one a bus reports for (see for_source), when each last
        # delivered (shared by every source's view), and their lag and queue depths
        self._source: str | None = None
        self._source_events: defaultdict[str, int] = defaultdict(int)
        self._source_errors: defaultdict[str, int] = defaultdict(int)
        self._source_last_event: dict[str, float] = {}
        self._source_view: Callable[[], Mapping[str, Mapping[str, float | None]]] = dict
        self._views = self._scrape_views()
        self.registry = CollectorRegistry(auto_describe=False)
        self._counters: dict[str, Counter] = {}
        self._gauges: dict[str, Gauge] = {}
        self._histograms: dict[str, Histogram] = {}
        self._counter_children: _Children[Counter] = {}
        self._gauge_children: _Children[Gauge] = {}
        self._histogram_children: _Children[Histogram] = {}
        for d in DECLARED:  # registered in declaration order: the exposition's order
            self._register(d)
        self._stored: dict[str, Counter | Gauge | Histogram] = {
            **self._counters,
            **self._gauges,
            **self._histograms,
        }
        # kept under its old name for callers that observe a latency directly
        self.emit_to_durable = self._histograms["emit_to_durable_seconds"]

    def _register(self, d: Declared) -> None:
        name, labels, registry = d.full_name, d.labels, self.registry
        if d.on_scrape:
            registry.register(ScrapeView(d, self._views[d.name]))
        elif d.kind == "counter":
            self._counters[d.name] = Counter(name, d.help, labels, registry=registry)
        elif d.kind == "gauge":
            self._gauges[d.name] = Gauge(name, d.help, labels, registry=registry)
        else:
            self._histograms[d.name] = Histogram(
                name, d.help, labels, registry=registry, buckets=d.buckets
            )

    # prometheus_client's ``labels()`` takes a lock and rebuilds its key on every call (a
    # microsecond a hook, per batch on the hot path): the hooks keep the children here.
    def _counter(self, name: str, *label_values: str) -> Counter:
        return _child(self._counters, self._counter_children, name, label_values)

    def _gauge(self, name: str, *label_values: str) -> Gauge:
        return _child(self._gauges, self._gauge_children, name, label_values)

    def _histogram(self, name: str, *label_values: str) -> Histogram:
        return _child(self._histograms, self._histogram_children, name, label_values)

    # -- intake ---------------------------------------------------------------------
    def for_source(self, position: int) -> MetricsCollector:
        """This collector as the bus of source ``position`` of VABUS_URL (1-based) sees
        it: the same metrics (a shallow copy shares every one), and what the bus reports
        through the intake hooks is also counted for that source (label ``source``)."""
        view = copy.copy(self)
        view._source = str(position)
        return view

    def on_messages_received(self, transport: str, messages: int, events: int) -> None:
        """A bus fetch returned ``messages`` transport messages holding ``events`` events."""
        self._counter("messages_received", transport).inc(messages)
        self._counters["events_received"].inc(events)
        self._events_rate.add(events, self.clock.monotonic())
        if self._source is not None:
            self._source_events[self._source] += events
            self._source_last_event[self._source] = self.clock.now()

    def on_bus_error(self, transport: str, retriable: bool) -> None:
        self._counter("bus_errors", transport, _bool(retriable)).inc()
        if self._source is not None:
            self._source_errors[self._source] += 1

    def set_source_view(self, view: Callable[[], Mapping[str, Mapping[str, float | None]]]) -> None:
        """Where each source's ``lag`` and ``queue_depth`` come from (by source position;
        read when asked, as the partitions' are)."""
        self._source_view = view

    def sources(self) -> dict[str, dict[str, float | None]]:
        """Per source (by position): events, errors, last event time, and what the source
        view gives (lag, queue depth, partitions held)."""
        events, errors = self.read("source_events_received"), self.read("source_errors")
        computed = self._source_view()
        keys = {k[0] for k in events} | {k[0] for k in errors} | set(computed)
        out: dict[str, dict[str, float | None]] = {}
        for key in sorted(keys, key=int):
            view = computed.get(key, {})
            out[key] = {
                "events": int(events.get((key,), 0)),
                "errors": int(errors.get((key,), 0)),
                "last_event_time": self._source_last_event.get(key),
                "lag": view.get("lag"),
                "queue_depth": view.get("queue_depth"),
                "partitions": view.get("partitions"),
            }
        return out

    def on_bus_protocol_error(self, transport: str, kind: str) -> None:
        """An answer or internal record refused as breaking the bus's protocol; ``kind``
        is one of a few names chosen by the code (never error text)."""
        self._counter("bus_protocol_errors", transport, kind).inc()

    def set_lease_leader(self, leader: bool) -> None:
        """This instance holds the bus's lease (reads it) or stands by."""
        self.lease_leader = leader

    def on_lease_lost(self) -> None:
        """The lease was lost while reading (its connection went away)."""
        self._counters["lease_lost"].inc()

    # -- aggregation ----------------------------------------------------------------
    def on_events_aggregated(self, n: int) -> None:
        self._counters["events_aggregated"].inc(n)

    def on_events_rejected(self, reason: str, n: int = 1) -> None:
        reason = reason if reason in _KNOWN_REASONS else "other"
        self._counter("events_rejected", reason).inc(n)

    def on_dead_letters_rolled_up(self, n: int) -> None:
        """Rejected elements of one message folded into a roll-up dead letter (counted,
        by reason, in ``events_rejected`` as usual)."""
        self._counters["dead_letters_rolled_up"].inc(n)

    def on_replays_dropped(self, n: int) -> None:
        """Repartitioned records dropped as replays of the routing stage."""
        self._counters["replays_dropped"].inc(n)

    def on_state_dropped(self, what: str, n: int = 1) -> None:
        """State that could not be used was dropped: ``what`` is ``window`` (one window's
        accumulator) or ``partition`` (a whole unreadable checkpoint body)."""
        self._counter("state_dropped", what).inc(n)

    def on_stage_rewind(self) -> None:
        """Applying a batch raised: the partitions went back to their checkpoints."""
        self._counters["stage_rewinds"].inc()

    def on_events_late(self, n: int = 1) -> None:
        self._counters["events_late"].inc(n)

    def on_events_late_applied(self, n: int) -> None:
        """Late events applied as corrections (AGGREGATION_ALLOWED_LATENESS)."""
        self._counters["events_late_applied"].inc(n)

    def on_events_ahead(self, n: int) -> None:
        """Events aggregated without moving event time: further ahead of the clock than
        AGGREGATION_MAX_WATERMARK_LEAD."""
        self._counters["events_ahead"].inc(n)

    def on_series_overflow(self, n: int) -> None:
        """Events aggregated into an overflow series (AGGREGATION_MAX_SERIES_PER_NAME)."""
        self._counters["series_overflow"].inc(n)

    def on_aggregates_emitted(self, aggregates: Sequence[Aggregate]) -> None:
        self._counters["aggregates_emitted"].inc(len(aggregates))
        self.latest_aggregates.extend(aggregates[-LATEST_AGGREGATES:])

    def set_open_windows(self, n: int) -> None:
        self._gauges["open_windows"].set(n)

    def set_watermark(self, event_time: float | None) -> None:
        self.watermark = event_time

    def set_partition_view(self, view: Callable[[], Mapping[str, Mapping[str, Any]]]) -> None:
        """Where the per-partition gauges come from (the aggregator's own view, read
        when scraped, so idleness is as of the scrape and nothing is copied per batch)."""
        self._partition_view = view

    def partitions(self) -> Mapping[str, Mapping[str, Any]]:
        return self._partition_view()

    def set_ledger_view(self, view: Callable[[], Mapping[str, int]]) -> None:
        """Where the ledger gauges come from (the aggregator's, read when scraped)."""
        self._ledger_view = view

    def ledger(self) -> Mapping[str, int]:
        return self._ledger_view()

    # -- outputs --------------------------------------------------------------------
    def on_sink_write(self, sink: str, aggregates: int, dead_letters: int, seconds: float) -> None:
        self._counter("sink_writes", sink).inc()
        self._counter("sink_aggregates_written", sink).inc(aggregates)
        self._counter("sink_dead_letters_written", sink).inc(dead_letters)
        self._histogram("sink_write_seconds", sink).observe(seconds)

    def on_route_written(self, route: str, destination: str, aggregates: int) -> None:
        """``aggregates`` of ``route`` are durable in ``destination`` (ROUTES_FILE)."""
        self._counter("route_aggregates_written", route, destination).inc(aggregates)

    def on_archive_written(self, files: int, events: int) -> None:
        self._counters["archive_files_written"].inc(files)
        self._counters["archive_events_written"].inc(events)

    def on_sink_error(self, sink: str, retriable: bool) -> None:
        self._counter("sink_errors", sink, _bool(retriable)).inc()

    def on_sink_retry(self, sink: str) -> None:
        """A failed write to ``sink`` (or the checkpoint store) will be tried again."""
        self._counter("sink_retries", sink).inc()

    def on_sink_degraded(self, sink: str) -> None:
        """``sink`` started failing; time counts as degraded until it recovers."""
        self._sink_degraded_since.setdefault(sink, self.clock.monotonic())
        self._sink_degraded_s[sink] += 0.0  # the sink shows up at 0 right away

    def on_sink_recovered(self, sink: str) -> None:
        since = self._sink_degraded_since.pop(sink, None)
        if since is not None:
            self._sink_degraded_s[sink] += max(0.0, self.clock.monotonic() - since)

    def set_sink_circuit(self, sink: str, is_open: bool) -> None:
        self._gauge("sink_circuit_open", sink).set(1.0 if is_open else 0.0)

    def sink_degraded_seconds(self) -> dict[str, float]:
        """Seconds each sink spent failing so far, including an outage still going on."""
        now = self.clock.monotonic()
        out = dict(self._sink_degraded_s)
        for sink, since in self._sink_degraded_since.items():
            out[sink] = out.get(sink, 0.0) + max(0.0, now - since)
        return out

    def on_aggregates_durable(self, emitted_at: Sequence[float]) -> None:
        """Aggregates emitted at these wall times are now durable in every output."""
        now = self.clock.now()
        for t in emitted_at:
            # wall clocks can step back; a negative latency would only mislead
            latency = max(0.0, now - t)
            self.emit_to_durable.observe(latency)
            self._latencies.add(latency)

    def on_checkpoint(self, seconds: float) -> None:
        self._histograms["checkpoint_seconds"].observe(seconds)

    # -- hub ------------------------------------------------------------------------
    def on_subscriber_crash(self, subscriber: str) -> None:
        self._counter("subscriber_crashes", subscriber).inc()

    def set_queue_depth(self, subscriber: str, depth: int) -> None:
        self.queue_depth[subscriber] = depth

    def set_queue_view(self, view: Callable[[], Mapping[str, int]]) -> None:
        """Live queue depths (the hub's), read when asked: a stage blocked behind a down
        output takes no batch, so the depth recorded at its last take would go stale."""
        self._queue_view = view

    def queue_depths(self) -> dict[str, int]:
        return {**self.queue_depth, **self._queue_view()}

    # -- read-outs ------------------------------------------------------------------
    def events_per_second(self) -> float:
        return self._events_rate.rate(self.clock.monotonic())

    def processing_lag(self) -> float | None:
        """Wall time minus the watermark; ``None`` until a watermark exists."""
        return None if self.watermark is None else self.clock.now() - self.watermark

    def latency_quantiles(self) -> dict[str, float | None]:
        """p50/p95/p99 of emit-to-durable seconds over the last ~10k aggregates."""
        p50, p95, p99 = self._latencies.quantiles((0.5, 0.95, 0.99))
        return {"p50": p50, "p95": p95, "p99": p99}

    def read(self, name: str) -> Values:
        """A declared metric's current values by label values (a histogram's: counts)."""
        view = self._views.get(name)
        if view is not None:
            return view()
        d = _DECLARED[name]
        sample = d.full_name + _VALUE_SUFFIX[d.kind]
        return {
            tuple(s.labels[label] for label in d.labels): s.value
            for family in self._stored[name].collect()
            for s in family.samples
            if s.name == sample
        }

    def exposition(self) -> bytes:
        """Prometheus text format 0.0.4; serve with :attr:`content_type`."""
        return generate_latest(WithoutCreated(self.registry))

    def snapshot(self) -> dict[str, Any]:
        """Every counter and gauge as a JSON-able dict (no NaN: unknown is ``None``)."""
        # the ledger as the aggregator keeps it (its imbalance included)
        out: dict[str, Any] = {"ledger": dict(self.ledger())}
        for d in DECLARED:
            values = self.read(d.name) if d.status else {}
            for key, form in d.status:
                out[key] = form(values)
        # the quantiles come from the latest samples, which no histogram keeps
        out["emit_to_durable_seconds"] = {
            "count": count(self.read("emit_to_durable_seconds")),
            **self.latency_quantiles(),
        }
        out["latest_aggregates"] = [a.to_json_obj() for a in self.latest_aggregates]
        return out

    def to_bus_metrics(self) -> list[Metric]:
        """The service's own metrics for the bus; unknown values are NaN (sent as null)."""
        now, labels = self.clock.now(), self.bus_labels
        totals: list[tuple[str, float]] = []
        each: list[Metric] = []
        for d in DECLARED:
            if not (d.bus or d.bus_each):
                continue
            values = self.read(d.name)
            if d.bus:  # an unlabelled metric without a value is unknown, not 0
                totals.append((d.name, sum(values.values()) if values or d.labels else math.nan))
            if d.bus_each:
                name, label = f"{PREFIX}.{d.bus_each}", d.labels[0]
                each.extend(
                    Metric(name, float(v), now, {**labels, label: k[0]}) for k, v in values.items()
                )
        for q, v in self.latency_quantiles().items():
            totals.append((f"emit_to_durable_{q}_seconds", math.nan if v is None else v))
        metrics = [Metric(f"{PREFIX}.{name}", float(v), now, dict(labels)) for name, v in totals]
        return metrics + each

    def _scrape_views(self) -> dict[str, Callable[[], Values]]:
        """The declared metrics computed when read, by name."""

        def partition(field: str, f: Callable[[Any], float] = float) -> Callable[[], Values]:
            return lambda: {
                (p,): f(v[field]) for p, v in self.partitions().items() if v[field] is not None
            }

        def ledger() -> Values:
            return {(k,): n for k, n in sorted(self.ledger().items()) if k != "imbalance"}

        def one(value: Callable[[], float | None]) -> Callable[[], Values]:
            return lambda: {} if (v := value()) is None else {(): v}

        def source(field: str) -> Callable[[], Values]:
            return lambda: {
                (k,): float(v)
                for k, s in self._source_view().items()
                if (v := s.get(field)) is not None
            }

        return {
            "source_events_received": lambda: {(k,): n for k, n in self._source_events.items()},
            "source_errors": lambda: {(k,): n for k, n in self._source_errors.items()},
            "source_last_event_seconds": lambda: {
                (k,): t for k, t in self._source_last_event.items()
            },
            "source_lag_messages": source("lag"),
            "source_queue_depth": source("queue_depth"),
            "sink_degraded_seconds": lambda: {
                (s,): t for s, t in self.sink_degraded_seconds().items()
            },
            "queue_depth": lambda: {(s,): d for s, d in self.queue_depths().items()},
            "events_per_second": one(self.events_per_second),
            "partition_watermark_seconds": partition("watermark"),
            "partition_holds_watermark": partition("holds_watermark", lambda h: 1.0 if h else 0.0),
            "partition_lag_messages": partition("lag"),
            "partition_seconds_since_message": partition("seconds_since_message"),
            "ledger_events": ledger,
            "ledger_imbalance": one(
                lambda: self.ledger().get("imbalance", 0) if self.ledger() else None
            ),
            "lease_leader": one(
                lambda: None if self.lease_leader is None else float(self.lease_leader)
            ),
            "watermark_seconds": one(lambda: self.watermark),
            "processing_lag_seconds": one(self.processing_lag),
        }

    # -- publishing -----------------------------------------------------------------
    async def publish_once(self, send: Callable[[Sequence[Metric]], Awaitable[None]]) -> bool:
        """Send the bus metrics once. Never raises (bar cancellation); False on failure."""
        try:
            await send(self.to_bus_metrics())
        except Exception as exc:
            self._counters["metrics_publish_errors"].inc()
            log.warning(
                "publishing metrics to the bus failed (%d failures so far): %s: %s",
                self.metrics_publish_errors,
                type(exc).__name__,
                exc,
            )
            return False
        return True

    async def publish_forever(
        self, send: Callable[[Sequence[Metric]], Awaitable[None]], interval_s: float
    ) -> None:
        """Every ``interval_s`` (on the injected clock) send :meth:`to_bus_metrics`.

        A send that fails or outlasts the interval is logged and counted, never raised:
        metrics must not take the service down. Runs until cancelled.
        """
        while True:
            await self.clock.sleep(interval_s)
            await self.publish_once(_bounded(send, interval_s))


def _bounded(
    send: Callable[[Sequence[Metric]], Awaitable[None]], timeout_s: float
) -> Callable[[Sequence[Metric]], Awaitable[None]]:
    # A hung send must not stall every later publish: the next one supersedes it.
    async def call(metrics: Sequence[Metric]) -> None:
        async with asyncio.timeout(timeout_s):
            await send(metrics)

    return call


def _bool(flag: bool) -> str:
    return "true" if flag else "false"
