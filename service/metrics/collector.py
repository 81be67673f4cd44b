"""MetricsCollector: components report through ``on_*`` hooks; nothing else touches metrics.

Hooks are called once per batch on the event loop, so they only bump plain ints and
floats. Everything derived (Prometheus families, quantiles, rates, the bus metrics) is
computed when someone asks: a scrape, ``/status`` or the periodic publish. No locks are
needed because every reader and writer runs on the same loop.
"""

from __future__ import annotations

import asyncio
import logging
import math
from bisect import bisect_left
from collections import defaultdict, deque
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from typing import Any, Final

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4, generate_latest
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
)
from prometheus_client.metrics_core import Metric as PromMetric

from service.core.clock import Clock, SystemClock
from service.core.events import REJECT_REASONS, Aggregate, Metric

__all__ = ["MetricsCollector"]

log = logging.getLogger(__name__)

PREFIX: Final = "vabus_aggregator"
RATE_WINDOW_S: Final = 10.0
RESERVOIR_SIZE: Final = 10_000
LATEST_AGGREGATES: Final = 10
# Emit-to-durable spans milliseconds (healthy) to minutes (an output outage).
LATENCY_BUCKETS: Final = (
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    120.0,
    300.0,
)
DURATION_BUCKETS: Final = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)
_KNOWN_REASONS: Final = frozenset(REJECT_REASONS)


class _Histogram:
    """Cumulative-bucket histogram kept as plain numbers (Prometheus semantics)."""

    __slots__ = ("bounds", "count", "counts", "sum")

    def __init__(self, bounds: Sequence[float]) -> None:
        self.bounds = tuple(bounds)
        self.counts = [0] * (len(self.bounds) + 1)  # last slot is +Inf
        self.count = 0
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.count += 1
        self.sum += value

    def prometheus_buckets(self) -> list[tuple[str, float]]:
        out: list[tuple[str, float]] = []
        running = 0
        for bound, n in zip((*self.bounds, math.inf), self.counts, strict=True):
            running += n
            out.append(("+Inf" if bound == math.inf else repr(bound), running))
        return out


class _RateMeter:
    """Events per second over the last ``window_s`` of monotonic time.

    Young meters divide by their age (at least one second) rather than the full
    window, so the first reading is not understated tenfold.
    """

    __slots__ = ("_in_window", "_samples", "_started", "window_s")

    def __init__(self, started: float, window_s: float = RATE_WINDOW_S) -> None:
        self.window_s = window_s
        self._started = started
        self._samples: deque[tuple[float, int]] = deque()
        self._in_window = 0

    def add(self, n: int, now: float) -> None:
        self._samples.append((now, n))
        self._in_window += n
        self._expire(now)

    def rate(self, now: float) -> float:
        self._expire(now)
        span = min(self.window_s, max(now - self._started, 1.0))
        return self._in_window / span

    def _expire(self, now: float) -> None:
        horizon = now - self.window_s
        while self._samples and self._samples[0][0] <= horizon:
            self._in_window -= self._samples.popleft()[1]


def _quantiles(samples: Sequence[float], qs: Sequence[float]) -> list[float | None]:
    """Nearest-rank quantiles; ``None`` for each when there are no samples."""
    if not samples:
        return [None] * len(qs)
    ordered = sorted(samples)
    last = len(ordered) - 1
    return [ordered[min(last, max(0, math.ceil(q * len(ordered)) - 1))] for q in qs]


