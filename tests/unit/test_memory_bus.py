"""MemoryBus, the fake other stages' unit tests rely on."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import pytest

from service.bus.base import BusItem, PartitionsAssigned, Restore, SourceBatch
from service.checkpoints.base import PartitionCheckpoint
from service.core.errors import TransientError
from service.core.events import Metric
from tests.fakes.bus import MemoryBus


async def no_checkpoints(partitions: Sequence[str]) -> dict[str, PartitionCheckpoint]:
    return {}


async def drain(bus: MemoryBus, restore: Restore = no_checkpoints) -> list[BusItem]:
    items: list[BusItem] = []

    async def emit(item: BusItem) -> None:
        items.append(item)

    async with asyncio.timeout(10):
        await bus.run(emit, restore)
    return items


async def test_partitions_are_emitted_in_order_interleaved_and_in_batches() -> None:
    bus = MemoryBus({"a": [1, 2, 3, 4, 5], "b": [b"x"]}, batch_size=2, stop_after_drain=True)
    items = await drain(bus)
    assert items[0] == PartitionsAssigned(
        [PartitionCheckpoint("a", None, None), PartitionCheckpoint("b", None, None)]
    )
    batches = [i for i in items if isinstance(i, SourceBatch)]
    assert [(b.partition, b.records) for b in batches] == [
        ("a", [1, 2]),
        ("b", [b"x"]),
        ("a", [3, 4]),
        ("a", [5]),
    ]
    assert [b.next_position for b in batches] == ["2", "1", "4", "5"]
    assert [b.caught_up for b in batches] == [False, True, False, True]
    assert batches[2].offsets == [2, 3]
    assert batches[2].source == "memory a@2"


async def test_restored_positions_are_honoured() -> None:
    async def restore(partitions: Sequence[str]) -> dict[str, PartitionCheckpoint]:
        return {"a": PartitionCheckpoint("a", "3", b"state")}

    bus = MemoryBus({"a": [0, 1, 2, 3, 4], "b": [9]}, stop_after_drain=True)
    items = await drain(bus, restore)
    assert items[0] == PartitionsAssigned(
        [PartitionCheckpoint("a", "3", b"state"), PartitionCheckpoint("b", None, None)]
    )
    assert [(i.partition, i.records) for i in items[1:] if isinstance(i, SourceBatch)] == [
        ("a", [3, 4]),
        ("b", [9]),
    ]


async def test_a_drained_bus_waits_for_added_records_until_intake_stops() -> None:
    bus = MemoryBus({"a": [1]})
    received: list[BusItem] = []
    changed = asyncio.Event()

    async def emit(item: BusItem) -> None:
        received.append(item)
        changed.set()

    async def batches() -> list[list[object]]:
        return [i.records for i in received if isinstance(i, SourceBatch)]

    task = asyncio.create_task(bus.run(emit, no_checkpoints))
    async with asyncio.timeout(10):
        while await batches() != [[1]]:
            changed.clear()
            await changed.wait()
        bus.add("a", [2])
        bus.add("c", [3])
        while len(await batches()) < 3:
            changed.clear()
            await changed.wait()
        bus.stop_intake()
        await task
    assert await batches() == [[1], [2], [3]]
    assert PartitionsAssigned([PartitionCheckpoint("c", None, None)]) in received


async def test_commits_and_metrics_are_recorded_and_check_can_fail() -> None:
    bus = MemoryBus({})
    async with bus:
        await bus.commit({"a": "5"})
        await bus.send_metrics([Metric("m", 1.0, 2.0)])
        await bus.check()
        bus.reachable = False
        with pytest.raises(TransientError):
            await bus.check()
    assert bus.commits == [{"a": "5"}]
    assert bus.sent_metrics == [[Metric("m", 1.0, 2.0)]]
