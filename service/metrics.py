"""MetricsCollector: components report through ``on_*`` hooks; nothing else touches metrics.

STUB: the hook signatures below are the contract other modules rely on. The
implementation (prometheus registry, snapshot, periodic publish) fills them in.
"""

from __future__ import annotations

from collections.abc import Sequence

from service.clock import Clock, SystemClock
from service.events import Aggregate

__all__ = ["MetricsCollector"]


class MetricsCollector:
    def __init__(self, clock: Clock | None = None) -> None:
        self.clock = clock or SystemClock()

    # -- intake ---------------------------------------------------------------------
    def on_messages_received(self, transport: str, messages: int, events: int) -> None:
        """A bus fetch returned ``messages`` transport messages holding ``events`` events."""

    def on_bus_error(self, transport: str, retriable: bool) -> None: ...

    # -- aggregation ----------------------------------------------------------------
    def on_events_aggregated(self, n: int) -> None: ...

    def on_events_rejected(self, reason: str, n: int = 1) -> None: ...

    def on_events_late(self, n: int = 1) -> None: ...

    def on_aggregates_emitted(self, aggregates: Sequence[Aggregate]) -> None: ...

    def set_open_windows(self, n: int) -> None: ...

    def set_watermark(self, event_time: float | None) -> None: ...

    # -- outputs --------------------------------------------------------------------
    def on_sink_write(self, sink: str, aggregates: int, dead_letters: int, seconds: float) -> None:
        ...

    def on_sink_error(self, sink: str, retriable: bool) -> None: ...

    def on_aggregates_durable(self, emitted_at: Sequence[float]) -> None:
        """Aggregates emitted at these wall times are now durable in every output."""

    def on_checkpoint(self, seconds: float) -> None: ...

    # -- hub ------------------------------------------------------------------------
    def on_subscriber_crash(self, subscriber: str) -> None: ...

    def set_queue_depth(self, subscriber: str, depth: int) -> None: ...
