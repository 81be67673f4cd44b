"""The routing stage of ``repartition=true`` against the real broker: every event of the
unkeyed input lands in the internal topic keyed by its name, with its origin, and input
offsets are committed only once the records are acknowledged."""

from __future__ import annotations

import asyncio
from collections import Counter
from typing import Any

import orjson
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from service.bus.kafka import ORIGIN_HEADER
from service.bus.repartition import Router, internal_topic, route
from service.clock import SystemClock
from service.config import BusConfig, KafkaConfig
from tests.fault.harness import create_topic

pytestmark = pytest.mark.integration


def test_route_keys_each_event_by_its_name_and_the_rest_by_its_partition() -> None:
    fb = b"in:3"
    assert route(b'{"name": "a", "value": 1}', fb) == [(b"a", b'{"name": "a", "value": 1}')]
    assert route(b'[{"name":"a","value":1},{"name":"b"},7]', fb) == [
        (b"a", b'{"name":"a","value":1}'),
        (b"b", b'{"name":"b"}'),
        (fb, b"7"),
    ]
    assert route(b"{not json", fb) == [(fb, b"{not json")]
    assert route(b'{"name": ""}', fb) == [(fb, b'{"name": ""}')]
    assert route(b"[]", fb) == []


async def read_all(bootstrap: str, topic: str, at_least: int) -> list[Any]:
    consumer = AIOKafkaConsumer(
        topic, bootstrap_servers=bootstrap, group_id=None, auto_offset_reset="earliest"
    )
    await consumer.start()
    out: list[Any] = []
    try:
        async with asyncio.timeout(30):
            while len(out) < at_least:
                for msgs in (await consumer.getmany(timeout_ms=500)).values():
                    out.extend(msgs)
    finally:
        await consumer.stop()
    return out


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
    cfg = BusConfig(
        kind="kafka",
        kafka_bootstrap_servers=(kafka_bootstrap,),
        kafka_topic=source,
        kafka_group=group,
        kafka_session_timeout_ms=3000,
    )
    router = Router(cfg, KafkaConfig(bootstrap_servers=(kafka_bootstrap,)), SystemClock())
    async with router:
        running = asyncio.create_task(router.run())
        try:
            records = await read_all(kafka_bootstrap, internal_topic(group), 61)
        finally:
            router.stop_intake()
            await asyncio.wait_for(running, 10)
    assert len(records) == 61
    by_key = Counter(r.key for r in records)
    assert by_key[b"in-" + unique_name.encode() + b":1"] == 1  # the garbage, by partition
    assert sum(by_key[f"n{k}".encode()] for k in range(5)) == 60
    partitions_of_name: dict[bytes, set[int]] = {}
    for r in records:
        partitions_of_name.setdefault(r.key, set()).add(r.partition)
        origin = dict(r.headers)[ORIGIN_HEADER].decode()
        assert origin.startswith(f"{source}:")
    assert all(len(p) == 1 for p in partitions_of_name.values())  # one name, one partition
    probe = AIOKafkaConsumer(bootstrap_servers=kafka_bootstrap, group_id=group)
    await probe.start()
    try:
        committed = [await probe.committed(TopicPartition(source, p)) for p in range(3)]
    finally:
        await probe.stop()
    assert committed == [10, 11, 10]
