"""The routing stage of ``repartition=true`` against the real broker: every event of the
unkeyed input lands in the internal topic keyed by its name, with its origin, and input
offsets are committed only once the records are acknowledged."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

import orjson
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.partitioner import DefaultPartitioner

from service.aggregation.aggregator import EventAggregator
from service.bus.base import BusItem, PartitionsAssigned, PartitionsRevoked, SourceBatch
from service.bus.kafka import KafkaBus
from service.checkpoints.base import PartitionCheckpoint
from service.config import AggregationConfig, BusConfig, KafkaConfig
from service.core.clock import SystemClock
from service.metrics.collector import MetricsCollector
from service.repartition import records as internal_records
from service.repartition.keying import route
from service.repartition.records import ORIGIN_HEADER, PROGRESS_HEADER, decode_progress
from service.repartition.router import Router, internal_topic
from tests.fault.harness import create_topic

pytestmark = pytest.mark.integration


def test_route_keys_each_event_by_its_name_and_the_rest_by_its_partition() -> None:
    fb, far = b"in:3", 2e9
    one = b'{"name": "a", "value": 1, "timestamp": 5}'
    assert route(one, fb, far) == [(b"a", one, 5.0)]
    assert route(b'[{"name":"a","value":1,"timestamp":7},{"name":"b"},7]', fb, far) == [
        (b"a", b'{"name":"a","value":1,"timestamp":7}', 7.0),
        (b"b", b'{"name":"b"}', None),  # invalid: it moves no event time
        (fb, b"7", None),
    ]
    assert route(b"{not json", fb, far) == [(fb, b"{not json", None)]
    assert route(b'{"name": ""}', fb, far) == [(fb, b'{"name": ""}', None)]
    assert route(b"[]", fb, far) == []
    # an event the windowing stage refuses as too far in the future moves nothing either
    assert route(b'{"name": "a", "value": 1, "timestamp": 9}', fb, 8.0)[0][2] is None


async def read_all(
    bootstrap: str, topic: str, at_least: int, until: Callable[[list[Any]], bool]
) -> list[Any]:
    consumer = AIOKafkaConsumer(
        topic, bootstrap_servers=bootstrap, group_id=None, auto_offset_reset="earliest"
    )
    await consumer.start()
    out: list[Any] = []
    try:
        async with asyncio.timeout(30):
            while len([m for m in out if not is_progress(m)]) < at_least or not until(out):
                for msgs in (await consumer.getmany(timeout_ms=500)).values():
                    out.extend(msgs)
    finally:
        await consumer.stop()
    return out


def input_config(bootstrap: str, topic: str, group: str) -> BusConfig:
    return BusConfig(
        kind="kafka",
        kafka_bootstrap_servers=(bootstrap,),
        kafka_topic=topic,
        kafka_group=group,
        kafka_session_timeout_ms=1500,
    )


def is_progress(record: Any) -> bool:
    return PROGRESS_HEADER in dict(record.headers)


def caught_up_reports(fetched: list[Any]) -> dict[int, Any]:
    """Per internal partition, the first report saying every input partition is caught up."""
    found: dict[int, Any] = {}
    for r in fetched:
        if not is_progress(r) or r.partition in found:
            continue
        progress = decode_progress(r.value)
        reports = [] if progress is None else list(progress.origins.values())
        if len(reports) == 3 and all(o.caught_up for o in reports):
            found[r.partition] = r
    return found


async def test_router_writes_every_event_keyed_by_name_with_its_origin(
    kafka_bootstrap: str, unique_name: str
) -> None:
    source, group = f"in-{unique_name}", f"g-{unique_name}"
    await create_topic(kafka_bootstrap, source, 3)
    producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap)
    await producer.start()
    try:
        for i in range(30):
            events = [{"name": f"n{(i + j) % 5}", "value": j, "timestamp": 1} for j in range(2)]
            await producer.send_and_wait(source, orjson.dumps(events), partition=i % 3)
        await producer.send_and_wait(source, b"garbage", partition=1)
    finally:
        await producer.stop()
    cfg = input_config(kafka_bootstrap, source, group)
    router = Router(cfg, KafkaConfig(bootstrap_servers=(kafka_bootstrap,)), SystemClock())
    async with router:
        running = asyncio.create_task(router.run())
        try:

            def final_reports(out: list[Any]) -> bool:
                return len(caught_up_reports(out)) == 3

            fetched = await read_all(kafka_bootstrap, internal_topic(group), 61, final_reports)
        finally:
            router.stop_intake()
            await asyncio.wait_for(running, 10)
    records = [r for r in fetched if not is_progress(r)]
    assert len(records) == 61
    # every internal partition got a report that all three inputs are caught up at event
    # time 1, written after every record it covers
    for p, report in caught_up_reports(fetched).items():
        progress = decode_progress(report.value)
        assert progress is not None and progress.topic == source and progress.partitions == 3
        assert {o.max_ts for o in progress.origins.values()} == {1.0}
        assert all(r.offset < report.offset for r in records if r.partition == p)
    by_key = Counter(r.key for r in records)
    assert by_key[b"in-" + unique_name.encode() + b":1"] == 1  # the garbage, by partition
    assert sum(by_key[f"n{k}".encode()] for k in range(5)) == 60
    partitions_of_name: dict[bytes, set[int]] = {}
    for r in records:
        partitions_of_name.setdefault(r.key, set()).add(r.partition)
        origin = dict(r.headers)[ORIGIN_HEADER].decode()
        assert origin.startswith(f"{source}:")
    assert all(len(p) == 1 for p in partitions_of_name.values())  # one name, one partition
    # where aiokafka's default partitioner puts the name, as a send() per record did
    assert all(DefaultPartitioner()(k, [0, 1, 2], None) in p for k, p in partitions_of_name.items())
    probe = AIOKafkaConsumer(bootstrap_servers=kafka_bootstrap, group_id=group)
    await probe.start()
    try:
        committed = [await probe.committed(TopicPartition(source, p)) for p in range(3)]
    finally:
        await probe.stop()
    assert committed == [10, 11, 10]


class _DiesBeforeCommitting(Router):
    """A routing instance that writes to the internal topic and never commits the input:
    as if it were killed between the broker's acknowledgement and the commit."""

    async def _commit(self, offsets: dict[TopicPartition, int]) -> None:
        return None


