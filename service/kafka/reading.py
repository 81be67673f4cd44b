"""Reading Kafka: one fetch that a stop cuts short (the bus, the repartition router),
and assigned partitions up to their end (the output read-back of the Kafka sink and the
catch-up of the Kafka checkpoint store)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition

__all__ = ["poll_unless_stopped", "read_to_end"]

_FETCH_WAIT_MS = 200


async def poll_unless_stopped(
    consumer: AIOKafkaConsumer,
    stop_waiter: asyncio.Future[Any],
    stopping: asyncio.Event,
    *,
    timeout_ms: int,
    max_records: int,
) -> Mapping[TopicPartition, list[Any]] | None:
    """One fetch, or None when ``stopping`` is set first (``stop_waiter`` waits for it).
    The records of a fetch cut short are simply fetched again after a restart."""
    poll = asyncio.ensure_future(consumer.getmany(timeout_ms=timeout_ms, max_records=max_records))
    await asyncio.wait({poll, stop_waiter}, return_when=asyncio.FIRST_COMPLETED)
    if stopping.is_set():
        poll.cancel()
        await asyncio.gather(poll, return_exceptions=True)
        return None
    data: Mapping[TopicPartition, list[Any]] = poll.result()
    return data


async def read_to_end(
    consumer: AIOKafkaConsumer,
    partitions: Sequence[TopicPartition],
    on_record: Callable[[TopicPartition, Any], None],
    *,
    timeout_s: float,
    max_records: int = 10_000,
) -> None:
    """Pass every record of ``partitions`` (assigned to ``consumer`` and positioned by
    the caller) from its position up to the end as of this call to
    ``on_record(partition, record)``, in offset order per partition.

    The end is where ``end_offsets`` (asked of the broker now) and the fetch responses'
    high watermark both say it is: some brokers (tansu) answer ``end_offsets`` with the
    base offset of the last record batch, which is lower than the end, while the high
    watermark is right on every broker but known only after a fetch. So each partition
    is fetched at least once, and it is done once its position reaches the greater of
    the two. Raises :class:`TimeoutError` after ``timeout_s`` seconds, and what the
    consumer raises.
    """
    pending = set(partitions)
    if not pending:
        return
    async with asyncio.timeout(timeout_s):
        ends = await consumer.end_offsets(list(pending))
        while pending:
            batch = await consumer.getmany(
                *pending, timeout_ms=_FETCH_WAIT_MS, max_records=max_records
            )
            for tp, records in batch.items():
                for record in records:
                    on_record(tp, record)
            for tp in list(pending):
                position = await consumer.position(tp)
                highwater = consumer.highwater(tp)
                if highwater is not None and position >= max(ends[tp], highwater):
                    pending.discard(tp)
