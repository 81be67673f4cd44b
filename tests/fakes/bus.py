"""MemoryBus: an in-memory :class:`~service.bus.base.Bus` for unit tests of other stages.

It plays given records per partition, honours restored positions and records what the
service asks of a bus (``commits``, ``sent_metrics``), so tests can assert on them.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from typing import Any

from service.bus.base import Emit, PartitionsAssigned, Restore, SourceBatch
from service.checkpoints.base import PartitionCheckpoint
from service.core.clock import Clock, SystemClock
from service.core.errors import TransientError
from service.core.events import Metric
from service.core.lifecycle import AsyncResource

__all__ = ["MemoryBus"]


class MemoryBus(AsyncResource):
    """Emits each partition's records in order, in batches of ``batch_size``.

    A position is the index of the next record in that partition's list, as a decimal
    string. Partitions take turns batch by batch, so they interleave as with a real
    broker. When everything is emitted the bus waits for :meth:`add` or
    :meth:`stop_intake`, or returns at once with ``stop_after_drain=True``.
    Set ``reachable = False`` to make :meth:`check` fail.
    """

    name = "memory"

    def __init__(
        self,
        partitions: Mapping[str, Sequence[Any]],
        *,
        batch_size: int = 100,
        stop_after_drain: bool = False,
        clock: Clock | None = None,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self._records: dict[str, list[Any]] = {p: list(r) for p, r in partitions.items()}
        self._batch_size = batch_size
        self._stop_after_drain = stop_after_drain
        self._clock = clock or SystemClock()
        self._wakeup = asyncio.Event()
        self._intake_stopped = False
        self.started = False
        self.reachable = True
        self.commits: list[dict[str, str]] = []
        self.sent_metrics: list[list[Metric]] = []
        self.rewinds: list[list[str]] = []
        self.positions: dict[str, int] = {}  # next index to emit, per assigned partition
        self.held: set[str] = set()  # partitions that stall: unread data, nothing delivered
        self._reports: list[str] = []

    async def start(self) -> None:
        self.started = True

    async def stop(self) -> None:
        self.stop_intake()
        self.started = False

    def stop_intake(self) -> None:
        self._intake_stopped = True
        self._wakeup.set()

    def hold(self, partition: str) -> None:
        """Stop delivering ``partition`` (its records stay unread), as a stalled fetch."""
        self.held.add(partition)

    def release(self, partition: str) -> None:
        self.held.discard(partition)
        self._wakeup.set()

    def report(self, partition: str) -> None:
        """Emit a report on ``partition`` next: no records, its unread count as lag."""
        self._reports.append(partition)
        self._wakeup.set()

    def rewind(self, partitions: Sequence[str]) -> None:
        """Assign these partitions again from their stored checkpoints, next."""
        self.rewinds.append(list(partitions))
        for partition in partitions:
            self.positions.pop(partition, None)
        self._wakeup.set()

    def add(self, partition: str, records: Sequence[Any]) -> None:
        """Append records (to a new partition too); a running bus emits them next."""
        self._records.setdefault(partition, []).extend(records)
        self._wakeup.set()

    async def run(self, emit: Emit, restore: Restore) -> None:
        while not self._intake_stopped:
            await self._assign_new(emit, restore)
            emitted = await self._emit_reports(emit)
            for partition in list(self.positions):
                if self._intake_stopped:
                    return
                emitted |= await self._emit_next(partition, emit)
            if emitted:
                continue
            if self._stop_after_drain:
                return
            self._wakeup.clear()
            if not self._pending():
                await self._wakeup.wait()

    def _pending(self) -> bool:
        return bool(self._reports) or any(
            p not in self.positions or (p not in self.held and self.positions[p] < len(r))
            for p, r in self._records.items()
        )

    async def _emit_reports(self, emit: Emit) -> bool:
        reports, self._reports = self._reports, []
        for partition in reports:
            unread = len(self._records.get(partition, ())) - self.positions.get(partition, 0)
            await emit(
                SourceBatch(
                    partition=partition,
                    records=[],
                    source=f"memory {partition}",
                    next_position=None,
                    received_at=self._clock.now(),
                    caught_up=unread == 0,
                    polled_at=self._clock.monotonic(),
                    lag=unread,
                )
            )
        return bool(reports)

    async def _assign_new(self, emit: Emit, restore: Restore) -> None:
        new = [p for p in self._records if p not in self.positions]
        if not new:
            return
        stored = await restore(new)
        checkpoints = [stored.get(p) or PartitionCheckpoint(p, None, None) for p in new]
        for checkpoint in checkpoints:
            self.positions[checkpoint.partition] = int(checkpoint.position or 0)
        await emit(PartitionsAssigned(checkpoints))

    async def _emit_next(self, partition: str, emit: Emit) -> bool:
        if partition not in self.positions:  # rewound while the others were emitted
            return False
        records, start = self._records[partition], self.positions[partition]
        if start >= len(records) or partition in self.held:
            return False
        end = min(start + self._batch_size, len(records))
        self.positions[partition] = end
        await emit(
            SourceBatch(
                partition=partition,
                records=records[start:end],
                source=f"memory {partition}@{start}",
                next_position=str(end),
                received_at=self._clock.now(),
                offsets=list(range(start, end)),
                caught_up=end == len(records),
            )
        )
        return True

    async def commit(self, positions: Mapping[str, str]) -> None:
        self.commits.append(dict(positions))

    async def send_metrics(self, metrics: Sequence[Metric]) -> None:
        self.sent_metrics.append(list(metrics))

    async def check(self) -> None:
        if not self.reachable:
            raise TransientError("memory bus is set unreachable (reachable = False)")
