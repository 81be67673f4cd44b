"""MultiBus: several sources read as one bus, each on its own, ids qualified per source."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import pytest

from service.aggregation.aggregator import EventAggregator
from service.bus.base import (
    BusItem,
    Emit,
    PartitionsAssigned,
    PartitionsRevoked,
    Restore,
    SourceBatch,
)
from service.bus.multi import STARTING, MultiBus
from service.checkpoints.base import PartitionCheckpoint
from service.config.sections import AggregationConfig
from service.core.clock import ManualClock
from service.core.errors import PermanentError, TransientError
from service.core.events import Metric
from service.metrics.collector import MetricsCollector
from tests.fakes.bus import MemoryBus

WAIT_S = 5.0
IDLE_S = 60.0


class Collected:
    """What the MultiBus emitted, with a way to wait for a condition on it."""

    def __init__(self) -> None:
        self.items: list[BusItem] = []
        self._changed = asyncio.Event()

    async def emit(self, item: BusItem) -> None:
        self.items.append(item)
        self._changed.set()

    async def until(self, done: Callable[[list[BusItem]], bool]) -> None:
        async with asyncio.timeout(WAIT_S):
            while not done(self.items):
                self._changed.clear()
                await self._changed.wait()

    def batches(self, partition: str) -> list[SourceBatch]:
        return [i for i in self.items if isinstance(i, SourceBatch) and i.partition == partition]

    def records(self, partition: str) -> list[object]:
        return [r for b in self.batches(partition) for r in b.records]


def delivered(out: Collected, partition: str, records: int, _: list[BusItem]) -> bool:
    return len(out.records(partition)) >= records


def reported(out: Collected, partition: str, times: int, _: list[BusItem]) -> bool:
    return len(out.batches(partition)) >= times


async def nothing_stored(partitions: Sequence[str]) -> dict[str, PartitionCheckpoint]:
    return {}


async def stop(multi: MultiBus, running: asyncio.Task[None]) -> None:
    multi.stop_intake()
    async with asyncio.timeout(WAIT_S):
        await running


async def test_source_two_is_prefixed_and_each_bus_sees_only_its_own_ids() -> None:
    clock = ManualClock()
    first = MemoryBus({"p": [1, 2, 3]}, clock=clock)
    second = MemoryBus({"p": [4, 5, 6]}, clock=clock)
    multi = MultiBus([(first, "a"), (second, "b")], clock, queue_size=2, idle_timeout_s=IDLE_S)
    asked: list[list[str]] = []

    async def restore(partitions: Sequence[str]) -> dict[str, PartitionCheckpoint]:
        asked.append(list(partitions))
        stored = PartitionCheckpoint("s2/p", "1", b"state")
        return {"s2/p": stored} if "s2/p" in partitions else {}

    out = Collected()
    running = asyncio.create_task(multi.run(out.emit, restore))
    await out.until(lambda _: len(out.records("p")) == 3 and len(out.records("s2/p")) == 2)
    assert sorted(asked) == [["p"], ["s2/p"]]
    assert out.records("p") == [1, 2, 3]
    assert out.records("s2/p") == [5, 6]  # from the stored position 1
    assigned = [i for i in out.items if isinstance(i, PartitionsAssigned)]
    by_id = {c.partition: c for a in assigned for c in a.checkpoints}
    assert by_id["s2/p"] == PartitionCheckpoint("s2/p", "1", b"state")
    assert by_id["p"].partition == "p"
    assert second.positions == {"p": 3}

    await multi.commit({"p": "3", "s2/p": "3"})
    assert first.commits == [{"p": "3"}] and second.commits == [{"p": "3"}]
    multi.rewind(["s2/p"])
    assert first.rewinds == [] and second.rewinds == [["p"]]
    metric = Metric("vabus_aggregator.events_received", 1.0, clock.now(), {})
    await multi.send_metrics([metric])
    assert first.sent_metrics == [[metric]] and second.sent_metrics == []
    await stop(multi, running)


async def test_a_source_that_says_nothing_is_reported_silent_and_a_talking_one_is_not() -> None:
    clock = ManualClock()
    hung = MemoryBus({"x": [1]}, clock=clock)
    hung.hold("x")  # assigned, then nothing: as a server that stops answering
    talking = MemoryBus({"y": []}, clock=clock)
    multi = MultiBus([(hung, "hung"), (talking, "talking")], clock, queue_size=4, idle_timeout_s=3)
    out = Collected()
    running = asyncio.create_task(multi.run(out.emit, nothing_stored))
    await out.until(lambda items: sum(isinstance(i, PartitionsAssigned) for i in items) == 4)
    ticks = 0
    while not out.batches("x"):
        talking.report("y")  # the other source's bus reports on its own, every second
        ticks += 1
        await out.until(partial(reported, out, "s2/y", ticks))
        async with asyncio.timeout(WAIT_S):
            await clock.sleeping()
        clock.advance(1.0)
        await asyncio.sleep(0)
        await asyncio.sleep(0)
    (report,) = out.batches("x")
    assert report.records == [] and report.caught_up and report.next_position is None
    assert report.polled_at == 3.0  # the idle timeout after its last item
    assert ticks == 3  # seconds the clock moved, the other reporting each
    assert all(b.source.startswith("memory") for b in out.batches("s2/y"))
    await stop(multi, running)


async def test_a_queue_full_of_one_source_never_holds_up_another() -> None:
    clock = ManualClock()
    busy = MemoryBus({"b": list(range(50))}, batch_size=1, clock=clock)
    other = MemoryBus({"o": [1, 2]}, clock=clock)
    multi = MultiBus([(busy, "busy"), (other, "other")], clock, queue_size=1, idle_timeout_s=IDLE_S)
    gate = asyncio.Event()
    out = Collected()

    async def emit(item: BusItem) -> None:
        # the pipeline takes the busy source's batches only once the gate opens
        if isinstance(item, SourceBatch) and item.partition == "b":
            await gate.wait()
        await out.emit(item)

    running = asyncio.create_task(multi.run(emit, nothing_stored))
    await out.until(lambda _: out.records("s2/o") == [1, 2])
    assert out.records("b") == []
    assert multi.queue_depths()["1"] == 1  # full: its bus waits, the other went on
    gate.set()
    await out.until(lambda _: len(out.records("b")) == 50)
    await stop(multi, running)


async def test_a_source_down_at_start_up_delays_only_itself() -> None:
    clock = ManualClock()

    class DownAtFirst(MemoryBus):
        failures = 2

        async def start(self) -> None:
            if self.failures:
                self.failures -= 1
                raise TransientError("unreachable")
            await super().start()

    down = DownAtFirst({"d": [1]}, clock=clock)
    up = MemoryBus({"u": [2]}, clock=clock)
    multi = MultiBus([(down, "down"), (up, "up")], clock, queue_size=2, idle_timeout_s=IDLE_S)
    out = Collected()
    running = asyncio.create_task(multi.run(out.emit, nothing_stored))
    await out.until(lambda _: out.records("s2/u") == [2])
    assert not down.started
    while not out.records("d"):
        async with asyncio.timeout(WAIT_S):
            await clock.sleeping()
        clock.advance(15.0)
        await asyncio.sleep(0)
    assert down.started and out.records("d") == [1]
    await stop(multi, running)


async def test_a_permanent_failure_of_one_source_ends_the_run_with_it() -> None:
    clock = ManualClock()

    class Refused(MemoryBus):
        async def run(self, emit: Emit, restore: Restore) -> None:
            raise PermanentError("credentials refused")

    ok = MemoryBus({"o": [1]}, clock=clock)
    multi = MultiBus(
        [(ok, "ok"), (Refused({}), "refused")], clock, queue_size=2, idle_timeout_s=IDLE_S
    )
    out = Collected()
    with pytest.raises(PermanentError, match="credentials refused"):
        async with asyncio.timeout(WAIT_S):
            await multi.run(out.emit, nothing_stored)


async def test_check_names_each_failing_source() -> None:
    clock = ManualClock()
    a, b, c = MemoryBus({}), MemoryBus({}), MemoryBus({})
    multi = MultiBus(
        [(a, "url-a"), (b, "url-b"), (c, "url-c")], clock, queue_size=1, idle_timeout_s=IDLE_S
    )
    await multi.check()
    b.reachable = False
    c.reachable = False
    with pytest.raises(TransientError) as caught:
        await multi.check()
    assert "source 2 (url-b)" in str(caught.value) and "source 3 (url-c)" in str(caught.value)
    assert "source 1" not in str(caught.value)


def test_a_multibus_needs_two_sources() -> None:
    with pytest.raises(ValueError, match="at least two"):
        MultiBus([(MemoryBus({}), "a")], ManualClock(), queue_size=1, idle_timeout_s=IDLE_S)


def placeholder_events(out: Collected, partition: str) -> list[str]:
    """``assigned``/``revoked`` for each item about ``partition``, in order."""
    events = []
    for item in out.items:
        if isinstance(item, PartitionsAssigned) and partition in {
            c.partition for c in item.checkpoints
        }:
            events.append("assigned")
        elif isinstance(item, PartitionsRevoked) and partition in item.partitions:
            events.append("revoked")
    return events


async def test_a_source_holds_the_watermark_from_the_start_until_it_hands_over_anything() -> None:
    clock = ManualClock()

    class DownAtFirst(MemoryBus):
        failures = 1

        async def start(self) -> None:
            if self.failures:
                self.failures -= 1
                raise TransientError("unreachable")
            await super().start()

    up = MemoryBus({"u": [1]}, clock=clock)
    down = DownAtFirst({"d": [2]}, clock=clock)
    multi = MultiBus([(up, "up"), (down, "down")], clock, queue_size=2, idle_timeout_s=IDLE_S)
    out = Collected()
    running = asyncio.create_task(multi.run(out.emit, nothing_stored))
    await out.until(lambda _: out.records("u") == [1])
    # the source that started has its placeholder gone before its first item; the
    # other one's still holds (unknown event time) while its start is retried
    first = out.items[: out.items.index(out.batches("u")[0])]
    assert placeholder_events(out, STARTING) == ["assigned", "revoked"]
    assert any(isinstance(i, PartitionsRevoked) and i.partitions == [STARTING] for i in first)
    assert placeholder_events(out, f"s2/{STARTING}") == ["assigned"]
    while not out.records("s2/d"):
        async with asyncio.timeout(WAIT_S):
            await clock.sleeping()
        clock.advance(1.0)
        await asyncio.sleep(0)
    assert placeholder_events(out, f"s2/{STARTING}") == ["assigned", "revoked"]
    revoked = next(
        i
        for i in out.items
        if isinstance(i, PartitionsRevoked) and i.partitions == [f"s2/{STARTING}"]
    )
    assert out.items.index(revoked) < out.items.index(out.batches("s2/d")[0])
    multi.rewind([STARTING, f"s2/{STARTING}", "s2/d"])
    assert up.rewinds == [] and down.rewinds == [["d"]]  # placeholders are nobody's
    await stop(multi, running)


async def test_a_source_that_never_says_anything_stops_holding_after_the_idle_timeout() -> None:
    clock = ManualClock()

    class Mute(MemoryBus):
        async def run(self, emit: Emit, restore: Restore) -> None:
            await asyncio.Event().wait()  # as a Kafka source that never gets partitions

    talking = MemoryBus({"t": [1]}, clock=clock)
    multi = MultiBus([(talking, "t"), (Mute({}), "mute")], clock, queue_size=2, idle_timeout_s=5)
    out = Collected()
    running = asyncio.create_task(multi.run(out.emit, nothing_stored))
    await out.until(lambda _: out.records("t") == [1])
    seconds = 0
    while placeholder_events(out, f"s2/{STARTING}") != ["assigned", "revoked"]:
        assert seconds < 5, out.items
        async with asyncio.timeout(WAIT_S):
            await clock.sleeping()
        clock.advance(1.0)
        seconds += 1
        await asyncio.sleep(0)
        await asyncio.sleep(0)
    assert seconds == 5
    multi.stop_intake()
    running.cancel()


async def test_a_silent_source_with_more_partitions_than_its_queue_holds_gets_each_reported() -> (
    None
):
    clock = ManualClock()
    hung = MemoryBus({f"h:{i}": [] for i in range(5)}, clock=clock)
    talking = MemoryBus({"t": []}, clock=clock)
    multi = MultiBus([(talking, "talking"), (hung, "hung")], clock, queue_size=1, idle_timeout_s=3)
    out = Collected()
    running = asyncio.create_task(multi.run(out.emit, nothing_stored))
    hung_ids = {f"s2/h:{i}" for i in range(5)}

    def all_reported(_: list[BusItem]) -> bool:
        return all(out.batches(p) for p in hung_ids)

    while not all_reported(out.items):
        talking.report("t")
        async with asyncio.timeout(WAIT_S):
            await clock.sleeping()
        clock.advance(1.0)
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        assert clock.monotonic() < 20, out.items
    assert all(b.caught_up and not b.records for p in hung_ids for b in out.batches(p))
    await stop(multi, running)


async def test_the_watermark_stops_waiting_for_a_hung_source_after_the_idle_timeout() -> None:
    """The MultiBus's items applied to a real aggregator on the same manual clock: a
    source that delivered events and then hangs holds the watermark at its event time
    until it has said nothing for the idle timeout, then the other's time rules."""
    clock = ManualClock()
    idle_s = 3.0

    def events(start: float, n: int) -> list[dict[str, Any]]:
        return [
            {"name": "n", "agg_func": "sum", "value": 1.0, "timestamp": start + i} for i in range(n)
        ]

    hung = MemoryBus({"h": events(1000.0, 5)}, clock=clock)
    flowing = MemoryBus({"f": events(1000.0, 60)}, clock=clock)
    multi = MultiBus(
        [(hung, "hung"), (flowing, "flowing")], clock, queue_size=4, idle_timeout_s=idle_s
    )
    aggregator = EventAggregator(
        AggregationConfig(interval_s=10.0, idle_timeout_s=idle_s), MetricsCollector(clock), clock
    )
    out = Collected()

    async def apply(item: BusItem) -> None:
        if isinstance(item, PartitionsAssigned):
            aggregator.restore(item.checkpoints)
        elif isinstance(item, PartitionsRevoked):
            aggregator.release(item.partitions)
        else:
            aggregator.process(item)
        await out.emit(item)

    running = asyncio.create_task(multi.run(apply, nothing_stored))
    await out.until(lambda _: len(out.records("h")) == 5 and len(out.records("s2/f")) == 60)
    await asyncio.sleep(0)
    hung.hold("h")  # it delivered up to 1004 and now says nothing
    assert aggregator.watermark == 1004.0
    seconds = 0
    while aggregator.watermark == 1004.0:
        flowing.add("f", events(1060.0 + seconds, 1))  # the other goes on, every second
        async with asyncio.timeout(WAIT_S):
            await clock.sleeping()
        clock.advance(1.0)
        seconds += 1
        await out.until(partial(delivered, out, "s2/f", 60 + seconds))
        await asyncio.sleep(0)
        assert seconds <= idle_s, aggregator.partitions()
    assert seconds == idle_s
    assert aggregator.watermark == 1060.0 + idle_s - 1  # the flowing source's event time
    assert aggregator.partitions()["h"]["holds_watermark"] is False
    await stop(multi, running)
