"""The routing stage of ``repartition=true`` against the real broker, with one event far
ahead of the clock: its progress reports leave that event out of the input partition's
event time (AGGREGATION_MAX_WATERMARK_LEAD), as the windowing stage does for records,
so the report cannot make the on-time events late downstream."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import orjson
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from service.config import BusConfig, KafkaConfig
from service.core.clock import SystemClock
from service.repartition.records import PROGRESS_HEADER, decode_progress
from service.repartition.router import Router, internal_topic
from tests.fault.harness import create_topic

pytestmark = pytest.mark.integration


async def test_progress_reports_leave_an_event_far_ahead_of_the_clock_out(
    kafka_bootstrap: str, unique_name: str
) -> None:
    source, group = f"in-{unique_name}", f"g-{unique_name}"
    await create_topic(kafka_bootstrap, source, 1)
    now = time.time()
    on_time = [now - 30.0, now - 20.0, now - 10.0]
    bodies = [
        {"name": "a", "value": 1, "timestamp": on_time[0]},
        {"name": "a", "value": 1, "timestamp": on_time[1]},
        {"name": "a", "value": 1000, "timestamp": now + 3000.0},  # a clock 50 min fast
        {"name": "a", "value": 1, "timestamp": on_time[2]},
    ]
    producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap)
    await producer.start()
    try:
        for body in bodies:
            await producer.send_and_wait(source, orjson.dumps(body), partition=0)
    finally:
        await producer.stop()
    cfg = BusConfig(
        kind="kafka",
        kafka_bootstrap_servers=(kafka_bootstrap,),
        kafka_topic=source,
        kafka_group=group,
        kafka_session_timeout_ms=1500,
    )
    router = Router(cfg, KafkaConfig(bootstrap_servers=(kafka_bootstrap,)), SystemClock())
    consumer = AIOKafkaConsumer(
        internal_topic(group),
        bootstrap_servers=kafka_bootstrap,
        group_id=None,
        auto_offset_reset="earliest",
    )
    reports: list[Any] = []
    records = 0
    async with router:
        running = asyncio.create_task(router.run())
        await consumer.start()
        try:
            async with asyncio.timeout(30):
                while records < len(bodies) or not any(o.caught_up for o in reports):
                    for msgs in (await consumer.getmany(timeout_ms=500)).values():
                        for m in msgs:
                            if PROGRESS_HEADER not in dict(m.headers):
                                records += 1
                            elif (progress := decode_progress(m.value)) is not None:
                                reports.extend(progress.origins.values())
        finally:
            await consumer.stop()
            router.stop_intake()
            await asyncio.wait_for(running, 10)
    assert records == len(bodies)  # the event ahead is routed (and aggregated) all the same
    assert reports and all(r.max_ts is not None and r.max_ts < now for r in reports)
    assert reports[-1].max_ts == pytest.approx(on_time[2])
