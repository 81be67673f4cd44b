"""MultiBus: several sources read as one bus (VABUS_URL with several URLs, contract §12.8).

Each source is its own bus, read by its own task into its own bounded queue; one
forwarding task per source hands the queue on to the pipeline in order. So a source
whose server hangs, whose broker is down, or which simply has a lot to read, holds up
nobody but itself: the others' tasks go on, and a full queue (``VABUS_SOURCE_QUEUE``)
blocks only its own source. The pipeline's own queue stays the one bound they share.

Partition ids are qualified on the way in (:mod:`service.bus.sources`: source 1 keeps
its ids, source ``k`` gets ``s{k}/``) and unqualified on the way out (restore, commit,
rewind), so each bus sees only its own ids and the checkpoint store only qualified ones.

**A source that says nothing.** The watermark spans every source's partitions, and a
partition stops holding it only on a bus report that finds it silent
(:mod:`service.aggregation.partition`). A bus reports about once a second while it can
read; one waiting on a server that does not answer, or retrying a broker that is gone,
reports nothing, and its partitions would hold every other source's windows for as
long. So when a source has handed over nothing at all, not even a report, for the idle
timeout (``AGGREGATION_IDLE_TIMEOUT``, default interval + grace) while its queue is
empty (it is not waiting on us), its partitions are reported for it, every second
while it stays so: no message, nothing known to be unread. That is the contract's
idleness rule (§11: no message of any kind for that long); the partitions stop holding
the watermark at once (a partition that never delivered too), and the other sources'
windows close on time. Its events that come after the windows they belong to are late
(or corrections, with an allowed lateness), as for any partition that fell silent.

A source's transient failures are retried inside its bus (as with one source), so they
stall nobody; a permanent one (refused credentials, say) ends :meth:`run` with that
error, as it would end a service with that one source. The service's own metrics go to
the bus of source 1 only, as they did before there were several sources.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Final

from service.bus.base import (
    REPORT_INTERVAL_S,
    Bus,
    BusItem,
    Emit,
    PartitionsAssigned,
    PartitionsRevoked,
    Restore,
    SourceBatch,
)
from service.bus.sources import local_partition, qualify, source_of
from service.checkpoints.base import PartitionCheckpoint
from service.core.clock import Clock
from service.core.errors import TransientError, describe_error
from service.core.events import Metric
from service.core.retry import Backoff, retry

__all__ = ["STARTING", "MultiBus", "Source"]

log = logging.getLogger(__name__)

STARTING: Final = "(starting)"
"""The local id of a source's placeholder partition while it starts (see ``run``)."""
_START_BACKOFF: Final = Backoff(initial_s=0.5, maximum_s=15.0)


@dataclass(slots=True)
class Source:
    """One source: its position in VABUS_URL (1-based), its bus and its intake state."""

    position: int
    bus: Bus
    url: str
    queue: asyncio.Queue[BusItem | None]  # None: the reader's last item (its bus returned)
    live: set[str] = field(default_factory=set)  # the ids assigned to it now
    last_item_at: float = 0.0  # monotonic time the bus last handed something over
    reported_at: float = 0.0  # monotonic time its partitions were last reported for it
    starting: bool = False  # its placeholder partition holds the watermark (see run)
    unreported: list[str] = field(default_factory=list)  # of a silent round, not yet reported

    @property
    def label(self) -> str:
        return f"source {self.position} ({self.url})"


