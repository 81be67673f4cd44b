"""The real Kafka and PostgreSQL as e2e and integration tests feed and read them: events
produced keyed by name, a topic read to its end, an aggregates table as a dict."""

from __future__ import annotations

import asyncio
from typing import Any

import asyncpg
import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

__all__ = ["produce", "read_all", "stored_rows"]

Key = tuple[str, str, float]
"""(name, agg_func, window start in epoch seconds)"""


async def produce(bootstrap: str, topic: str, events: list[dict[str, Any]]) -> None:
    """Each event as JSON, keyed by its name; returns once every one is acknowledged."""
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=5)
    await producer.start()
    try:
        sent = [await producer.send(topic, orjson.dumps(e), key=e["name"].encode()) for e in events]
        await asyncio.gather(*sent)
    finally:
        await producer.stop()


async def read_all(bootstrap: str, topic: str, at_least: int) -> list[dict[str, Any]]:
    """Every message of ``topic``: at least ``at_least``, then until a second of silence."""
    consumer = AIOKafkaConsumer(
        topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest", group_id=None
    )
    await consumer.start()
    out: list[dict[str, Any]] = []
    try:
        async with asyncio.timeout(60):
            while True:
                batches = await consumer.getmany(timeout_ms=1000)
                if not batches and len(out) >= at_least:
                    return out
                for msgs in batches.values():
                    out.extend(orjson.loads(m.value) for m in msgs)
    except TimeoutError:
        raise AssertionError(f"{topic}: {len(out)} of {at_least}") from None
    finally:
        await consumer.stop()


async def stored_rows(dsn: str, table: str) -> dict[Key, tuple[float, int]]:
    """The rows of an aggregates table by key, as (value, count); empty before it exists."""
    conn = await asyncpg.connect(dsn)
    try:
        if await conn.fetchval("SELECT to_regclass($1)", table) is None:
            return {}
        rows = await conn.fetch(
            "SELECT name, agg_func, extract(epoch from window_start)::float8 AS ws, value, count"
            f' FROM "{table}"'
        )
    finally:
        await conn.close()
    return {(r["name"], r["agg_func"], r["ws"]): (r["value"], r["count"]) for r in rows}
