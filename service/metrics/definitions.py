"""Every metric of the service, declared once.

A :class:`Declared` entry gives a metric's name, kind, help, labels and buckets (what
Prometheus sees), the keys and shapes it takes in ``/status``, and whether it is sent
to the bus. :class:`~service.metrics.collector.MetricsCollector` builds its prometheus_client
objects, its exposition, its snapshot and its bus metrics from :data:`DECLARED` alone.
The order here is the order of the exposition.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final, Literal

__all__ = [
    "DECLARED",
    "DURATION_BUCKETS",
    "LATENCY_BUCKETS",
    "PREFIX",
    "RATE_WINDOW_S",
    "SUPERVISOR",
    "WORKER_LABEL",
    "Declared",
    "Values",
]

PREFIX: Final = "vabus_aggregator"
RATE_WINDOW_S: Final = 10.0
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

Values = Mapping[tuple[str, ...], float]
"""A metric's current values by label values (``()`` for an unlabelled metric); a
histogram's are its observation counts."""

StatusForm = Callable[[Values], Any]


# -- shapes in /status (JSON-able; counts are ints, as they always were) ---------------
def count(v: Values) -> int:
    return int(v.get((), 0))


def total(v: Values) -> int:
    return int(sum(v.values()))


def number(v: Values) -> float | None:
    """The value, or ``None`` while unknown (JSON has no NaN)."""
    return v.get(())


def by_label(v: Values) -> dict[str, int]:
    return {k[0]: int(n) for k, n in v.items()}


def seconds_by_label(v: Values) -> dict[str, float]:
    return {k[0]: n for k, n in v.items()}


def flags(v: Values) -> dict[str, bool]:
    return {k[0]: bool(n) for k, n in v.items()}


def joined(v: Values) -> dict[str, int]:
    return {":".join(k): int(n) for k, n in v.items()}


def nested(v: Values) -> dict[str, dict[str, int]]:
    """``(a, b)`` -> ``{a: {b: n}}``: for label values that may hold ``:`` themselves."""
    out: dict[str, dict[str, int]] = {}
    for (a, b), n in v.items():
        out.setdefault(a, {})[b] = int(n)
    return out


def by_retriable(v: Values) -> dict[str, dict[str, int]]:
    """``(name, "true"|"false")`` -> ``{name: {"retriable"|"permanent": n}}``."""
    out: dict[str, dict[str, int]] = {}
    for (name, retriable), n in v.items():
        out.setdefault(name, {})["retriable" if retriable == "true" else "permanent"] = int(n)
    return out


@dataclass(frozen=True, slots=True)
class Declared:
    """One metric. ``name`` has no prefix; prometheus_client adds a counter's ``_total``."""

    name: str
    kind: Literal["counter", "gauge", "histogram"]
    help: str
    labels: tuple[str, ...] = ()
    buckets: tuple[float, ...] = ()
    # Computed when read from the collector's state or a component's view (see
    # MetricsCollector._views) rather than kept in a prometheus_client object.
    on_scrape: bool = False
    # Absent from the exposition (not empty, not NaN) while it has no value.
    optional: bool = False
    # (key, shape) of each place it takes in /status.
    status: tuple[tuple[str, StatusForm], ...] = ()
    # Sent to the bus as one number summed over its labels (NaN while unknown).
    bus: bool = False
    # Also sent to the bus once per value of its (single) label, under this name.
    bus_each: str | None = None

    @property
    def full_name(self) -> str:
        return f"{PREFIX}_{self.name}"


def _counter(name: str, help: str, *labels: str, bus: bool = False) -> Declared:
    """A counter shown in /status under its own name: a count, or a count per label."""
    if not labels:
        form: StatusForm = count
    elif len(labels) == 1:
        form = by_label
    else:
        form = joined
    return Declared(name, "counter", help, labels, status=((name, form),), bus=bus)


def _partition(name: str, help: str) -> Declared:
    return Declared(name, "gauge", help, ("partition",), on_scrape=True)


