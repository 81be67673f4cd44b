"""Idle flushes through the aggregator stage (first found by the fault suite): restored
windows wait for the bus's evidence of silence, and time spent blocked by backpressure
is not silence; periodic checkpoints stay bounded; a crash re-delivers only the rest."""

from __future__ import annotations

import asyncio
from typing import Any

import orjson

from service.aggregation.aggregator import EventAggregator
from service.aggregation.stage import AggregatorStage
from service.bus.base import PartitionsAssigned, SourceBatch
from service.config import AggregationConfig
from service.core.clock import ManualClock
from service.core.retry import Backoff
from service.metrics.collector import MetricsCollector
from service.pipeline.flow import INPUT, Checkpoint, Outputs, ReadBack, Tick
from service.pipeline.hub import Delivery, EventHub

NOW = 1_700_000_000.0
IDLE_S = 5.0


class FakeOutput:
    """Collects what the stage publishes; ``gate`` (when set) holds every publish; a
    checkpoint is made durable at once unless ``durable`` is False (a down output)."""

    def __init__(self) -> None:
        self.items: list[Any] = []
        self.gate: asyncio.Event | None = None
        self.held = asyncio.Event()  # set once a publish waits at the gate
        self.durable = True
        self.fail_checkpoints = 0  # the next n checkpoint publishes raise

    async def publish(self, item: Outputs | Checkpoint | ReadBack) -> None:
        if self.fail_checkpoints and isinstance(item, Checkpoint):
            self.fail_checkpoints -= 1
            raise RuntimeError("output topic refused the checkpoint")
        if self.gate is not None and not self.gate.is_set():
            self.held.set()
            await self.gate.wait()
        self.items.append(item)
        if self.durable and isinstance(item, Checkpoint) and item.done is not None:
            item.done.confirm()

    def checkpoints(self) -> list[Checkpoint]:
        return [i for i in self.items if isinstance(i, Checkpoint)]

    def aggregates(self) -> list[Any]:
        return [a for i in self.items if isinstance(i, Outputs) for a in i.aggregates]


def make(clock: ManualClock) -> tuple[EventAggregator, AggregatorStage, FakeOutput]:
    cfg = AggregationConfig(interval_s=60.0, idle_timeout_s=IDLE_S)
    agg = EventAggregator(cfg, MetricsCollector(clock), clock)
    out = FakeOutput()
    stage = AggregatorStage(agg, out.publish, clock, 1.0)
    return agg, stage, out


def batch(*events: dict[str, Any]) -> SourceBatch:
    return SourceBatch("p0", [orjson.dumps(e) for e in events], "test", "1", NOW)


def report(polled_at: float) -> SourceBatch:
    """The bus found p0 caught up at ``polled_at`` (its monotonic clock)."""
    return SourceBatch("p0", [], "test", None, NOW, caught_up=True, polled_at=polled_at)


async def test_restored_windows_are_not_idle_flushed_before_the_bus_delivers() -> None:
    clock = ManualClock(NOW)
    before, _, _ = make(clock)
    before.process(batch({"name": "a", "value": 1, "timestamp": NOW - 30}))
    [state] = before.snapshot()

    _, stage, out = make(clock)
    clock.advance(100)  # a slow start: connecting, or a consumer-group join
    await stage.handle(Delivery([PartitionsAssigned([state]), Tick()]))
    await stage.handle(Delivery([report(clock.monotonic() + IDLE_S / 2)]))
    assert out.aggregates() == [], "restored windows flushed before the idle period"

    clock.advance(IDLE_S)
    await stage.handle(Delivery([Tick(), report(clock.monotonic())]))
    [flushed] = out.aggregates()  # still flushed once the bus is really quiet
    assert (flushed.name, flushed.value) == ("a", 1.0)


