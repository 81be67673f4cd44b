"""How the Kafka bus reads the internal topic of repartitioned input."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Protocol

from service.bus.base import Origin, Progress
from service.metrics.collector import MetricsCollector

__all__ = ["InternalRecords", "InternalTopicReader", "Marked", "OnMalformed"]

log = logging.getLogger(__name__)

OnMalformed = Callable[[str, bytes | None], None]
"""Told of each malformed internal record: ``(kind, raw header or value)``."""
Marked = dict[int, tuple[str, str, int]]
"""Records to dead-letter instead of aggregating: index -> (reason, detail, elements)."""


class InternalRecords(Protocol):
    """How the bus reads the internal topic of repartitioned input. The routing stage owns
    that format and sits above the bus, so the wiring hands it in
    (:mod:`service.repartition.records`) instead of the bus importing it."""

    def split_at_progress(
        self, msgs: Sequence[Any], on_malformed: OnMalformed | None = None
    ) -> Iterable[tuple[Sequence[Any], Progress | None, int]]: ...

    def read_origins(
        self, msgs: Sequence[Any], on_malformed: OnMalformed | None = None
    ) -> tuple[list[Origin], Marked]: ...


class InternalTopicReader:
    """Reads runs of internal records for the bus, counting each malformed one and
    logging the first of each kind (a flood of them must not flood the log: the metric
    counts them all)."""

    def __init__(
        self, records: InternalRecords, metrics: MetricsCollector, bus_name: str, topic: str
    ) -> None:
        self._records = records
        self._metrics = metrics
        self._bus_name = bus_name
        self._topic = topic
        self._malformed_logged: set[str] = set()  # kinds of malformed records logged once

    def split_at_progress(
        self, msgs: Sequence[Any]
    ) -> Iterable[tuple[Sequence[Any], Progress | None, int]]:
        return self._records.split_at_progress(msgs, self._on_malformed)

    def origins(self, run: Sequence[Any]) -> tuple[list[Origin], Marked | None]:
        """The origins of a run of internal records, and those to dead-letter (records
        whose origin header is malformed cannot be checked for replays)."""
        origins, marked = self._records.read_origins(run, self._on_malformed)
        return origins, marked or None

    def _on_malformed(self, kind: str, raw: bytes | None) -> None:
        self._metrics.on_bus_protocol_error(self._bus_name, kind)
        if kind not in self._malformed_logged:
            self._malformed_logged.add(kind)
            log.error(
                "kafka bus: %s on the internal topic %r: %r (%s; further ones are only "
                "counted in vabus_aggregator_bus_protocol_errors_total)",
                kind.replace("_", " "),
                self._topic,
                (raw or b"")[:200],
                "dead-lettered as invalid_origin" if kind == "malformed_origin" else "skipped",
            )
