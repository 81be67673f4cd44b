"""The aggregator as a hub subscriber: turns input items into outputs and checkpoints."""

from __future__ import annotations

import logging
from typing import Any

from service.aggregation.aggregator import EventAggregator, Outputs
from service.bus.base import PartitionsAssigned, PartitionsRevoked, SourceBatch
from service.clock import Clock
from service.flow import OUTPUT, Checkpoint, CheckpointRequest, Tick
from service.hub import EventHub

__all__ = ["AggregatorStage"]

log = logging.getLogger(__name__)


class AggregatorStage:
    """Feeds :class:`EventAggregator` and publishes what it produces, in order.

    A checkpoint is taken every ``checkpoint_interval_s`` while something changed,
    right after an idle flush, on a revocation (for the revoked partitions) and on
    request (shutdown).
    """

    def __init__(
        self,
        aggregator: EventAggregator,
        hub: EventHub,
        clock: Clock,
        checkpoint_interval_s: float,
    ) -> None:
        self._agg = aggregator
        self._hub = hub
        self._clock = clock
        self._interval = checkpoint_interval_s
        self._last_checkpoint = clock.monotonic()
        self._dirty = False
        self._inflight: list[Any] | None = None
        self._done = 0

    async def handle(self, items: list[Any]) -> None:
        # The hub retries a failed call with the same list: skip what was already done,
        # so a crash never aggregates a batch twice.
        first = self._done if items is self._inflight else 0
        self._inflight, self._done = items, first
        for item in items[first:]:
            await self._handle_one(item)
            self._done += 1

    async def _handle_one(self, item: Any) -> None:
        if type(item) is SourceBatch:
            await self._publish(self._agg.process(item))
            self._dirty = True
        elif type(item) is Tick:
            flushed = self._agg.tick()
            if flushed:
                await self._publish(flushed)
                await self._checkpoint(None)
            elif self._dirty and self._clock.monotonic() - self._last_checkpoint >= self._interval:
                await self._checkpoint(None)
        elif type(item) is PartitionsAssigned:
            self._agg.restore(item.checkpoints)
            log.info("partitions assigned: %s", [c.partition for c in item.checkpoints])
        elif type(item) is PartitionsRevoked:
            snapshot = self._agg.release(item.partitions)
            await self._hub.publish(OUTPUT, Checkpoint(snapshot, item.done))
            log.info("partitions revoked: %s", item.partitions)
        elif type(item) is CheckpointRequest:
            await self._checkpoint(item)
        else:
            raise TypeError(f"unexpected input item {type(item).__name__}")

    async def _publish(self, out: Outputs) -> None:
        if out:
            await self._hub.publish(OUTPUT, out)

    async def _checkpoint(self, request: CheckpointRequest | None) -> None:
        await self._hub.publish(
            OUTPUT, Checkpoint(self._agg.snapshot(), None if request is None else request.done)
        )
        self._last_checkpoint = self._clock.monotonic()
        self._dirty = False
