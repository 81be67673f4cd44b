"""Malformed records on the internal topic of ``repartition=true``, produced to the real
broker: the windowing bus and the aggregator behind it go on, a record with a malformed
``vabus-origin`` header is dead-lettered (``invalid_origin``), a malformed progress
report is skipped, both are counted, and the other events' windows are exact. And an
input message above the element cap crosses the internal topic as one record."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import orjson
import pytest
from aiokafka import AIOKafkaProducer

from service.aggregation.aggregator import EventAggregator
from service.bus.base import BusItem, PartitionsAssigned, PartitionsRevoked, SourceBatch
from service.bus.kafka import KafkaBus
from service.checkpoints.base import PartitionCheckpoint
from service.config import AggregationConfig, BusConfig, KafkaConfig
from service.core.clock import SystemClock
from service.core.events import DeadLetter
from service.metrics.collector import MetricsCollector
from service.repartition import records as internal_records
from service.repartition.records import ORIGIN_HEADER, PROGRESS_HEADER
from service.repartition.router import Router, internal_topic, windowing_group
from tests.fault.harness import create_topic

pytestmark = pytest.mark.integration

T0 = 1_699_999_800.0
BAD_ORIGINS: list[bytes | None] = [
    b"garbage\xff\xfe",
    b"in:0:-5:0",  # a sign
    b"in:-1:5:0",  # a negative partition
    b"in:0:" + b"9" * 5000 + b":0",  # a huge number
    b"in:0:5",  # a part missing
    b"in",
    b"",
    None,
    b"\x00" * 100,
]
BAD_PROGRESS: list[bytes | None] = [
    b"\xff",
    b"{}",
    b"[1, 2]",
    b'{"topic": "in", "partitions": 1000000000000, "origins": {}}',
    b'{"topic": "in", "partitions": -3, "origins": {}}',
    b'{"topic": "in", "partitions": "1", "origins": {}}',
    b'{"topic": "in", "partitions": 1, "origins": {"in:0": ["x", true, 0]}}',
    b'{"topic": "in", "partitions": 1, "origins": {"in:0": [1e308, true]}}',
    b'{"topic": 7, "partitions": 1, "origins": []}',
    None,
]


def progress(max_ts: float | None) -> bytes:
    return orjson.dumps({"topic": "in", "partitions": 1, "origins": {"in:0": [max_ts, False, 0]}})


async def test_malformed_internal_records_are_dead_lettered_or_skipped_and_counted(
    kafka_bootstrap: str, unique_name: str
) -> None:
    topic = f"vabus-repartition.{unique_name}"
    await create_topic(kafka_bootstrap, topic, 1)
    events = [(f"n{i % 4}", float(i), T0 + (i % 50) * 0.1) for i in range(200)]
    producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap)
    await producer.start()
    try:

        async def send(value: bytes | None, headers: list[tuple[str, Any]]) -> None:
            await producer.send(topic, value, key=b"k", partition=0, headers=headers)

        await send(progress(None), [(PROGRESS_HEADER, b"1")])
        for i, (name, value, ts) in enumerate(events):
            body = orjson.dumps({"name": name, "value": value, "timestamp": ts})
            await send(body, [(ORIGIN_HEADER, f"in:0:{i}:0".encode())])
            if i % 20 == 0:  # a valid event behind a malformed header: never aggregated
                bad = BAD_ORIGINS[(i // 20) % len(BAD_ORIGINS)]
                await send(
                    orjson.dumps({"name": "bad", "value": 1e6, "timestamp": ts}),
                    [(ORIGIN_HEADER, bad)],
                )
            if i % 20 == 10:
                await send(BAD_PROGRESS[(i // 20) % len(BAD_PROGRESS)], [(PROGRESS_HEADER, b"1")])
        # closes the windows above: the input partition's event time moves on
        late_ts = T0 + 100
        closer = orjson.dumps({"name": "closer", "value": 0, "timestamp": late_ts})
        await send(closer, [(ORIGIN_HEADER, f"in:0:{len(events)}:0".encode())])
        await send(progress(late_ts), [(PROGRESS_HEADER, b"1")])
        await producer.flush()
    finally:
        await producer.stop()
    bad_origins = len(range(0, len(events), 20))
    bad_progress = len(range(10, len(events), 20))
    expected: dict[tuple[str, float], tuple[float, int]] = {}
    for name, value, ts in events:
        key = (name, T0 + 10.0 * ((ts - T0) // 10.0))
        total, n = expected.get(key, (0.0, 0))
        expected[key] = (total + value, n + 1)

    clock = SystemClock()
    metrics = MetricsCollector(clock)
    agg = EventAggregator(AggregationConfig(interval_s=10.0, idle_timeout_s=0.5), metrics, clock)
    emitted: dict[tuple[str, float], tuple[float, int]] = {}
    dead: list[DeadLetter] = []

    async def emit(item: BusItem) -> None:
        if isinstance(item, PartitionsAssigned):
            agg.restore(item.checkpoints)
        elif isinstance(item, SourceBatch):
            out = agg.process(item)
            dead.extend(out.dead_letters)
            for a in out.aggregates:
                emitted[(a.name, a.window_start)] = (a.value, a.count)
        elif isinstance(item, PartitionsRevoked):
            item.done.confirm()

    async def restore(partitions: Sequence[str]) -> dict[str, PartitionCheckpoint]:
        return {}

    cfg = BusConfig(
        kind="kafka",
        kafka_bootstrap_servers=(kafka_bootstrap,),
        kafka_topic=topic,
        kafka_group=f"g-{unique_name}.windows",
        kafka_session_timeout_ms=1500,
        kafka_repartition=True,
    )
    kafka_cfg = KafkaConfig(bootstrap_servers=(kafka_bootstrap,))
    async with KafkaBus(cfg, kafka_cfg, metrics, clock, internal=internal_records) as bus:
        task = asyncio.create_task(bus.run(emit, restore))
        try:
            async with asyncio.timeout(30):
                while emitted != expected and not task.done():
                    await asyncio.sleep(0.1)
            assert not task.done(), "the windowing bus must go on"
        finally:
            bus.stop_intake()
            await asyncio.wait_for(task, 10)
    assert emitted == expected
    assert [d.reason for d in dead] == ["invalid_origin"] * bad_origins
    assert all('"bad"' in d.raw and "offset=" in d.source for d in dead)
    assert metrics.bus_protocol_errors[("kafka", "malformed_origin")] == bad_origins
    assert metrics.bus_protocol_errors[("kafka", "malformed_progress")] == bad_progress
    ledger = agg.ledger()
    assert ledger["rejected:invalid_origin"] == bad_origins and ledger["imbalance"] == 0
    assert ledger["received"] == len(events) + 1 + bad_origins


async def test_elements_past_the_cap_cross_the_internal_topic_as_one_too_large(
    kafka_bootstrap: str, unique_name: str
) -> None:
    """Unkeyed input with an array message above VABUS_MAX_EVENTS_PER_MESSAGE: the
    routing stage writes its first elements one by one and the rest as one record, which
    the windowing stage dead-letters as one ``too_large`` counting every element."""
    source, group = f"in-{unique_name}", f"g-{unique_name}"
    await create_topic(kafka_bootstrap, source, 1)
    cap, held = 20, 500
    producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap)
    await producer.start()
    try:
        big = [{"name": f"n{i % 3}", "value": i, "timestamp": T0 + 1} for i in range(held)]
        await producer.send(source, orjson.dumps(big), partition=0)
        closer = {"name": "closer", "value": 0, "timestamp": T0 + 100}
        await producer.send(source, orjson.dumps(closer), partition=0)
        await producer.flush()
    finally:
        await producer.stop()
    expected: dict[tuple[str, float], tuple[float, int]] = {}
    for i in range(cap):
        key = (f"n{i % 3}", T0)
        total, n = expected.get(key, (0.0, 0))
        expected[key] = (total + i, n + 1)

    clock = SystemClock()
    metrics = MetricsCollector(clock)
    agg = EventAggregator(AggregationConfig(interval_s=10.0, idle_timeout_s=0.5), metrics, clock)
    emitted: dict[tuple[str, float], tuple[float, int]] = {}
    dead: list[DeadLetter] = []

    async def emit(item: BusItem) -> None:
        if isinstance(item, PartitionsAssigned):
            agg.restore(item.checkpoints)
        elif isinstance(item, SourceBatch):
            out = agg.process(item)
            dead.extend(out.dead_letters)
            for a in out.aggregates:
                emitted[(a.name, a.window_start)] = (a.value, a.count)
        elif isinstance(item, PartitionsRevoked):
            item.done.confirm()

    async def restore(partitions: Sequence[str]) -> dict[str, PartitionCheckpoint]:
        return {}

    cfg = BusConfig(
        kind="kafka",
        kafka_bootstrap_servers=(kafka_bootstrap,),
        kafka_topic=source,
        kafka_group=group,
        kafka_session_timeout_ms=1500,
        max_events_per_message=cap,
    )
    windowing_cfg = replace(
        cfg, kafka_topic=internal_topic(group), kafka_group=windowing_group(group),
        kafka_repartition=True,
    )  # fmt: skip
    kafka_cfg = KafkaConfig(bootstrap_servers=(kafka_bootstrap,))
    router = Router(cfg, kafka_cfg, clock)
    async with (
        router,
        KafkaBus(windowing_cfg, kafka_cfg, metrics, clock, internal=internal_records) as windowing,
    ):
        tasks = [
            asyncio.create_task(router.run()),
            asyncio.create_task(windowing.run(emit, restore)),
        ]
        try:
            async with asyncio.timeout(30):
                while (emitted != expected or not dead) and not any(t.done() for t in tasks):
                    await asyncio.sleep(0.1)
        finally:
            router.stop_intake()
            windowing.stop_intake()
            await asyncio.wait_for(asyncio.gather(*tasks), 10)
    assert emitted == expected
    assert [(d.reason, d.detail.split()[0]) for d in dead] == [("too_large", str(held - cap))]
    ledger = agg.ledger()
    assert ledger["rejected:too_large"] == held - cap and ledger["imbalance"] == 0
    assert metrics.events_rejected == {"too_large": held - cap}
