"""What the Kafka bus needs to read the internal topic of repartitioned input."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any, Protocol

from service.bus.base import Origin, Progress

__all__ = ["InternalRecords", "Marked", "OnMalformed"]

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