class MetricsCollector:
    """The service's counters and gauges, with three read-outs.

    ``exposition()`` (Prometheus text 0.0.4 from a private registry, so several
    collectors can live in one process), ``snapshot()`` (JSON-able dict for
    ``/status``) and ``to_bus_metrics()`` (what :meth:`publish_forever` sends).
    Label values are bounded by construction: transports, sinks and subscribers are
    names chosen by the code, and an unknown reject reason is counted as ``other``.
    """

    content_type: Final = CONTENT_TYPE_PLAIN_0_0_4

    def __init__(self, clock: Clock | None = None, bus_labels: Mapping[str, str] = {}) -> None:
        self.clock = clock or SystemClock()
        # on every metric sent to the bus: {"worker": "<i>"} in a worker of WORKERS=N, so
        # that the bus's consumers can tell the workers' series apart
        self.bus_labels = dict(bus_labels)
        self.events_received = 0
        self.events_aggregated = 0
        self.events_late = 0
        self.events_ahead = 0
        self.replays_dropped = 0
        self.state_dropped: defaultdict[str, int] = defaultdict(int)
        self.stage_rewinds = 0
        self.aggregates_emitted = 0
        self.open_windows = 0
        self.watermark: float | None = None
        self.metrics_publish_errors = 0
        self.lease_leader: bool | None = None  # None: no lease (the bus needs none)
        self.lease_lost = 0
        self.messages_received: defaultdict[str, int] = defaultdict(int)
        self.events_rejected: defaultdict[str, int] = defaultdict(int)
        self.bus_errors: defaultdict[tuple[str, bool], int] = defaultdict(int)
        self.bus_protocol_errors: defaultdict[tuple[str, str], int] = defaultdict(int)
        self.dead_letters_rolled_up = 0
        self.sink_writes: defaultdict[str, int] = defaultdict(int)
        self.sink_aggregates_written: defaultdict[str, int] = defaultdict(int)
        self.sink_dead_letters_written: defaultdict[str, int] = defaultdict(int)
        self.sink_errors: defaultdict[tuple[str, bool], int] = defaultdict(int)
        self.sink_retries: defaultdict[str, int] = defaultdict(int)
        self.sink_circuit_open: dict[str, bool] = {}
        self._sink_degraded_s: defaultdict[str, float] = defaultdict(float)
        self._sink_degraded_since: dict[str, float] = {}
        self.subscriber_crashes: defaultdict[str, int] = defaultdict(int)
        self.queue_depth: dict[str, int] = {}
        self.latest_aggregates: deque[Aggregate] = deque(maxlen=LATEST_AGGREGATES)
        self.emit_to_durable = _Histogram(LATENCY_BUCKETS)
        self.checkpoint_duration = _Histogram(DURATION_BUCKETS)
        self.sink_write_duration: dict[str, _Histogram] = {}
        self._latencies: deque[float] = deque(maxlen=RESERVOIR_SIZE)
        self._events_rate = _RateMeter(self.clock.monotonic())
        self._partition_view: Callable[[], Mapping[str, Mapping[str, Any]]] = dict
        self._ledger_view: Callable[[], Mapping[str, int]] = dict
        self._queue_view: Callable[[], Mapping[str, int]] = dict
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(_PrometheusView(self))

    # -- intake ---------------------------------------------------------------------
    def on_messages_received(self, transport: str, messages: int, events: int) -> None:
        """A bus fetch returned ``messages`` transport messages holding ``events`` events."""
        self.messages_received[transport] += messages
        self.events_received += events
        self._events_rate.add(events, self.clock.monotonic())

    def on_bus_error(self, transport: str, retriable: bool) -> None:
        self.bus_errors[(transport, retriable)] += 1

    def on_bus_protocol_error(self, transport: str, kind: str) -> None:
        """An answer or internal record refused as breaking the bus's protocol; ``kind``
        is one of a few names chosen by the code (never error text)."""
        self.bus_protocol_errors[(transport, kind)] += 1

    def set_lease_leader(self, leader: bool) -> None:
        """This instance holds the bus's lease (reads it) or stands by."""
        self.lease_leader = leader

    def on_lease_lost(self) -> None:
        """The lease was lost while reading (its connection went away)."""
        self.lease_lost += 1

    # -- aggregation ----------------------------------------------------------------
    def on_events_aggregated(self, n: int) -> None:
        self.events_aggregated += n

    def on_events_rejected(self, reason: str, n: int = 1) -> None:
        self.events_rejected[reason if reason in _KNOWN_REASONS else "other"] += n

    def on_dead_letters_rolled_up(self, n: int) -> None:
        """Rejected elements of one message folded into a roll-up dead letter (counted,
        by reason, in ``events_rejected`` as usual)."""
        self.dead_letters_rolled_up += n

    def on_replays_dropped(self, n: int) -> None:
        """Repartitioned records dropped as replays of the routing stage."""
        self.replays_dropped += n

    def on_state_dropped(self, what: str, n: int = 1) -> None:
        """State that could not be used was dropped: ``what`` is ``window`` (one window's
        accumulator) or ``partition`` (a whole unreadable checkpoint body)."""
        self.state_dropped[what] += n

    def on_stage_rewind(self) -> None:
        """Applying a batch raised: the partitions went back to their checkpoints."""
        self.stage_rewinds += 1

    def on_events_late(self, n: int = 1) -> None:
        self.events_late += n

    def on_events_ahead(self, n: int) -> None:
        """Events aggregated without moving event time: further ahead of the clock than
        AGGREGATION_MAX_WATERMARK_LEAD."""
        self.events_ahead += n

    def on_aggregates_emitted(self, aggregates: Sequence[Aggregate]) -> None:
        self.aggregates_emitted += len(aggregates)
        self.latest_aggregates.extend(aggregates[-LATEST_AGGREGATES:])

    def set_open_windows(self, n: int) -> None:
        self.open_windows = n

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
        self.sink_writes[sink] += 1
        self.sink_aggregates_written[sink] += aggregates
        self.sink_dead_letters_written[sink] += dead_letters
        hist = self.sink_write_duration.get(sink)
        if hist is None:
            hist = self.sink_write_duration[sink] = _Histogram(DURATION_BUCKETS)
        hist.observe(seconds)

    def on_sink_error(self, sink: str, retriable: bool) -> None:
        self.sink_errors[(sink, retriable)] += 1

    def on_sink_retry(self, sink: str) -> None:
        """A failed write to ``sink`` (or the checkpoint store) will be tried again."""
        self.sink_retries[sink] += 1

    def on_sink_degraded(self, sink: str) -> None:
        """``sink`` started failing; time counts as degraded until it recovers."""
        self._sink_degraded_since.setdefault(sink, self.clock.monotonic())
        self._sink_degraded_s[sink] += 0.0  # the sink shows up at 0 right away

    def on_sink_recovered(self, sink: str) -> None:
        since = self._sink_degraded_since.pop(sink, None)
        if since is not None:
            self._sink_degraded_s[sink] += max(0.0, self.clock.monotonic() - since)

    def set_sink_circuit(self, sink: str, is_open: bool) -> None:
        self.sink_circuit_open[sink] = is_open

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
            self._latencies.append(latency)

    def on_checkpoint(self, seconds: float) -> None:
        self.checkpoint_duration.observe(seconds)

    # -- hub ------------------------------------------------------------------------
    def on_subscriber_crash(self, subscriber: str) -> None:
        self.subscriber_crashes[subscriber] += 1

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
        p50, p95, p99 = _quantiles(self._latencies, (0.5, 0.95, 0.99))
        return {"p50": p50, "p95": p95, "p99": p99}

    def exposition(self) -> bytes:
        """Prometheus text format 0.0.4; serve with :attr:`content_type`."""
        return generate_latest(self.registry)

    def snapshot(self) -> dict[str, Any]:
        """Every counter and gauge as a JSON-able dict (no NaN: unknown is ``None``)."""
        return {
            "events_received": self.events_received,
            "events_aggregated": self.events_aggregated,
            "events_rejected": sum(self.events_rejected.values()),
            "events_rejected_by_reason": dict(self.events_rejected),
            "events_late": self.events_late,
            "events_ahead": self.events_ahead,
            "replays_dropped": self.replays_dropped,
            "state_dropped": dict(self.state_dropped),
            "stage_rewinds": self.stage_rewinds,
            "ledger": dict(self.ledger()),
            "events_per_second": self.events_per_second(),
            "messages_received": dict(self.messages_received),
            "bus_errors": _by_retriable(self.bus_errors),
            "bus_protocol_errors": {
                f"{t}:{k}": n for (t, k), n in self.bus_protocol_errors.items()
            },
            "dead_letters_rolled_up": self.dead_letters_rolled_up,
            "aggregates_emitted": self.aggregates_emitted,
            "open_windows": self.open_windows,
            "watermark": self.watermark,
            "processing_lag_seconds": self.processing_lag(),
            "sink_writes": dict(self.sink_writes),
            "sink_aggregates_written": dict(self.sink_aggregates_written),
            "sink_dead_letters_written": dict(self.sink_dead_letters_written),
            "sink_errors": _by_retriable(self.sink_errors),
            "sink_retries": dict(self.sink_retries),
            "sink_degraded_seconds": self.sink_degraded_seconds(),
            "sink_circuit_open": dict(self.sink_circuit_open),
            "emit_to_durable_seconds": {
                "count": self.emit_to_durable.count,
                **self.latency_quantiles(),
            },
            "checkpoints": self.checkpoint_duration.count,
            "queue_depth": self.queue_depths(),
            "subscriber_crashes": dict(self.subscriber_crashes),
            "metrics_publish_errors": self.metrics_publish_errors,
            "lease_lost": self.lease_lost,
            "latest_aggregates": [a.to_json_obj() for a in self.latest_aggregates],
        }

    def to_bus_metrics(self) -> list[Metric]:
        """The service's own metrics for the bus; unknown values are NaN (sent as null)."""
        now = self.clock.now()
        lag = self.processing_lag()
        quantiles = self.latency_quantiles()
        values: list[tuple[str, float]] = [
            ("events_received", self.events_received),
            ("events_aggregated", self.events_aggregated),
            ("events_rejected", sum(self.events_rejected.values())),
            ("events_late", self.events_late),
            ("events_ahead", self.events_ahead),
            ("aggregates_emitted", self.aggregates_emitted),
            ("sink_errors", sum(self.sink_errors.values())),
            ("sink_retries", sum(self.sink_retries.values())),
            ("sink_degraded_seconds", sum(self.sink_degraded_seconds().values())),
            ("bus_errors", sum(self.bus_errors.values())),
            ("open_windows", self.open_windows),
            ("queue_depth", sum(self.queue_depths().values())),
            ("events_per_second", self.events_per_second()),
            ("processing_lag_seconds", math.nan if lag is None else lag),
        ]
        for q, v in quantiles.items():
            values.append((f"emit_to_durable_{q}_seconds", math.nan if v is None else v))
        labels = self.bus_labels
        metrics = [Metric(f"{PREFIX}.{name}", float(v), now, dict(labels)) for name, v in values]
        metrics.extend(
            Metric(f"{PREFIX}.subscriber_queue_depth", float(d), now, {**labels, "subscriber": s})
            for s, d in self.queue_depths().items()
        )
        return metrics

    # -- publishing -----------------------------------------------------------------
    async def publish_once(self, send: Callable[[Sequence[Metric]], Awaitable[None]]) -> bool:
        """Send the bus metrics once. Never raises (bar cancellation); False on failure."""
        try:
            await send(self.to_bus_metrics())
        except Exception as exc:
            self.metrics_publish_errors += 1
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


