"""A source that starts after another one has delivered (a Kafka source joining its
group while an HTTP source already reads, contract §12.8) must hold the watermark
without a gap from the start until it has delivered: between its placeholder partition
and its own partitions no item of another source may be applied while it holds nothing,
or that source's events close windows that the late starter's unread events belong to.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

from service.aggregation.aggregator import EventAggregator
from service.bus.base import BusItem, Emit, PartitionsAssigned, PartitionsRevoked, Restore
from service.bus.multi import STARTING, MultiBus
from service.checkpoints.base import PartitionCheckpoint
from service.config.sections import AggregationConfig
from service.core.clock import ManualClock
from service.metrics.collector import MetricsCollector
from tests.fakes.bus import MemoryBus

WAIT_S = 5.0


async def nothing_stored(partitions: Sequence[str]) -> dict[str, PartitionCheckpoint]:
    return {}


def events(start: float, n: int) -> list[dict[str, Any]]:
    return [
        {"name": "n", "agg_func": "sum", "value": 1.0, "timestamp": start + i} for i in range(n)
    ]


class Late(MemoryBus):
    """Starts reading only when told (as a Kafka source whose join takes seconds)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.go = asyncio.Event()

    async def run(self, emit: Emit, restore: Restore) -> None:
        await self.go.wait()
        await super().run(emit, restore)


async def test_a_late_source_holds_the_watermark_without_a_gap_until_it_delivers() -> None:
    clock = ManualClock()
    early = MemoryBus({"e": events(1000.0, 60)}, clock=clock, batch_size=5)
    late = Late({"l": events(1000.0, 60)}, clock=clock, batch_size=5)
    multi = MultiBus([(early, "early"), (late, "late")], clock, queue_size=2, idle_timeout_s=60)
    aggregator = EventAggregator(
        AggregationConfig(interval_s=10.0, idle_timeout_s=60), MetricsCollector(clock), clock
    )
    applied: list[BusItem] = []
    gaps: list[int] = []  # items after which the late source held nothing, unread data left
    delivered = asyncio.Event()
    watching = asyncio.Event()  # from the late source's placeholder on

    async def apply(item: BusItem) -> None:
        if isinstance(item, PartitionsAssigned):
            aggregator.restore(item.checkpoints)
            if any(c.partition == f"s2/{STARTING}" for c in item.checkpoints):
                watching.set()
        elif isinstance(item, PartitionsRevoked):
            aggregator.release(item.partitions)
        else:
            aggregator.process(item)
            if item.partition == "s2/l" and item.records:
                delivered.set()
        applied.append(item)
        parts = aggregator.partitions()
        if (
            watching.is_set()
            and not delivered.is_set()
            and not any(
                p.startswith("s2/") and view["holds_watermark"] for p, view in parts.items()
            )
        ):
            gaps.append(len(applied) - 1)
        await asyncio.sleep(0)  # as the hub: the other source's items come in between

    running = asyncio.create_task(multi.run(apply, nothing_stored))
    async with asyncio.timeout(WAIT_S):
        while aggregator.partitions().get("e", {}).get("max_event_time") != 1059.0:
            await asyncio.sleep(0)
    assert aggregator.watermark is None  # the late source's placeholder holds it
    late.go.set()
    early.add("e", events(1060.0, 40))  # the early source goes on meanwhile
    async with asyncio.timeout(WAIT_S):
        await delivered.wait()
    assert gaps == [], [type(applied[i]).__name__ for i in gaps]
    revoked = [i.partitions for i in applied if isinstance(i, PartitionsRevoked)]
    assert revoked == [[STARTING], [f"s2/{STARTING}"]]
    # every event of the late source counts: none of its windows closed before it read
    async with asyncio.timeout(WAIT_S):
        while aggregator.partitions()["s2/l"]["max_event_time"] != 1059.0:
            await asyncio.sleep(0)
    assert aggregator.ledger()["late"] == 0
    multi.stop_intake()
    async with asyncio.timeout(WAIT_S):
        await running
