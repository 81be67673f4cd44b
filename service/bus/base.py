"""The contract between a bus adapter and the rest of the service.

A bus pulls raw messages and hands them on as :class:`SourceBatch` objects through the
``emit`` callable it is given; it never decodes events itself (the aggregator does, in
one tight loop per batch). Control messages about partitions travel the same way so
that they stay ordered with the data.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, Protocol

from service.checkpoints.base import PartitionCheckpoint
from service.core.confirmation import Confirmation
from service.core.events import Metric

log = logging.getLogger(__name__)

__all__ = [
    "REPORT_INTERVAL_S",
    "Bus",
    "BusItem",
    "Emit",
    "Origin",
    "OriginReport",
    "PartitionsAssigned",
    "PartitionsRevoked",
    "Progress",
    "Restore",
    "RewindByRerun",
    "SourceBatch",
]


Origin = tuple[str, int, int]
"""(input partition, offset, element index) of a repartitioned record."""


@dataclass(frozen=True, slots=True)
class OriginReport:
    """What a routing stage knows of one input partition it reads (repartitioned input)."""

    max_ts: float | None  # largest valid event time it routed from there; None: none yet
    caught_up: bool  # nothing was unread at its last fetch
    silent_for: float  # seconds since a fetch last brought a message from it


@dataclass(frozen=True, slots=True)
class Progress:
    """A routing stage's report, written to every internal partition about once a second
    (:mod:`service.aggregation.origins` explains what the windowing stage does with it)."""

    topic: str  # the input topic
    partitions: int  # how many partitions it has: the origins an internal partition expects
    origins: dict[str, OriginReport]  # "<topic>:<partition>" -> report, for those it reads


@dataclass(slots=True)
class SourceBatch:
    """Messages from one source partition, in order.

    ``records`` holds one entry per transport message: ``bytes`` (undecoded text of a
    Kafka message: one event or a JSON array) or an already-decoded JSON value (an
    element of an HTTP response's ``events`` list).
    ``offsets`` (Kafka) gives each record's offset for dead-letter ``source`` fields;
    when absent, ``source`` alone describes where the records came from.
    ``next_position`` is what to persist so that a restart continues after this batch.
    ``caught_up`` says the partition had nothing more to read when this was fetched.
    ``polled_at`` is the bus's monotonic clock when it looked at the partition (the
    aggregator's clock at processing time when absent); ``lag`` how many messages were
    still unread then, when the transport knows.
    Repartitioned input only: ``origins`` gives each record's place in the original
    input; ``progress`` is a routing stage's report that followed the records in the
    internal partition (it applies after them).

    A batch without records is a *report*: a bus reports each caught-up partition that
    delivers nothing at least every :data:`REPORT_INTERVAL_S`, because a partition
    stops holding the watermark only on the evidence of such reports (see
    :mod:`service.aggregation.partition`).
    """

    partition: str
    records: list[Any]
    source: str
    next_position: str | None
    received_at: float
    offsets: list[int] | None = None
    caught_up: bool = False
    polled_at: float | None = None
    lag: int | None = None
    origins: list[Origin] | None = None
    progress: Progress | None = None
    # records the bus found unusable (index -> (reason, detail, elements)): the
    # aggregator dead-letters them and takes them out of the batch (repartitioned input)
    rejected: dict[int, tuple[str, str, int]] | None = None


REPORT_INTERVAL_S: Final = 1.0
"""How often a bus reports a caught-up partition that delivers nothing."""


@dataclass(slots=True)
class PartitionsAssigned:
    """The bus now reads these partitions; restored state comes along."""

    checkpoints: list[PartitionCheckpoint]


@dataclass(slots=True)
class PartitionsRevoked:
    """The bus gives these partitions up. ``done`` is confirmed once their state and
    outputs are durable, so the bus can let go of them safely; a bus that stops waiting
    for it abandons it (:class:`~service.core.confirmation.Confirmation`)."""

    partitions: list[str]
    done: Confirmation = field(default_factory=Confirmation)


BusItem = SourceBatch | PartitionsAssigned | PartitionsRevoked
Emit = Callable[[BusItem], Awaitable[None]]
Restore = Callable[[Sequence[str]], Awaitable[dict[str, PartitionCheckpoint]]]
"""Loads the stored checkpoints of the given partitions (missing ones are absent)."""


class Bus(Protocol):
    """A VaBus transport."""

    name: str  # transport name for logs and metrics: "http", "kafka", "demo", "memory"

    async def start(self) -> None:
        """Connect. Retries transient failures itself; raises only on permanent ones."""

    async def stop(self) -> None:
        """Disconnect. Idempotent."""

    async def run(self, emit: Emit, restore: Restore) -> None:
        """Pull forever, handing each batch to ``emit`` (which applies backpressure).

        Before the first batch of a partition, call ``restore`` and emit
        :class:`PartitionsAssigned`, then continue from the restored positions.
        Returns when cancelled or after :meth:`stop_intake`.
        """

    def stop_intake(self) -> None:
        """Stop pulling new messages; :meth:`run` returns soon after."""

    def rewind(self, partitions: Sequence[str]) -> None:
        """Deliver these partitions again from their stored checkpoints, as after a new
        assignment: restore them, emit :class:`PartitionsAssigned`, then their records
        from the restored positions. Asked when applying a batch raised (the stage
        dropped their state); returns at once and takes effect soon after. Partitions
        no longer assigned here are skipped: their next owner restores them anyway.
        """

    async def commit(self, positions: Mapping[str, str]) -> None:
        """Tell the bus that everything before these positions is durable."""

    async def send_metrics(self, metrics: Sequence[Metric]) -> None:
        """Publish the service's own metrics to the bus."""

    async def check(self) -> None:
        """Raise a :class:`~service.core.errors.TransientError` if the bus is unreachable."""


class RewindByRerun:
    """:meth:`Bus.rewind` for a bus whose reading restores its partitions before its
    first batch (a single-partition bus: HTTP, demo): a rewind cancels the reading and
    starts it again, which restores the stored checkpoints and continues from them."""

    def __init__(self) -> None:
        self._asked = asyncio.Event()

    def rewind(self, partitions: Sequence[str]) -> None:
        self._asked.set()

    async def run(self, read: Callable[[], Awaitable[None]]) -> None:
        """Run ``read`` until it returns, again from the start after each rewind."""
        while True:
            self._asked.clear()
            reader = asyncio.ensure_future(read())
            asked = asyncio.ensure_future(self._asked.wait())
            try:
                await asyncio.wait({reader, asked}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                asked.cancel()
                rewound = not reader.done()
                if rewound:
                    reader.cancel()
                    await asyncio.gather(reader, return_exceptions=True)
            if not rewound:
                return reader.result()
            log.warning("reading again from the stored checkpoints (rewind)")
