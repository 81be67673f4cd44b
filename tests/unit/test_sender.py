"""DataSender: fan-out to every sink, retries, and checkpoint ordering."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping, Sequence

import pytest

from service.checkpoints.base import PartitionCheckpoint
from service.core.clock import ManualClock
from service.core.confirmation import Confirmation
from service.core.errors import PermanentError
from service.core.events import Aggregate, DeadLetter
from service.core.retry import Backoff
from service.lease.fence import FencedError
from service.metrics.collector import MetricsCollector
from service.pipeline.flow import OUTPUT, Checkpoint, Outputs
from service.pipeline.hub import Delivery, EventHub
from service.pipeline.sender import DataSender
from tests.fakes.sinks import MemorySink


class RecordingStore:
    """A checkpoint store fake that also records what the sinks held at save time."""

    def __init__(self, sinks: Sequence[MemorySink]) -> None:
        self.saved: list[list[PartitionCheckpoint]] = []
        self.sink_sizes_at_save: list[list[int]] = []
        self.on_save: Callable[[], None] | None = None
        self._sinks = sinks

    async def start(self) -> None: ...
    async def stop(self) -> None: ...

    async def load(self, partitions: Sequence[str]) -> dict[str, PartitionCheckpoint]:
        return {}

    async def save(self, checkpoints: Sequence[PartitionCheckpoint]) -> None:
        self.saved.append(list(checkpoints))
        self.sink_sizes_at_save.append([len(s.aggregates) for s in self._sinks])
        if self.on_save is not None:
            self.on_save()


def agg(name: str, start: float = 0.0) -> Aggregate:
    return Aggregate(name, "sum", 1.0, 1, start, start + 60, 100.0)


async def make(
    n_sinks: int = 2,
) -> tuple[DataSender, list[MemorySink], RecordingStore, list[Mapping[str, str]], ManualClock]:
    clock = ManualClock()
    sinks = [MemorySink(f"s{i}") for i in range(n_sinks)]
    for s in sinks:
        await s.start()
    store = RecordingStore(sinks)
    commits: list[Mapping[str, str]] = []

    async def commit(positions: Mapping[str, str]) -> None:
        commits.append(dict(positions))

    sender = DataSender(
        sinks,
        store,
        commit,
        MetricsCollector(clock),
        clock,
        batch_size=2,
        backoff=Backoff("fixed", 1.0, 1.0),
    )
    return sender, sinks, store, commits, clock


async def test_outputs_reach_every_sink_in_chunks_of_batch_size() -> None:
    sender, sinks, _, _, _ = await make()
    dl = DeadLetter("{}", "missing_name", "x", "test", 1.0)
    await sender.handle(Delivery([Outputs([agg("a"), agg("b")], [dl]), Outputs([agg("c")], [])]))
    for s in sinks:
        assert sorted(k[0] for k in s.aggregates) == ["a", "b", "c"]
        assert s.dead_letters == [dl]
        assert [len(w[0]) for w in s.writes] == [2, 1]


async def test_checkpoint_is_saved_after_earlier_outputs_and_then_committed() -> None:
    sender, _, store, commits, _ = await make()
    cp = PartitionCheckpoint("p0", "10", b"{}")
    done = Confirmation()
    await sender.handle(
        Delivery([Outputs([agg("a")], []), Checkpoint([cp], done), Outputs([agg("b")], [])])
    )
    assert store.saved == [[cp]]
    assert store.sink_sizes_at_save == [[1, 1]]  # "a" durable before the checkpoint, "b" after
    assert commits == [{"p0": "10"}]
    assert done.confirmed


async def test_transient_sink_failure_is_retried_without_blocking_the_other_sink() -> None:
    sender, sinks, _, _, clock = await make()
    sinks[0].fail_next(2)
    task = asyncio.create_task(sender.handle(Delivery([Outputs([agg("a")], [])])))
    await sinks[1].wait_until(lambda s: len(s.aggregates) == 1)
    assert not sinks[0].aggregates
    assert "s0" in sender.degraded
    async with asyncio.timeout(5):
        for _ in range(2):  # each failed write is followed by a backoff wait on the clock
            await clock.sleeping()
            clock.advance(1.0)
        await task
    assert len(sinks[0].aggregates) == 1
    assert sender.degraded == {}


async def test_a_permanent_error_is_not_retried_here_but_raised_for_the_hub() -> None:
    sender, sinks, _, _, _ = await make(1)
    sinks[0].fail_next(1, PermanentError("table missing"))
    with pytest.raises(PermanentError):
        await sender.handle(Delivery([Outputs([agg("a")], [])]))


async def test_a_durable_checkpoint_is_marked_done_with_the_outputs_before_it() -> None:
    sender, sinks, store, _, _ = await make()
    # the first sink breaks right after the checkpoint is saved: "b" cannot be written
    store.on_save = lambda: sinks[0].fail_next(1, PermanentError("table dropped"))
    delivery = Delivery(
        [
            Outputs([agg("a")], []),
            Checkpoint([PartitionCheckpoint("p0", "1", None)]),
            Outputs([agg("b")], []),
        ]
    )
    with pytest.raises(PermanentError):
        await sender.handle(delivery)
    assert delivery.done == 2  # the hub hands back only Outputs "b"


async def test_a_redelivery_through_the_hub_does_not_save_a_durable_checkpoint_again() -> None:
    sender, sinks, store, commits, clock = await make()
    store.on_save = lambda: sinks[0].fail_next(1, PermanentError("table dropped"))
    hub = EventHub(MetricsCollector(clock), clock, Backoff("fixed", 1.0, 1.0))
    hub.subscribe(OUTPUT, "sender", sender.handle)
    cp = PartitionCheckpoint("p0", "1", None)
    for item in (Outputs([agg("a")], []), Checkpoint([cp]), Outputs([agg("b")], [])):
        await hub.publish(OUTPUT, item)  # before the start: one delivery
    await hub.start()
    async with asyncio.timeout(5):
        await clock.sleeping()  # the hub backs off on the clock before re-delivering
        clock.advance(1.0)
        await hub.drain()
    await hub.stop()
    assert hub.stats()["sender"].processed == 3
    assert hub.stats()["sender"].errors == 1
    assert store.saved == [[cp]] and commits == [{"p0": "1"}]
    assert all(sorted(k[0] for k in s.aggregates) == ["a", "b"] for s in sinks)
    assert [len(w[0]) for w in sinks[1].writes] == [1, 1, 1]  # "a" once, "b" on both tries


async def test_a_checkpoint_whose_waiter_gave_up_is_not_saved() -> None:
    """The bus lets revoked partitions go when nobody confirms them in time (it abandons
    ``done``); a late save could overwrite the state of their new owner."""
    sender, sinks, store, commits, _ = await make()
    done = Confirmation()
    done.abandon()
    cp = Checkpoint([PartitionCheckpoint("p0", "1", None)], done)
    await sender.handle(Delivery([Outputs([agg("a")], []), cp]))
    assert store.saved == [] and commits == []
    assert all(len(s.aggregates) == 1 for s in sinks)  # the outputs are still written


async def test_a_fenced_write_is_dropped_once_not_retried_and_the_others_go_on() -> None:
    """A lease lost to another instance: retrying could never succeed, and the new
    holder reads those events again."""
    sender, sinks, _, _, _ = await make()
    sinks[0].fail_next(5, FencedError("lease on http:x fenced"))
    await sender.handle(Delivery([Outputs([agg("a")], [])]))
    assert sinks[0].aggregates == {} and sinks[0]._failures_left == 4  # one attempt
    assert [k[0] for k in sinks[1].aggregates] == ["a"]
    assert "s0" not in sender.degraded


async def test_a_fenced_checkpoint_is_dropped_and_its_waiter_told() -> None:
    sender, _, store, commits, _ = await make()

    async def fenced(checkpoints: Sequence[PartitionCheckpoint]) -> None:
        raise FencedError("checkpoint of 'ns' fenced")

    store.save = fenced  # type: ignore[method-assign]
    done = Confirmation()
    cp = Checkpoint([PartitionCheckpoint("p0", "7", b"s")], done)
    delivery = Delivery([Outputs([agg("a")], []), cp])
    await sender.handle(delivery)
    assert delivery.done == 2 and commits == []
    assert isinstance(done.failure, FencedError)
