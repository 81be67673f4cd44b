"""The benchmark workload: generated from a fixed seed, its expected results computed here.

Shape (the same as the peers are fed, see bench/README.md): ``n`` JSON events over 1,000
names; name *k* always has ``agg_func = ("sum", "avg", "min", "max")[k % 4]``; values
uniform in [-1000, 1000] rounded to 6 decimals; event time rises monotonically over
1,200 s in millisecond steps from a minute boundary (20 windows of 60 s per name).
After the data, one end-of-stream record per partition named ``__watermark__`` with a
timestamp 120 s past the end lets every event-time tool close its last windows. The
checker ignores names that start with ``__``.

The expected results are computed from the generated values alone, sharing no code
with any tool.
"""

from __future__ import annotations

import asyncio
import math
import random
from array import array
from dataclasses import dataclass, field
from typing import Any, Final

import orjson

AGG_FUNCS: Final = ("sum", "avg", "min", "max")
N_NAMES: Final = 1000
SPAN_S: Final = 1200
T0: Final = 1_699_999_980  # a multiple of 60: windows align with the first event
WINDOW_S: Final = 60
WATERMARK_NAME: Final = "__watermark__"
WATERMARK_DELAY_S: Final = 120
N_PARTITIONS: Final = 4
# tansu reports topic configs only when set at creation; Quix reads retention.ms.
TOPIC_CONFIGS: Final = {"retention.ms": "-1", "retention.bytes": "-1"}

Key = tuple[str, int]  # (name, window_start)


@dataclass
class Workload:
    """The generated events in send order, and what a correct tool must output."""

    n: int
    seed: int
    partitions: int
    values: list[bytes] = field(repr=False)  # JSON text per data event
    name_index: array[int] = field(repr=False)  # name number k per data event
    watermark: bytes = b""
    expected: dict[Key, dict[str, Any]] = field(default_factory=dict, repr=False)

    def partition_of(self, k: int) -> int:
        return _partition(f"sensor-{k}".encode(), self.partitions)

    def name(self, k: int) -> str:
        return f"sensor-{k}"

    def all_values(self) -> list[bytes]:
        """Data events followed by one watermark record per partition (HTTP input)."""
        return [*self.values, *([self.watermark] * self.partitions)]


def _partition(key: bytes, partitions: int) -> int:
    """aiokafka's (and the Java client's) default partitioner: murmur2 of the key."""
    from aiokafka.partitioner import murmur2

    return int(murmur2(key) & 0x7FFFFFFF) % partitions


def generate(n: int, seed: int = 42, partitions: int = N_PARTITIONS) -> Workload:
    """The workload for (n, seed): deterministic, including the JSON texts."""
    rng = random.Random(seed)
    span_ms = SPAN_S * 1000
    values: list[bytes] = []
    name_index = array("H")
    acc: dict[Key, list[Any]] = {}  # [count, sum, min, max, agg_func]
    dumps = orjson.dumps
    for i in range(n):
        k = rng.randrange(N_NAMES)
        ts = (T0 * 1000 + (i * span_ms) // n) / 1000.0
        value = round(rng.uniform(-1000.0, 1000.0), 6)
        name = f"sensor-{k}"
        func = AGG_FUNCS[k % 4]
        values.append(dumps({"name": name, "value": value, "timestamp": ts, "agg_func": func}))
        name_index.append(k)
        key = (name, math.floor(ts / WINDOW_S) * WINDOW_S)
        a = acc.get(key)
        if a is None:
            acc[key] = [1, value, value, value, func]
        else:
            a[0] += 1
            a[1] += value
            a[2] = min(a[2], value)
            a[3] = max(a[3], value)
    watermark = dumps(
        {
            "name": WATERMARK_NAME,
            "value": 0.0,
            "timestamp": float(T0 + SPAN_S + WATERMARK_DELAY_S),
            "agg_func": "sum",
        }
    )
    return Workload(
        n=n,
        seed=seed,
        partitions=partitions,
        values=values,
        name_index=name_index,
        watermark=watermark,
        expected=_finish(acc),
    )


def _finish(acc: dict[Key, list[Any]]) -> dict[Key, dict[str, Any]]:
    out: dict[Key, dict[str, Any]] = {}
    for (name, ws), (count, total, low, high, func) in acc.items():
        value = {"sum": total, "avg": total / count, "min": low, "max": high}[func]
        out[(name, ws)] = {
            "name": name,
            "agg_func": func,
            "value": value,
            "count": count,
            "window_start": ws,
            "window_end": ws + WINDOW_S,
        }
    return out


async def create_topic(bootstrap: str, topic: str, partitions: int) -> None:
    """Create ``topic`` (explicit retention configs, see TOPIC_CONFIGS) unless it exists."""
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic

    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        if topic not in set(await admin.list_topics()):
            await admin.create_topics(
                [NewTopic(topic, partitions, 1, topic_configs=dict(TOPIC_CONFIGS))]
            )
    finally:
        await admin.close()


async def produce(workload: Workload, bootstrap: str, topic: str) -> None:
    """Load the workload into ``topic`` with ``send_batch``, keyed by name, in event order
    per partition; the watermark records go last, one per partition."""
    from aiokafka import AIOKafkaProducer

    await create_topic(bootstrap, topic, workload.partitions)
    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap, acks=1, max_batch_size=1 << 20, linger_ms=0
    )
    await producer.start()
    try:
        part_of = [workload.partition_of(k) for k in range(N_NAMES)]
        keys = [workload.name(k).encode() for k in range(N_NAMES)]
        batches = [producer.create_batch() for _ in range(workload.partitions)]
        in_flight: list[asyncio.Future[Any]] = []

        async def flush(p: int) -> None:
            batch, batches[p] = batches[p], producer.create_batch()
            batch.close()
            in_flight.append(await producer.send_batch(batch, topic, partition=p))
            if len(in_flight) >= 16:  # bounded: the broker acks while we build more
                await asyncio.gather(*in_flight)
                in_flight.clear()

        for value, k in zip(workload.values, workload.name_index, strict=True):
            p = part_of[k]
            if batches[p].append(key=keys[k], value=value, timestamp=None) is None:
                await flush(p)
                batches[p].append(key=keys[k], value=value, timestamp=None)
        for p in range(workload.partitions):
            if batches[p].record_count():
                await flush(p)
        await asyncio.gather(*in_flight)
        for p in range(workload.partitions):
            await producer.send_and_wait(
                topic, workload.watermark, key=WATERMARK_NAME.encode(), partition=p
            )
    finally:
        await producer.stop()
