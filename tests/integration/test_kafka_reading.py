"""read_to_end against the real broker: every record up to the end as of the call, in
offset order, also where ``end_offsets`` alone would stop early (tansu answers it with
the base offset of the last record batch)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from service.kafka.reading import read_to_end

pytestmark = pytest.mark.integration


async def _topic_with_batches(bootstrap: str, topic: str) -> None:
    """Partition 0: three batches of 5 records (values b"0".. b"14"); partition 1: none."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(topic, 2, 1)])
    finally:
        await admin.close()
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=50)
    await producer.start()
    try:
        for first in (0, 5, 10):  # several records per batch: the end is past its base
            sent = [
                await producer.send(topic, str(i).encode(), partition=0)
                for i in range(first, first + 5)
            ]
            await asyncio.gather(*sent)
    finally:
        await producer.stop()


async def _read(bootstrap: str, topic: str, start: int) -> list[tuple[int, bytes]]:
    tps = [TopicPartition(topic, 0), TopicPartition(topic, 1)]
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    await consumer.start()
    try:
        consumer.assign(tps)
        consumer.seek(tps[0], start)
        consumer.seek(tps[1], 0)
        found: list[tuple[int, bytes]] = []

        def keep(tp: TopicPartition, record: Any) -> None:
            found.append((tp.partition, record.value))

        # few records per fetch: the end decides when reading stops, not one big fetch
        await read_to_end(consumer, tps, keep, timeout_s=30.0, max_records=2)
    finally:
        await consumer.stop()
    return found


async def test_every_record_up_to_the_end_is_read_in_order_and_an_empty_partition_ends(
    kafka_bootstrap: str, unique_name: str
) -> None:
    await _topic_with_batches(kafka_bootstrap, unique_name)
    assert await _read(kafka_bootstrap, unique_name, 0) == [(0, str(i).encode()) for i in range(15)]


async def test_reading_from_the_middle_of_a_batch_reads_the_rest(
    kafka_bootstrap: str, unique_name: str
) -> None:
    await _topic_with_batches(kafka_bootstrap, unique_name)
    assert await _read(kafka_bootstrap, unique_name, 7) == [
        (0, str(i).encode()) for i in range(7, 15)
    ]


async def test_a_position_already_at_the_end_reads_nothing(
    kafka_bootstrap: str, unique_name: str
) -> None:
    await _topic_with_batches(kafka_bootstrap, unique_name)
    assert await _read(kafka_bootstrap, unique_name, 15) == []