class MultiBus:
    """Implements :class:`~service.bus.base.Bus` over the buses of several sources.

    ``run`` starts each source's bus (retrying transient failures, so a source that is
    down at start-up delays only itself), reads them all until :meth:`stop_intake`, and
    returns once every queue is drained into ``emit``.
    """

    def __init__(
        self,
        buses: Sequence[tuple[Bus, str]],
        clock: Clock,
        *,
        queue_size: int,
        idle_timeout_s: float,
    ) -> None:
        if len(buses) < 2:
            raise ValueError("a MultiBus reads at least two sources")
        self.name = "+".join(bus.name for bus, _ in buses)
        self.sources = [
            Source(k, bus, url, asyncio.Queue(queue_size))
            for k, (bus, url) in enumerate(buses, start=1)
        ]
        self._clock = clock
        self._idle_timeout_s = idle_timeout_s
        self._stopping = asyncio.Event()

    # -- lifecycle ------------------------------------------------------------------
    async def start(self) -> None:
        """Nothing to connect yet: each source starts in its own reading task."""
        self._stopping.clear()

    async def stop(self) -> None:
        self.stop_intake()
        results = await asyncio.gather(
            *(s.bus.stop() for s in self.sources), return_exceptions=True
        )
        for source, result in zip(self.sources, results, strict=True):
            if isinstance(result, Exception):
                log.warning("%s: stopping failed: %s", source.label, describe_error(result))

    def stop_intake(self) -> None:
        self._stopping.set()
        for source in self.sources:
            source.bus.stop_intake()

    def queue_depths(self) -> dict[str, int]:
        """Batches waiting in each source's queue, by source position."""
        return {str(s.position): s.queue.qsize() for s in self.sources}

    # -- data path ------------------------------------------------------------------
    async def run(self, emit: Emit, restore: Restore) -> None:
        """Read every source. Until a source's bus hands over its first item (a Kafka
        source joins its group first, which takes seconds) a placeholder partition of
        its own (:data:`STARTING`) holds the watermark with unknown event time, so the
        sources that start first cannot close windows that its unread events belong
        to; it is revoked right after that first item (its own partitions hold from
        then on), or once the source has said nothing for the idle timeout (it is
        silent then, §11)."""
        started = self._clock.monotonic()
        tasks: list[asyncio.Task[None]] = []
        for s in self.sources:
            s.starting, s.last_item_at = True, started
            s.queue.put_nowait(PartitionsAssigned([PartitionCheckpoint(_starting(s), None, None)]))
            tasks.append(asyncio.create_task(self._read(s, restore), name=f"read-{s.position}"))
            tasks.append(asyncio.create_task(self._forward(s, emit), name=f"fwd-{s.position}"))
        watch = asyncio.create_task(self._report_silent(), name="silent-sources")
        try:
            pending: set[asyncio.Task[None]] = set(tasks)
            while pending:
                done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_EXCEPTION)
                for task in done:
                    if not task.cancelled() and (exc := task.exception()) is not None:
                        raise exc
        finally:
            watch.cancel()
            for task in tasks:
                task.cancel()
            await asyncio.gather(watch, *tasks, return_exceptions=True)

    async def _read(self, s: Source, restore: Restore) -> None:
        """Start the source's bus, then run it; its end (a stop) is queued last."""
        try:
            await retry(
                s.bus.start,
                name=f"starting {s.label}",
                backoff=_START_BACKOFF,
                clock=self._clock,
                stop=self._stopping,
            )
        except TransientError:
            if not self._stopping.is_set():
                raise
        if not self._stopping.is_set():
            await s.bus.run(self._emitter(s), self._restorer(s, restore))
        await s.queue.put(None)

    async def _forward(self, s: Source, emit: Emit) -> None:
        while True:
            item = await s.queue.get()
            if item is None:
                return
            await emit(item)

    def _emitter(self, s: Source) -> Emit:
        """What the source's bus emits into: qualified ids, into its own queue."""
        k = s.position

        async def emit(item: BusItem) -> None:
            # the placeholder goes right after the first item, not before: in between,
            # another source's batch could be applied while this one holds nothing
            first, s.starting = s.starting, False
            if type(item) is SourceBatch:
                item.partition = qualify(k, item.partition)
            elif type(item) is PartitionsAssigned:
                item = PartitionsAssigned([_requalified(k, c) for c in item.checkpoints])
                s.live.update(c.partition for c in item.checkpoints)
            elif type(item) is PartitionsRevoked:
                # the same item: the bus waits on its ``done``
                item.partitions = [qualify(k, p) for p in item.partitions]
                s.live.difference_update(item.partitions)
            s.last_item_at = self._clock.monotonic()
            await s.queue.put(item)
            if first:
                await s.queue.put(PartitionsRevoked([_starting(s)]))

        return emit

    @staticmethod
    def _restorer(s: Source, restore: Restore) -> Restore:
        k = s.position

        async def restore_local(partitions: Sequence[str]) -> dict[str, PartitionCheckpoint]:
            stored = await restore([qualify(k, p) for p in partitions])
            return {local_partition(q): _localised(c) for q, c in stored.items()}

        return restore_local

    async def _report_silent(self) -> None:
        """Report the partitions of each source that says nothing (module docstring)."""
        while True:
            await self._clock.sleep(REPORT_INTERVAL_S)
            now = self._clock.monotonic()
            for s in self.sources:
                if s.starting and now - s.last_item_at >= self._idle_timeout_s:
                    if s.queue.full():
                        continue  # the next tick
                    log.warning("%s: nothing read yet; it no longer holds the watermark", s.label)
                    s.starting = False
                    s.queue.put_nowait(PartitionsRevoked([_starting(s)]))
                quiet = now - s.last_item_at >= self._idle_timeout_s
                due = now - s.reported_at >= REPORT_INTERVAL_S
                if quiet and due and s.live and s.queue.empty() and not self._stopping.is_set():
                    s.unreported = s.unreported or sorted(s.live)
                    # more partitions than the queue holds: the rest at the next tick
                    while s.unreported and not s.queue.full():
                        partition = s.unreported.pop()
                        if partition in s.live:
                            s.queue.put_nowait(_silent_report(s, partition, self._clock, now))
                    if not s.unreported:
                        s.reported_at = now

    def rewind(self, partitions: Sequence[str]) -> None:
        for k, ids in _by_source(p for p in partitions if p not in self._placeholders).items():
            if k <= len(self.sources):
                self.sources[k - 1].bus.rewind(list(ids))

    @property
    def _placeholders(self) -> set[str]:
        return {_starting(s) for s in self.sources}

    # -- side channels ----------------------------------------------------------------
    async def commit(self, positions: Mapping[str, str]) -> None:
        """Each source's bus gets its own positions, all at once (none waits on another)."""
        await asyncio.gather(
            *(
                self.sources[k - 1].bus.commit({p: positions[q] for p, q in ids.items()})
                for k, ids in _by_source(positions).items()
                if k <= len(self.sources)
            )
        )

    async def send_metrics(self, metrics: Sequence[Metric]) -> None:
        await self.sources[0].bus.send_metrics(metrics)

    async def check(self) -> None:
        """Raise naming every source that fails its own check."""
        results = await asyncio.gather(
            *(s.bus.check() for s in self.sources), return_exceptions=True
        )
        failing = [
            f"{s.label}: {describe_error(r)}"
            for s, r in zip(self.sources, results, strict=True)
            if isinstance(r, Exception)
        ]
        if failing:
            raise TransientError("; ".join(failing))


