"""Per-source statistics for /status, /metrics (label ``source``) and the page.

Events, errors and the last event time are counted by each source's bus through its
view of the metrics (``MetricsCollector.for_source``); lag and queue depth are read
when asked: lag from the aggregator's partitions (grouped by the source their id
names, :mod:`service.bus.sources`), queue depth from the MultiBus's queues.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from service.bus.sources import source_of
from service.config import Config
from service.metrics.collector import MetricsCollector

__all__ = ["source_view", "sources_status"]

SourceValues = dict[str, dict[str, float | None]]


def source_view(
    count: int,
    partitions: Callable[[], Mapping[str, Mapping[str, Any]]],
    queue_depths: Callable[[], Mapping[str, int]],
) -> Callable[[], SourceValues]:
    """Each source's lag (the sum of its partitions' known lags, None when none is known)
    and queue depth (None without a queue of its own: one source), by position."""

    def read() -> SourceValues:
        depths = queue_depths()
        out: SourceValues = {
            str(k): {"lag": None, "queue_depth": depths.get(str(k)), "partitions": 0}
            for k in range(1, count + 1)
        }
        for partition, view in partitions().items():
            entry = out.get(str(source_of(partition)))
            if entry is None:
                continue
            entry["partitions"] = (entry["partitions"] or 0) + 1
            if (lag := view.get("lag")) is not None:
                entry["lag"] = (entry["lag"] or 0) + lag
        return out

    return read


def sources_status(config: Config, metrics: MetricsCollector) -> list[dict[str, Any]]:
    """One entry per source of VABUS_URL, in order: where it is and how it goes."""
    stats = metrics.sources()
    out = []
    for k, source in enumerate(config.sources, start=1):
        entry = stats.get(str(k), {})
        out.append(
            {
                "source": k,
                "transport": source.kind,
                "url": source.url,
                "events": entry.get("events", 0),
                "errors": entry.get("errors", 0),
                "last_event_time": entry.get("last_event_time"),
                "lag": entry.get("lag"),
                "queue_depth": entry.get("queue_depth"),
                "partitions": entry.get("partitions", 0),
            }
        )
    return out
