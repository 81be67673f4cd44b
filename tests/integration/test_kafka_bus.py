"""KafkaBus against the real broker: batches, positions, commits, caught-up, rebalances."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import re
import socket
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field

import orjson
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from service.app import start_with_retry
from service.bus.base import BusItem, PartitionsAssigned, PartitionsRevoked, SourceBatch
from service.bus.kafka import KafkaBus
from service.checkpoints.base import PartitionCheckpoint
from service.config import BusConfig, KafkaConfig
from service.core.clock import ManualClock, SystemClock
from service.core.errors import TransientError
from service.core.events import Metric
from service.metrics.collector import MetricsCollector

pytestmark = pytest.mark.integration

SESSION_MS = 1500


async def wait_until(predicate: Callable[[], bool], timeout: float = 30.0) -> None:
    """Poll ``predicate`` until it holds; fail the test at the deadline."""
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.02)


async def create_topic(bootstrap: str, topic: str, partitions: int) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(topic, partitions, 1)])
    finally:
        await admin.close()


async def produce(bootstrap: str, topic: str, messages: Sequence[tuple[int, bytes | None]]) -> None:
    """Send (partition, value) pairs, in order per partition."""
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=5)
    await producer.start()
    try:
        sent = [
            # a tombstone (value None) needs a key
            await producer.send(topic, value, key=b"k" if value is None else None, partition=p)
            for p, value in messages
        ]
        await asyncio.gather(*sent)
    finally:
        await producer.stop()


def bus_config(bootstrap: str, topic: str, group: str) -> BusConfig:
    return BusConfig(
        url=f"kafka://{bootstrap}/{topic}?group={group}",
        kind="kafka",
        kafka_bootstrap_servers=(bootstrap,),
        kafka_topic=topic,
        kafka_group=group,
        kafka_metrics_topic=f"{topic}-metrics",
        kafka_session_timeout_ms=SESSION_MS,
    )


@dataclass
class Downstream:
    """Stands in for the pipeline: records items, keeps checkpoints, confirms revocations."""

    store: dict[str, PartitionCheckpoint] = field(default_factory=dict)
    items: list[BusItem] = field(default_factory=list)
    positions: dict[str, str] = field(default_factory=dict)
    confirm_delay_s: float = 0.0
    # for each PartitionsAssigned: was an earlier revocation still unconfirmed?
    assigned_while_unconfirmed: list[bool] = field(default_factory=list)

    async def emit(self, item: BusItem) -> None:
        if isinstance(item, PartitionsAssigned):
            self.assigned_while_unconfirmed.append(
                any(isinstance(i, PartitionsRevoked) and not i.done.settled for i in self.items)
            )
        self.items.append(item)
        if isinstance(item, SourceBatch) and item.next_position is not None:
            self.positions[item.partition] = item.next_position
        elif isinstance(item, PartitionsRevoked):
            for p in item.partitions:
                if p in self.positions:
                    self.store[p] = PartitionCheckpoint(p, self.positions.pop(p), None)
            loop = asyncio.get_running_loop()
            loop.call_later(self.confirm_delay_s, item.done.confirm)

    async def restore(self, partitions: Sequence[str]) -> dict[str, PartitionCheckpoint]:
        return {p: self.store[p] for p in partitions if p in self.store}

    def batches(self, partition: str | None = None) -> list[SourceBatch]:
        return [
            i
            for i in self.items
            if isinstance(i, SourceBatch) and (partition is None or i.partition == partition)
        ]

    def records(self) -> list[tuple[str, int, bytes]]:
        return [
            (b.partition, off, rec)
            for b in self.batches()
            for off, rec in zip(b.offsets or [], b.records, strict=True)
        ]


@contextlib.asynccontextmanager
async def running_bus(
    bootstrap: str, topic: str, group: str, downstream: Downstream
) -> AsyncIterator[tuple[KafkaBus, asyncio.Task[None]]]:
    bus = KafkaBus(
        bus_config(bootstrap, topic, group), KafkaConfig(), MetricsCollector(), SystemClock()
    )
    async with bus:
        task = asyncio.create_task(bus.run(downstream.emit, downstream.restore))
        try:
            yield bus, task
        finally:
            bus.stop_intake()
            async with asyncio.timeout(10):
                await task


async def test_messages_arrive_as_per_partition_batches_in_offset_order(
    kafka_bootstrap: str, unique_name: str
) -> None:
    topic = unique_name
    await create_topic(kafka_bootstrap, topic, 3)
    sent = [(p, f"{p}-{i}".encode()) for i in range(50) for p in range(3)]
    await produce(kafka_bootstrap, topic, [*sent, (1, None)])
    down = Downstream()
    async with running_bus(kafka_bootstrap, topic, unique_name, down):
        await wait_until(lambda: len(down.records()) == len(sent) + 1)

    assigned = [i for i in down.items if isinstance(i, PartitionsAssigned)]
    assert down.items.index(assigned[0]) == 0
    assert sorted(c.partition for c in assigned[0].checkpoints) == [
        f"{topic}:0",
        f"{topic}:1",
        f"{topic}:2",
    ]
    assert all(c.position is None and c.state is None for c in assigned[0].checkpoints)
    for p in range(3):
        pid = f"{topic}:{p}"
        got = [(off, rec) for part, off, rec in down.records() if part == pid]
        expected = [(i, f"{p}-{i}".encode()) for i in range(50)]
        if p == 1:
            expected.append((50, b""))  # a tombstone is a record too
        assert got == expected
        for batch in down.batches(pid):
            if batch.records:
                assert batch.offsets is not None
                assert batch.next_position == str(batch.offsets[-1] + 1)
                assert batch.source == f"kafka {topic}/{p}"


async def test_restored_positions_are_sought_to(kafka_bootstrap: str, unique_name: str) -> None:
    topic = unique_name
    await create_topic(kafka_bootstrap, topic, 2)
    await produce(kafka_bootstrap, topic, [(p, b"x") for _ in range(10) for p in range(2)])
    down = Downstream()
    down.store[f"{topic}:0"] = PartitionCheckpoint(f"{topic}:0", "7", b"state")
    async with running_bus(kafka_bootstrap, topic, unique_name, down):
        await wait_until(lambda: len(down.records()) == 3 + 10)

    assigned = next(i for i in down.items if isinstance(i, PartitionsAssigned))
    by_id = {c.partition: c for c in assigned.checkpoints}
    assert by_id[f"{topic}:0"].state == b"state"
    assert [off for part, off, _ in down.records() if part == f"{topic}:0"] == [7, 8, 9]
    assert [off for part, off, _ in down.records() if part == f"{topic}:1"] == list(range(10))


async def test_commit_stores_offsets_that_a_new_consumer_sees(
    kafka_bootstrap: str, unique_name: str
) -> None:
    topic = unique_name
    await create_topic(kafka_bootstrap, topic, 2)
    await produce(kafka_bootstrap, topic, [(p, b"x") for _ in range(5) for p in range(2)])
    down = Downstream()
    async with running_bus(kafka_bootstrap, topic, unique_name, down) as (bus, _):
        await wait_until(lambda: len(down.records()) == 10)
        await bus.commit({f"{topic}:0": "4", f"{topic}:1": "5", "other:0": "9"})

    probe = AIOKafkaConsumer(bootstrap_servers=kafka_bootstrap, group_id=unique_name)
    await probe.start()
    try:
        assert await probe.committed(TopicPartition(topic, 0)) == 4
        assert await probe.committed(TopicPartition(topic, 1)) == 5
    finally:
        await probe.stop()


async def test_caught_up_turns_true_once_drained_and_idle_partitions_report_it(
    kafka_bootstrap: str, unique_name: str
) -> None:
    topic = unique_name
    await create_topic(kafka_bootstrap, topic, 2)
    # more than one poll returns (max_records), so the first batch is not caught up
    await produce(kafka_bootstrap, topic, [(0, b"%d" % i) for i in range(25_000)])
    down = Downstream()
    busy, idle = f"{topic}:0", f"{topic}:1"
    async with running_bus(kafka_bootstrap, topic, unique_name, down):
        await wait_until(lambda: len(down.batches(idle)) >= 3)
        await wait_until(lambda: down.positions.get(busy) == "25000")
        await wait_until(lambda: any(not b.records and b.partition == busy for b in down.batches()))

    data = [b for b in down.batches(busy) if b.records]
    assert data[0].caught_up is False
    assert data[-1].caught_up is True
    idle_reports = down.batches(idle)
    assert all(b.records == [] and b.caught_up and b.next_position is None for b in idle_reports)
    gaps = [b.received_at - a.received_at for a, b in itertools.pairwise(idle_reports)]
    assert min(gaps) >= 0.9  # at most about once a second


async def produce_steadily(
    bootstrap: str, topic: str, partitions: int, stop: asyncio.Event
) -> list[bytes]:
    """Keep producing small rounds (one message per partition) until ``stop``; returns all."""
    values: list[bytes] = []
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=5)
    await producer.start()
    try:
        while not stop.is_set():
            n = len(values)
            round_ = [f"m{n + p}".encode() for p in range(partitions)]
            sent = [await producer.send(topic, v, partition=p) for p, v in enumerate(round_)]
            await asyncio.gather(*sent)
            values.extend(round_)
            await asyncio.sleep(0.01)  # pacing, not synchronisation
    finally:
        await producer.stop()
    return values


async def test_second_member_triggers_revocation_that_waits_for_done_without_loss(
    kafka_bootstrap: str, unique_name: str
) -> None:
    topic = unique_name
    await create_topic(kafka_bootstrap, topic, 4)
    # longer than a rebalance takes, so a bus that did not wait would be caught
    first = Downstream(confirm_delay_s=2.0)
    second = Downstream(store=first.store)  # one checkpoint store shared by both members
    stop_producing = asyncio.Event()
    producing = asyncio.create_task(produce_steadily(kafka_bootstrap, topic, 4, stop_producing))
    async with running_bus(kafka_bootstrap, topic, unique_name, first):
        await wait_until(lambda: len(first.records()) >= 100)
        async with running_bus(kafka_bootstrap, topic, unique_name, second):
            # messages keep arriving throughout the rebalance
            await wait_until(lambda: len(second.records()) >= 20)
            stop_producing.set()
            values = await producing
            await wait_until(lambda: len(first.records()) + len(second.records()) >= len(values))

    revoked = next(i for i in first.items if isinstance(i, PartitionsRevoked))
    after = first.items[first.items.index(revoked) + 1 :]
    reassigned = next(i for i in after if isinstance(i, PartitionsAssigned))
    assert first.assigned_while_unconfirmed == [False, False]
    # no batch of a revoked partition before it is assigned again
    assert not [b for b in after[: after.index(reassigned)] if isinstance(b, SourceBatch)]
    # every message exactly once between the two members
    delivered = sorted(rec for _, _, rec in first.records() + second.records())
    assert delivered == sorted(values)


async def test_stop_intake_makes_run_return_promptly(
    kafka_bootstrap: str, unique_name: str
) -> None:
    topic = unique_name
    await create_topic(kafka_bootstrap, topic, 1)
    down = Downstream()
    async with running_bus(kafka_bootstrap, topic, unique_name, down) as (bus, task):
        await wait_until(lambda: bool(down.batches()))  # assigned and polling
        bus.stop_intake()
        async with asyncio.timeout(1.0):
            await task


async def test_metrics_are_produced_as_json_objects(kafka_bootstrap: str, unique_name: str) -> None:
    topic = unique_name
    await create_topic(kafka_bootstrap, topic, 1)
    bus = KafkaBus(
        bus_config(kafka_bootstrap, topic, unique_name),
        KafkaConfig(),
        MetricsCollector(),
        SystemClock(),
    )
    async with bus:
        await bus.send_metrics([Metric("events_received_total", 3.0, 1_700_000_000.0)])
    reader = AIOKafkaConsumer(
        f"{topic}-metrics", bootstrap_servers=kafka_bootstrap, auto_offset_reset="earliest"
    )
    await reader.start()
    try:
        msg = await asyncio.wait_for(reader.getone(), 20)
    finally:
        await reader.stop()
    assert orjson.loads(msg.value) == {
        "name": "events_received_total",
        "value": 3.0,
        "timestamp": 1_700_000_000.0,
    }


async def test_check_names_the_servers_when_the_broker_is_unreachable(unique_name: str) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"127.0.0.1:{s.getsockname()[1]}"
    bus = KafkaBus(
        bus_config(dead, unique_name, unique_name), KafkaConfig(), MetricsCollector(), SystemClock()
    )
    with pytest.raises(TransientError, match=dead):
        await bus.check()


async def test_check_fails_for_a_missing_topic_and_passes_for_an_existing_one(
    kafka_bootstrap: str, unique_name: str
) -> None:
    bus = KafkaBus(
        bus_config(kafka_bootstrap, unique_name, unique_name),
        KafkaConfig(),
        MetricsCollector(),
        SystemClock(),
    )
    with pytest.raises(TransientError, match="does not exist"):
        await bus.check()
    await create_topic(kafka_bootstrap, unique_name, 1)
    await bus.check()


async def test_start_is_one_attempt_that_names_the_servers_of_an_unreachable_broker(
    unique_name: str,
) -> None:
    """The bus does not retry its connect: the app's start loop does (one loop)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"127.0.0.1:{s.getsockname()[1]}"
    bus = KafkaBus(
        bus_config(dead, unique_name, unique_name),
        KafkaConfig(),
        MetricsCollector(),
        SystemClock(),
    )
    with pytest.raises(TransientError, match=rf"{re.escape(dead)} unavailable.*check VABUS_URL"):
        await bus.start()
    assert bus._consumer is None
    await bus.stop()