def _by_retriable(counts: dict[tuple[str, bool], int]) -> dict[str, dict[str, int]]:
    out: dict[str, dict[str, int]] = {}
    for (name, retriable), n in counts.items():
        out.setdefault(name, {})["retriable" if retriable else "permanent"] = n
    return out


class _PrometheusView:
    """Reads a collector's attributes at scrape time (nothing is copied per hook)."""

    def __init__(self, m: MetricsCollector) -> None:
        self._m = m

    def collect(self) -> Iterator[PromMetric]:
        m = self._m
        for name, doc, value in (
            ("events_received", "Events received from the bus.", m.events_received),
            ("events_aggregated", "Events added to windows.", m.events_aggregated),
            ("events_late", "Events behind the watermark past grace.", m.events_late),
            (
                "events_ahead",
                "Events aggregated without moving event time: too far ahead of the clock.",
                m.events_ahead,
            ),
            ("aggregates_emitted", "Aggregates from closed windows.", m.aggregates_emitted),
            ("metrics_publish_errors", "Failed metric sends.", m.metrics_publish_errors),
            ("lease_lost", "Times the bus's lease was lost while reading.", m.lease_lost),
            (
                "replays_dropped",
                "Repartitioned records dropped as replays of the routing stage.",
                m.replays_dropped,
            ),
            (
                "dead_letters_rolled_up",
                "Rejected elements of a message written as one roll-up dead letter.",
                m.dead_letters_rolled_up,
            ),
            (
                "stage_rewinds",
                "Batches that raised in the aggregator: partitions read again from checkpoints.",
                m.stage_rewinds,
            ),
        ):
            # CounterMetricFamily appends the ``_total`` suffix itself.
            yield CounterMetricFamily(f"{PREFIX}_{name}", doc, value)
        labelled: list[tuple[str, str, list[str], dict[tuple[str, ...], int]]] = [
            (
                "messages_received",
                "Transport messages received.",
                ["transport"],
                {(t,): n for t, n in m.messages_received.items()},
            ),
            (
                "events_rejected",
                "Events sent to dead letters.",
                ["reason"],
                {(r,): n for r, n in m.events_rejected.items()},
            ),
            (
                "state_dropped",
                "Window state (what=window) or a partition's checkpointed state "
                "(what=partition) that could not be used and was dropped.",
                ["what"],
                {(w,): n for w, n in m.state_dropped.items()},
            ),
            (
                "bus_errors",
                "Failed bus operations.",
                ["transport", "retriable"],
                {(t, _bool(r)): n for (t, r), n in m.bus_errors.items()},
            ),
            (
                "bus_protocol_errors",
                "Bus answers or internal records refused as breaking the protocol.",
                ["transport", "kind"],
                {(t, k): n for (t, k), n in m.bus_protocol_errors.items()},
            ),
            (
                "sink_writes",
                "Successful sink writes.",
                ["sink"],
                {(s,): n for s, n in m.sink_writes.items()},
            ),
            (
                "sink_aggregates_written",
                "Aggregates made durable.",
                ["sink"],
                {(s,): n for s, n in m.sink_aggregates_written.items()},
            ),
            (
                "sink_dead_letters_written",
                "Dead letters made durable.",
                ["sink"],
                {(s,): n for s, n in m.sink_dead_letters_written.items()},
            ),
            (
                "sink_errors",
                "Failed sink writes.",
                ["sink", "retriable"],
                {(s, _bool(r)): n for (s, r), n in m.sink_errors.items()},
            ),
            (
                "subscriber_crashes",
                "Hub subscriber task crashes.",
                ["subscriber"],
                {(s,): n for s, n in m.subscriber_crashes.items()},
            ),
            (
                "sink_retries",
                "Sink writes retried after a transient failure.",
                ["sink"],
                {(s,): n for s, n in m.sink_retries.items()},
            ),
        ]
        for name, doc, label_names, values in labelled:
            family = CounterMetricFamily(f"{PREFIX}_{name}", doc, labels=label_names)
            for label_values, n in values.items():
                family.add_metric(list(label_values), n)
            yield family
        degraded = CounterMetricFamily(
            f"{PREFIX}_sink_degraded_seconds",
            "Seconds a sink spent failing (retrying), including an ongoing outage.",
            labels=["sink"],
        )
        for s, seconds in m.sink_degraded_seconds().items():
            degraded.add_metric([s], seconds)
        yield degraded
        yield from self._gauges()
        yield from self._histograms()

    def _gauges(self) -> Iterator[PromMetric]:
        m = self._m
        yield GaugeMetricFamily(f"{PREFIX}_open_windows", "Windows open now.", m.open_windows)
        depth = GaugeMetricFamily(
            f"{PREFIX}_queue_depth", "Items waiting in a hub queue.", labels=["subscriber"]
        )
        for s, d in m.queue_depths().items():
            depth.add_metric([s], d)
        yield depth
        circuit = GaugeMetricFamily(
            f"{PREFIX}_sink_circuit_open",
            "1 while a sink's circuit breaker is open (writes paused for a cool-down).",
            labels=["sink"],
        )
        for s, is_open in m.sink_circuit_open.items():
            circuit.add_metric([s], 1.0 if is_open else 0.0)
        yield circuit
        yield GaugeMetricFamily(
            f"{PREFIX}_events_per_second",
            f"Events received per second over the last {RATE_WINDOW_S:g} s.",
            m.events_per_second(),
        )
        yield from self._partition_gauges()
        yield from self._ledger_gauges()
        if m.lease_leader is not None:  # absent when the bus needs no lease
            yield GaugeMetricFamily(
                f"{PREFIX}_lease_leader",
                "1 while this instance holds the bus's lease and reads it, 0 on standby.",
                1.0 if m.lease_leader else 0.0,
            )
        # Absent (not NaN) until the first watermark: "unknown" is not a value.
        if m.watermark is not None:
            yield GaugeMetricFamily(
                f"{PREFIX}_watermark_seconds", "Event-time watermark, Unix seconds.", m.watermark
            )
            yield GaugeMetricFamily(
                f"{PREFIX}_processing_lag_seconds",
                "Wall time minus the watermark.",
                m.clock.now() - m.watermark,
            )

    def _ledger_gauges(self) -> Iterator[PromMetric]:
        ledger = self._m.ledger()
        if not ledger:
            return
        events = GaugeMetricFamily(
            f"{PREFIX}_ledger_events",
            "The ledger of the partitions held here, cumulative across restarts: events "
            "received, aggregated, emitted (in emitted windows), open (in open windows), "
            "late, rejected (all reasons), rejected:<reason> and dropped (in windows whose "
            "state could not be used).",
            labels=["counter"],
        )
        for key, n in sorted(ledger.items()):
            if key != "imbalance":
                events.add_metric([key], n)
        yield events
        yield GaugeMetricFamily(
            f"{PREFIX}_ledger_imbalance",
            "received - (emitted + open + late + rejected + dropped) over the partitions held: 0.",
            ledger.get("imbalance", 0),
        )

    def _partition_gauges(self) -> Iterator[PromMetric]:
        parts = self._m.partitions()
        labels = ["partition"]
        wm = GaugeMetricFamily(
            f"{PREFIX}_partition_watermark_seconds",
            "A partition's own watermark: its largest event time minus the grace.",
            labels=labels,
        )
        holds = GaugeMetricFamily(
            f"{PREFIX}_partition_holds_watermark",
            "1 while the partition holds the watermark back; 0 once silent (idle).",
            labels=labels,
        )
        lag = GaugeMetricFamily(
            f"{PREFIX}_partition_lag_messages",
            "Messages unread in the partition at the bus's last report.",
            labels=labels,
        )
        quiet = GaugeMetricFamily(
            f"{PREFIX}_partition_seconds_since_message",
            "Seconds since the partition last delivered a message.",
            labels=labels,
        )
        for p, v in parts.items():
            if v["watermark"] is not None:
                wm.add_metric([p], v["watermark"])
            holds.add_metric([p], 1.0 if v["holds_watermark"] else 0.0)
            if v["lag"] is not None:
                lag.add_metric([p], v["lag"])
            quiet.add_metric([p], v["seconds_since_message"])
        yield from (wm, holds, lag, quiet)

    def _histograms(self) -> Iterator[PromMetric]:
        m = self._m
        yield _histogram(
            "emit_to_durable_seconds",
            "From window emission to durable in every output.",
            m.emit_to_durable,
        )
        yield _histogram("checkpoint_seconds", "Duration of a checkpoint.", m.checkpoint_duration)
        writes = HistogramMetricFamily(
            f"{PREFIX}_sink_write_seconds", "Duration of a successful sink write.", labels=["sink"]
        )
        for s, h in m.sink_write_duration.items():
            writes.add_metric([s], h.prometheus_buckets(), h.sum)
        yield writes


def _bool(flag: bool) -> str:
    return "true" if flag else "false"


def _histogram(name: str, doc: str, hist: _Histogram) -> PromMetric:
    return HistogramMetricFamily(
        f"{PREFIX}_{name}", doc, buckets=hist.prometheus_buckets(), sum_value=hist.sum
    )