def _by_source(partitions: Iterable[str]) -> dict[int, dict[str, str]]:
    """Qualified ids by source position: each source's local id -> the qualified one."""
    out: dict[int, dict[str, str]] = {}
    for partition in partitions:
        out.setdefault(source_of(partition), {})[local_partition(partition)] = partition
    return out


def _starting(s: Source) -> str:
    """The placeholder partition of a source that has not handed anything over yet: no
    bus names a partition so (a Kafka topic name holds no parentheses)."""
    return qualify(s.position, STARTING)


def _requalified(k: int, c: PartitionCheckpoint) -> PartitionCheckpoint:
    qualified = qualify(k, c.partition)
    return c if qualified == c.partition else replace(c, partition=qualified)


def _localised(c: PartitionCheckpoint) -> PartitionCheckpoint:
    local = local_partition(c.partition)
    return c if local == c.partition else replace(c, partition=local)


def _silent_report(s: Source, partition: str, clock: Clock, now: float) -> SourceBatch:
    """A report on ``partition`` for a source that said nothing: no message, caught up
    (nothing known to be unread), seen now."""
    return SourceBatch(
        partition=partition,
        records=[],
        source=f"{s.label}: no answer",
        next_position=None,
        received_at=clock.now(),
        caught_up=True,
        polled_at=now,
    )