async def test_start_before_the_input_topic_exists_is_transient_and_creates_nothing(
    kafka_bootstrap: str, unique_name: str
) -> None:
    bus = KafkaBus(
        bus_config(kafka_bootstrap, unique_name, unique_name),
        KafkaConfig(),
        MetricsCollector(),
        SystemClock(),
    )
    with pytest.raises(TransientError, match="does not exist"):
        await bus.start()
    assert bus._consumer is None  # disconnected until the next attempt
    probe = AIOKafkaAdminClient(bootstrap_servers=kafka_bootstrap)
    await probe.start()
    try:
        assert unique_name not in await probe.list_topics()
    finally:
        await probe.close()
    await create_topic(kafka_bootstrap, unique_name, 1)
    try:
        await bus.start()  # the next attempt of the app's start loop
    finally:
        await bus.stop()


async def test_the_app_start_loop_is_the_one_that_waits_for_the_input_topic(
    kafka_bootstrap: str, unique_name: str
) -> None:
    clock = ManualClock()
    bus = KafkaBus(
        bus_config(kafka_bootstrap, unique_name, unique_name),
        KafkaConfig(),
        MetricsCollector(),
        clock,
    )
    starting = asyncio.create_task(start_with_retry("bus kafka", bus.start, clock))
    try:
        async with asyncio.timeout(30):
            await clock.sleeping()  # the first attempt failed: the loop waits
            await create_topic(kafka_bootstrap, unique_name, 1)
            clock.advance(15.0)  # at least the wait of the start loop
            await starting
        assert bus._consumer is not None
    finally:
        starting.cancel()
        await asyncio.gather(starting, return_exceptions=True)
        await bus.stop()