async def test_a_report_queued_behind_backpressure_is_not_taken_as_silence() -> None:
    clock = ManualClock(NOW)
    _, stage, out = make(clock)
    out.gate = asyncio.Event()
    bad = {"name": "a", "value": "x", "timestamp": NOW}  # a dead letter: something to publish
    polled = clock.monotonic() + 1  # the bus looked at p0 a second after the batch
    items = [batch({"name": "a", "value": 1, "timestamp": NOW - 30}, bad), Tick(), report(polled)]
    work = asyncio.create_task(stage.handle(Delivery(items)))
    await asyncio.wait_for(out.held.wait(), 5)  # the batch's outputs wait for the output
    clock.advance(30)  # the output is down for 30 s; the report waits behind the batch
    out.gate.set()
    await work
    assert out.aggregates() == [], "a window was flushed because the output was down"


async def test_periodic_checkpoints_back_off_when_snapshots_are_expensive() -> None:
    """A snapshot of a large state costs event-loop time; periodic checkpoints are spaced
    to at least ten times that cost (here 0.5 s -> one every 5 s instead of every 1 s)."""
    clock = ManualClock(NOW)
    agg, stage, out = make(clock)
    real_snapshot = agg.snapshot

    def slow_snapshot(partitions: Any = None) -> Any:
        clock.advance(0.5)
        return real_snapshot(partitions)

    agg.snapshot = slow_snapshot  # type: ignore[method-assign]
    for second in range(20):
        await stage.handle(Delivery([batch({"name": "a", "value": 1, "timestamp": NOW + second})]))
        clock.advance(1)
        await stage.handle(Delivery([Tick()]))
    checkpoints = out.checkpoints()
    assert 3 <= len(checkpoints) <= 5, len(checkpoints)  # ~20 s / (1 s + 5 s spacing)


async def test_no_second_periodic_checkpoint_while_the_first_is_not_durable() -> None:
    """An output is down: instead of queueing a snapshot of the whole state every
    second, the stage waits (and so intake stops: the events wait in the bus)."""
    clock = ManualClock(NOW)
    _, stage, out = make(clock)
    out.durable = False
    await stage.handle(Delivery([batch({"name": "a", "value": 1, "timestamp": NOW})]))
    clock.advance(1)
    await stage.handle(Delivery([Tick()]))
    [first] = out.checkpoints()
    delivery = Delivery([batch({"name": "a", "value": 2, "timestamp": NOW}), Tick()])
    work = asyncio.create_task(stage.handle(delivery))
    clock.advance(1)
    async with asyncio.timeout(5):
        while delivery.done < 1:
            await asyncio.sleep(0)
    # The batch is handled; in the tick only the wait for the pending checkpoint can
    # suspend the stage (publishing here never does): it is parked there or has gone on.
    assert not work.done(), "a second checkpoint was taken while the first was pending"
    assert delivery.done == 1
    assert len(out.checkpoints()) == 1
    assert first.done is not None
    first.done.confirm()
    await asyncio.wait_for(work, 5)
    assert len(out.checkpoints()) == 2


async def test_a_crash_mid_batch_never_aggregates_a_batch_twice() -> None:
    """Through the real hub: the stage marks each item done, so after a crash only the
    items after the finished ones come back, and the re-delivered tick checkpoints."""
    clock = ManualClock(NOW)
    agg, stage, out = make(clock)
    processed: list[SourceBatch] = []
    real_process = agg.process

    def counting_process(b: SourceBatch) -> Outputs:
        processed.append(b)
        return real_process(b)

    agg.process = counting_process  # type: ignore[method-assign,assignment]
    out.fail_checkpoints = 1
    hub = EventHub(MetricsCollector(clock), clock, Backoff("fixed", 1.0, 1.0))
    hub.subscribe(INPUT, "aggregator", stage.handle)
    first = batch({"name": "a", "value": 1, "timestamp": NOW})
    second = batch({"name": "a", "value": 2, "timestamp": NOW})
    for item in (first, Tick(), second):  # before the start: one delivery
        await hub.publish(INPUT, item)
    clock.advance(1)  # a periodic checkpoint is due at the tick
    await hub.start()
    async with asyncio.timeout(5):
        await clock.sleeping()  # the hub backs off on the clock before re-delivering
        clock.advance(1.0)
        await hub.drain()
    await hub.stop()
    assert processed == [first, second]
    assert (hub.stats()["aggregator"].processed, hub.stats()["aggregator"].errors) == (3, 1)
    [cp] = out.checkpoints()
    assert cp.done is not None and cp.done.confirmed