DECLARED: Final[tuple[Declared, ...]] = (
    _counter("events_received", "Events received from the bus.", bus=True),
    _counter("events_aggregated", "Events added to windows.", bus=True),
    _counter("events_late", "Events behind the watermark past grace.", bus=True),
    _counter(
        "events_late_applied",
        "Late events applied to an emitted window as a correction (allowed lateness).",
        bus=True,
    ),
    _counter(
        "events_ahead",
        "Events aggregated without moving event time: too far ahead of the clock.",
        bus=True,
    ),
    _counter(
        "series_overflow",
        "Events aggregated into a name's overflow series: their tag set was beyond "
        "AGGREGATION_MAX_SERIES_PER_NAME in their window.",
        bus=True,
    ),
    _counter("aggregates_emitted", "Aggregates from closed windows.", bus=True),
    _counter("metrics_publish_errors", "Failed metric sends."),
    _counter("lease_lost", "Times the bus's lease was lost while reading."),
    _counter("replays_dropped", "Repartitioned records dropped as replays of the routing stage."),
    _counter(
        "dead_letters_rolled_up",
        "Rejected elements of a message written as one roll-up dead letter.",
    ),
    _counter(
        "stage_rewinds",
        "Batches that raised in the aggregator: partitions read again from checkpoints.",
    ),
    _counter("messages_received", "Transport messages received.", "transport"),
    Declared(
        "events_rejected",
        "counter",
        "Events sent to dead letters.",
        ("reason",),
        status=(("events_rejected", total), ("events_rejected_by_reason", by_label)),
        bus=True,
    ),
    _counter(
        "state_dropped",
        "Window state (what=window) or a partition's checkpointed state "
        "(what=partition) that could not be used and was dropped.",
        "what",
    ),
    Declared(
        "bus_errors",
        "counter",
        "Failed bus operations.",
        ("transport", "retriable"),
        status=(("bus_errors", by_retriable),),
        bus=True,
    ),
    _counter(
        "bus_protocol_errors",
        "Bus answers or internal records refused as breaking the protocol.",
        "transport",
        "kind",
    ),
    _counter("sink_writes", "Successful sink writes.", "sink"),
    _counter("archive_files_written", "Parquet files written to the archive (ARCHIVE_URL)."),
    _counter("archive_events_written", "Accepted events written to the archive (ARCHIVE_URL)."),
    _counter("sink_aggregates_written", "Aggregates made durable.", "sink"),
    _counter("sink_dead_letters_written", "Dead letters made durable.", "sink"),
    Declared(
        "route_aggregates_written",
        "counter",
        "Aggregates made durable per route of ROUTES_FILE (default: no rule matched) and "
        "destination (<output>:<topic or table>).",
        ("route", "destination"),
        status=(("route_aggregates_written", nested),),
    ),
    Declared(
        "sink_errors",
        "counter",
        "Failed sink writes.",
        ("sink", "retriable"),
        status=(("sink_errors", by_retriable),),
        bus=True,
    ),
    _counter("subscriber_crashes", "Hub subscriber task crashes.", "subscriber"),
    _counter("sink_retries", "Sink writes retried after a transient failure.", "sink", bus=True),
    Declared(
        "sink_degraded_seconds",
        "counter",
        "Seconds a sink spent failing (retrying), including an ongoing outage.",
        ("sink",),
        on_scrape=True,
        status=(("sink_degraded_seconds", seconds_by_label),),
        bus=True,
    ),
    Declared(
        "open_windows",
        "gauge",
        "Windows open now.",
        status=(("open_windows", count),),
        bus=True,
    ),
    Declared(
        "queue_depth",
        "gauge",
        "Items waiting in a hub queue.",
        ("subscriber",),
        on_scrape=True,
        status=(("queue_depth", by_label),),
        bus=True,
        bus_each="subscriber_queue_depth",
    ),
    Declared(
        "sink_circuit_open",
        "gauge",
        "1 while a sink's circuit breaker is open (writes paused for a cool-down).",
        ("sink",),
        status=(("sink_circuit_open", flags),),
    ),
    Declared(
        "events_per_second",
        "gauge",
        f"Events received per second over the last {RATE_WINDOW_S:g} s.",
        on_scrape=True,
        status=(("events_per_second", number),),
        bus=True,
    ),
    _partition(
        "partition_watermark_seconds",
        "A partition's own watermark: its largest event time minus the grace.",
    ),
    _partition(
        "partition_holds_watermark",
        "1 while the partition holds the watermark back; 0 once silent (idle).",
    ),
    _partition(
        "partition_lag_messages", "Messages unread in the partition at the bus's last report."
    ),
    _partition(
        "partition_seconds_since_message",
        "Seconds since the partition last delivered a message.",
    ),
    # absent until a source's bus reports (the exposition of a collector without
    # sources is what it was before there were several)
    Declared(
        "source_events_received",
        "counter",
        "Events received from each source of VABUS_URL.",
        ("source",),
        on_scrape=True,
        optional=True,
    ),
    Declared(
        "source_errors",
        "counter",
        "Failed bus operations of each source of VABUS_URL.",
        ("source",),
        on_scrape=True,
        optional=True,
    ),
    Declared(
        "source_last_event_seconds",
        "gauge",
        "When each source last delivered messages, Unix seconds.",
        ("source",),
        on_scrape=True,
        optional=True,
    ),
    Declared(
        "source_lag_messages",
        "gauge",
        "Messages unread in each source's partitions at their last reports (when known).",
        ("source",),
        on_scrape=True,
        optional=True,
    ),
    Declared(
        "source_queue_depth",
        "gauge",
        "Batches waiting in each source's own queue (several sources only).",
        ("source",),
        on_scrape=True,
        optional=True,
    ),
    Declared(
        "ledger_events",
        "gauge",
        "The ledger of the partitions held here, cumulative across restarts: events "
        "received, aggregated, emitted (in emitted windows), open (in open windows), "
        "late, rejected (all reasons), rejected:<reason> and dropped (in windows whose "
        "state could not be used).",
        ("counter",),
        on_scrape=True,
        optional=True,
    ),
    Declared(
        "ledger_imbalance",
        "gauge",
        "received - (emitted + open + late + rejected + dropped) over the partitions held: 0.",
        on_scrape=True,
        optional=True,
    ),
    Declared(
        "lease_leader",
        "gauge",
        "1 while this instance holds the bus's lease and reads it, 0 on standby.",
        on_scrape=True,
        optional=True,  # absent when the bus needs no lease
    ),
    Declared(
        "watermark_seconds",
        "gauge",
        "Event-time watermark, Unix seconds.",
        on_scrape=True,
        optional=True,  # "unknown" is not a value
        status=(("watermark", number),),
    ),
    Declared(
        "processing_lag_seconds",
        "gauge",
        "Wall time minus the watermark.",
        on_scrape=True,
        optional=True,
        status=(("processing_lag_seconds", number),),
        bus=True,
    ),
    Declared(
        "emit_to_durable_seconds",
        "histogram",
        "From window emission to durable in every output.",
        buckets=LATENCY_BUCKETS,
    ),
    Declared(
        "checkpoint_seconds",
        "histogram",
        "Duration of a checkpoint.",
        buckets=DURATION_BUCKETS,
        status=(("checkpoints", count),),
    ),
    Declared(
        "sink_write_seconds",
        "histogram",
        "Duration of a successful sink write.",
        ("sink",),
        buckets=DURATION_BUCKETS,
    ),
)

# WORKERS=N: the label that tells the workers' series apart in the merged exposition
WORKER_LABEL: Final = "worker"

# WORKERS=N: the supervisor's own families, computed from its worker slots when scraped
# and served beside the workers' merged expositions (service.workers.exposition).
SUPERVISOR: Final[tuple[Declared, ...]] = (
    Declared("workers", "gauge", "Worker processes configured (WORKERS).", on_scrape=True),
    Declared(
        "worker_up", "gauge", "1 while the worker's process runs.", (WORKER_LABEL,), on_scrape=True
    ),
    Declared(
        "worker_restarts",
        "counter",
        "Times a worker was started again after it exited.",
        (WORKER_LABEL,),
        on_scrape=True,
    ),
    Declared(
        "worker_uptime_seconds",
        "gauge",
        "Seconds since the worker's current process started (0 while none runs).",
        (WORKER_LABEL,),
        on_scrape=True,
    ),
    Declared(
        "worker_scrape_success",
        "gauge",
        "1 if this exposition holds the worker's own metrics.",
        (WORKER_LABEL,),
        on_scrape=True,
    ),
)