async def test_a_replay_of_the_routing_stage_counts_once_downstream(
    kafka_bootstrap: str, unique_name: str
) -> None:
    """Every event reaches the internal topic twice (the first routing instance dies
    before committing, its successor routes the input again); the real windowing bus and
    the aggregator behind it count each once, and the windows are exact."""
    source, group = f"in-{unique_name}", f"g-{unique_name}"
    await create_topic(kafka_bootstrap, source, 3)
    t0 = 1_699_999_800.0
    events = [(f"n{i % 5}", float(i), t0 + (i % 200) * 0.1) for i in range(600)]
    producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap)
    await producer.start()
    try:
        for i, (name, value, ts) in enumerate(events):  # unkeyed: every name everywhere
            body = {"name": name, "value": value, "timestamp": ts}
            await producer.send(source, orjson.dumps(body), partition=i % 3)
        await producer.flush()
    finally:
        await producer.stop()
    expected: dict[tuple[str, float], tuple[float, int]] = {}
    for name, value, ts in events:
        key = (name, t0 + 10.0 * ((ts - t0) // 10.0))
        total, n = expected.get(key, (0.0, 0))
        expected[key] = (total + value, n + 1)
    cfg = input_config(kafka_bootstrap, source, group)
    kafka_cfg = KafkaConfig(bootstrap_servers=(kafka_bootstrap,))
    clock = SystemClock()

    first = _DiesBeforeCommitting(cfg, kafka_cfg, clock)
    async with first:
        running = asyncio.create_task(first.run())
        try:
            await read_all(kafka_bootstrap, internal_topic(group), len(events), lambda _: True)
        finally:
            first.stop_intake()
            await asyncio.wait_for(running, 10)

    metrics = MetricsCollector(clock)
    agg = EventAggregator(AggregationConfig(interval_s=10.0, idle_timeout_s=0.5), metrics, clock)
    emitted: dict[tuple[str, float], tuple[float, int]] = {}
    delivered = 0

    async def emit(item: BusItem) -> None:
        nonlocal delivered
        if isinstance(item, PartitionsAssigned):
            agg.restore(item.checkpoints)
        elif isinstance(item, SourceBatch):
            delivered += len(item.records)
            for a in agg.process(item).aggregates:
                emitted[(a.name, a.window_start)] = (a.value, a.count)
        elif isinstance(item, PartitionsRevoked):
            item.done.confirm()

    async def restore(partitions: Sequence[str]) -> dict[str, PartitionCheckpoint]:
        return {}

    windowing_cfg = replace(
        cfg,
        kafka_topic=internal_topic(group),
        kafka_group=f"{group}.windows",
        kafka_repartition=True,
    )
    successor = Router(cfg, kafka_cfg, clock)  # routes everything again, then reports idle
    async with (
        successor,
        KafkaBus(windowing_cfg, kafka_cfg, metrics, clock, internal=internal_records) as windowing,
    ):
        tasks = [
            asyncio.create_task(successor.run()),
            asyncio.create_task(windowing.run(emit, restore)),
        ]
        try:
            async with asyncio.timeout(30):
                while emitted != expected and not any(t.done() for t in tasks):
                    await asyncio.sleep(0.1)
        finally:
            successor.stop_intake()
            windowing.stop_intake()
            await asyncio.wait_for(asyncio.gather(*tasks), 10)
    assert delivered == 2 * len(events)
    assert metrics.replays_dropped == len(events)
    assert emitted == expected
