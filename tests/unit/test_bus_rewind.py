"""Bus.rewind: the partitions are delivered again from their stored checkpoints."""

from __future__ import annotations

import asyncio

from service.bus.base import BusItem, PartitionsAssigned, RewindByRerun, SourceBatch
from service.checkpoints.base import PartitionCheckpoint
from service.dev.emulator import Emulator
from tests.fakes.bus import MemoryBus
from tests.unit.test_http_bus import Recorder, http_bus, numbered, restore_from, running


async def test_rerun_starts_the_reading_again_after_a_rewind_and_returns_with_it() -> None:
    runs = 0
    finish = asyncio.Event()

    async def read() -> None:
        nonlocal runs
        runs += 1
        await finish.wait()

    rerun = RewindByRerun()
    task = asyncio.create_task(rerun.run(read))
    while runs < 1:
        await asyncio.sleep(0.001)
    rerun.rewind(["p"])
    while runs < 2:
        await asyncio.sleep(0.001)
    finish.set()
    await asyncio.wait_for(task, 5)  # returns when the reading returns
    assert runs == 2


async def test_http_bus_reads_again_from_the_stored_cursor_after_a_rewind() -> None:
    async with Emulator() as emulator:
        emulator.append(numbered(0, 4))
        stored = PartitionCheckpoint("http", emulator.append([]), b"windows")
        emulator.append(numbered(4, 10))
        recorder = Recorder()
        bus = http_bus(emulator.url)
        async with running(bus, recorder, restore_from(stored)):
            await recorder.wait_for(lambda: len(recorder.records) == 6)
            bus.rewind(["http"])
            await recorder.wait_for(lambda: len(recorder.records) == 12)
    assigned = [i for i, item in enumerate(recorder.items) if isinstance(item, PartitionsAssigned)]
    assert len(assigned) == 2 and recorder.items[assigned[1]] == PartitionsAssigned([stored])
    assert [e["value"] for e in recorder.records] == [*range(4, 10), *range(4, 10)]


async def test_memory_bus_restores_a_rewound_partition_and_plays_it_from_there() -> None:
    bus = MemoryBus({"p": list(range(10))}, batch_size=4, stop_after_drain=True)
    items: list[BusItem] = []

    async def emit(item: BusItem) -> None:
        items.append(item)
        if len(items) == 3:  # assigned, 2 batches: rewind now
            bus.rewind(["p"])

    await bus.run(emit, restore_from(PartitionCheckpoint("p", "4", None)))
    records = [r for i in items if isinstance(i, SourceBatch) for r in i.records]
    assert records == [4, 5, 6, 7, 8, 9, 4, 5, 6, 7, 8, 9]
    assert bus.rewinds == [["p"]]
