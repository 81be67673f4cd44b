"""LIMIT: how fast one aiokafka consumer merely reads and decodes (orjson) the input topic.

``python -m bench.limit --bootstrap H:P --topic T --group G --marks FILE``

A fresh group reads from earliest with ``getmany`` until every partition's position
has reached the high watermark carried by the fetch responses (tansu answers
ListOffsets(latest) with the base offset of the last batch, so ``end_offsets()`` would
stop early). The marks file gets JSON lines ``{"first": t}`` when the first records
arrive and ``{"done": t, "records": n}`` at the end (Unix time).
"""

from __future__ import annotations

import argparse
import asyncio
import time

import orjson
from aiokafka import AIOKafkaConsumer, TopicPartition

from bench.marks import Marks


async def read_all(args: argparse.Namespace) -> None:
    marks = Marks(args.marks)
    consumer = AIOKafkaConsumer(
        args.topic,
        bootstrap_servers=args.bootstrap,
        group_id=args.group,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        session_timeout_ms=args.session_timeout_ms,
        max_partition_fetch_bytes=8 << 20,
        fetch_max_bytes=64 << 20,
        fetch_max_wait_ms=100,
    )
    await consumer.start()
    try:
        loads = orjson.loads
        records = 0
        remaining: set[TopicPartition] | None = None
        while remaining is None or remaining:
            batch = await consumer.getmany(timeout_ms=1000)
            for msgs in batch.values():
                if msgs:
                    marks.first()
                    records += len(msgs)
                    for m in msgs:
                        loads(m.value)
            if remaining is None:
                assigned = consumer.assignment()
                if not assigned:
                    continue
                remaining = set(assigned)
            for tp in list(remaining):
                high = consumer.highwater(tp)
                if high is not None and await consumer.position(tp) >= high:
                    remaining.discard(tp)
        marks.write(done=time.time(), records=records)
    finally:
        await consumer.stop()


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--bootstrap", required=True)
    ap.add_argument("--topic", required=True)
    ap.add_argument("--group", required=True)
    ap.add_argument("--marks", required=True)
    ap.add_argument("--session-timeout-ms", type=int, default=10_000)
    asyncio.run(read_all(ap.parse_args()))


if __name__ == "__main__":
    main()