async def test_run_raises_when_restore_keeps_failing(
    kafka_bootstrap: str, unique_name: str
) -> None:
    await create_topic(kafka_bootstrap, unique_name, 1)

    async def broken_restore(partitions: Sequence[str]) -> dict[str, PartitionCheckpoint]:
        raise ValueError("checkpoint table is corrupt")

    down = Downstream()
    bus = KafkaBus(
        bus_config(kafka_bootstrap, unique_name, unique_name),
        KafkaConfig(),
        MetricsCollector(),
        SystemClock(),
    )
    async with bus:
        with pytest.raises(ValueError, match="corrupt"):
            async with asyncio.timeout(20):
                await bus.run(down.emit, broken_restore)
    assert down.items == []  # nothing was read without its state


async def test_stop_ends_a_revocation_that_downstream_never_confirms(
    kafka_bootstrap: str, unique_name: str
) -> None:
    topic = unique_name
    await create_topic(kafka_bootstrap, topic, 2)
    first = Downstream(confirm_delay_s=3600)
    second = Downstream(store=first.store)
    joining = running_bus(kafka_bootstrap, topic, unique_name, second)
    async with running_bus(kafka_bootstrap, topic, unique_name, first):
        await wait_until(lambda: any(isinstance(i, PartitionsAssigned) for i in first.items))
        await joining.__aenter__()
        try:
            await wait_until(lambda: any(isinstance(i, PartitionsRevoked) for i in first.items))
            leaving = asyncio.get_running_loop().time()
        except BaseException:
            await joining.__aexit__(None, None, None)
            raise
    try:
        # well under the 30 s revoke timeout
        assert asyncio.get_running_loop().time() - leaving < 5
        revoked = [i for i in first.items if isinstance(i, PartitionsRevoked)]
        assert all(i.done.abandoned for i in revoked), "a stop gives the checkpoint up"
        await wait_until(
            lambda: any(
                isinstance(i, PartitionsAssigned) and len(i.checkpoints) == 2 for i in second.items
            )
        )
    finally:
        await joining.__aexit__(None, None, None)
