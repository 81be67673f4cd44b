"""DemoBus: deterministic events, paced by an injected manual clock."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Any

from service.bus.base import BusItem, PartitionsAssigned, SourceBatch
from service.bus.demo import DemoBus, demo_event
from service.checkpoints.base import PartitionCheckpoint
from service.config import BusConfig
from service.core.clock import ManualClock
from service.core.events import AGG_FUNCS
from service.metrics.collector import MetricsCollector

START = 1_700_000_000.0


class Recorder:
    def __init__(self) -> None:
        self.items: list[BusItem] = []
        self._changed = asyncio.Event()

    async def emit(self, item: BusItem) -> None:
        self.items.append(item)
        self._changed.set()

    @property
    def batches(self) -> list[SourceBatch]:
        return [i for i in self.items if isinstance(i, SourceBatch)]

    @property
    def records(self) -> list[Any]:
        return [r for b in self.batches for r in b.records]

    async def wait_for(self, condition: Callable[[], bool], timeout: float = 10.0) -> None:
        async with asyncio.timeout(timeout):
            while not condition():
                self._changed.clear()
                await self._changed.wait()


def demo_bus(clock: ManualClock, rate: float = 100, names: int = 20, **options: Any) -> DemoBus:
    config = BusConfig(kind="demo", demo_rate=rate, demo_names=names)
    return DemoBus(config, MetricsCollector(clock), clock, **options)


@asynccontextmanager
async def running(
    bus: DemoBus, clock: ManualClock, recorder: Recorder, position: str | None = None
) -> AsyncIterator[None]:
    async def restore(partitions: Sequence[str]) -> dict[str, PartitionCheckpoint]:
        if position is None:
            return {}
        return {"demo": PartitionCheckpoint("demo", position, None)}

    task = asyncio.create_task(bus.run(recorder.emit, restore))
    await recorder.wait_for(lambda: len(recorder.items) == 1)  # assigned; start time taken
    try:
        yield
    finally:
        bus.stop_intake()
        clock.advance(1.0)  # stop_intake takes effect at the next tick
        async with asyncio.timeout(10):
            await task


def test_demo_event_is_a_pure_function_of_seed_and_index() -> None:
    assert demo_event(1, 12345, 50, START) == demo_event(1, 12345, 50, START)
    seeds_differ = [demo_event(1, i, 50, START) != demo_event(2, i, 50, START) for i in range(100)]
    assert sum(seeds_differ) > 90
    events = [demo_event(1, i, 50, START) for i in range(2000)]
    assert len({e["name"] for e in events}) == 50
    assert {e["agg_func"] for e in events} == set(AGG_FUNCS)
    assert all(0 <= e["value"] < 100 and e["timestamp"] == START for e in events)


async def test_demo_bus_emits_rate_events_per_second_of_its_clock() -> None:
    clock, recorder = ManualClock(START), Recorder()
    async with running(demo_bus(clock, rate=100), clock, recorder):
        assert recorder.items == [PartitionsAssigned([PartitionCheckpoint("demo", None, None)])]
        clock.advance(1.0)
        await recorder.wait_for(lambda: len(recorder.records) == 100)
        clock.advance(0.5)
        await recorder.wait_for(lambda: len(recorder.records) == 150)
        assert recorder.batches[-1].next_position == "150"
        assert recorder.batches[-1].caught_up
        assert recorder.records[-1]["timestamp"] == START + 1.5


async def test_demo_bus_splits_what_is_due_into_bounded_batches() -> None:
    clock, recorder = ManualClock(START), Recorder()
    async with running(demo_bus(clock, rate=1000, max_batch=300), clock, recorder):
        clock.advance(1.0)
        await recorder.wait_for(lambda: len(recorder.records) == 1000)
        batches = recorder.batches
        assert [len(b.records) for b in batches] == [300, 300, 300, 100]
        assert [b.caught_up for b in batches] == [False, False, False, True]
        assert [b.source for b in batches[:2]] == ["demo position=0", "demo position=300"]


async def test_restart_from_a_checkpoint_regenerates_the_same_events() -> None:
    first_clock, first = ManualClock(START), Recorder()
    async with running(demo_bus(first_clock, seed=5), first_clock, first):
        first_clock.advance(1.0)
        await first.wait_for(lambda: len(first.records) == 100)

    again_clock, again = ManualClock(START), Recorder()
    async with running(demo_bus(again_clock, seed=5), again_clock, again, position="40"):
        assert again.items[0] == PartitionsAssigned([PartitionCheckpoint("demo", "40", None)])
        again_clock.advance(1.0)
        await again.wait_for(lambda: len(again.records) == 100)
    assert again.records[:60] == first.records[40:]
    assert again.batches[0].source == "demo position=40"


async def test_other_seeds_make_other_streams() -> None:
    async def one_second_of(seed: int) -> list[Any]:
        clock, recorder = ManualClock(START), Recorder()
        async with running(demo_bus(clock, seed=seed), clock, recorder):
            clock.advance(1.0)
            await recorder.wait_for(lambda: len(recorder.records) == 100)
        return recorder.records

    assert await one_second_of(1) != await one_second_of(2)
