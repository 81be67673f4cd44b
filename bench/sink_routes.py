"""ROUTES: the Kafka sink's own cost per write, with and without ROUTES_FILE.

``python -m bench.sink_routes [--writes 10] [--aggregates 5000] [--routes]``

Writes one batch of ``--aggregates`` aggregates (names ``cpu.*``, ``billing.*``,
``web.*`` in turn) ``--writes`` times through :class:`KafkaSink` against a stub
producer (no broker, no network): what is left is the sink's Python work, encoding and
batching, plus with ``--routes`` the routing of docs/routes.md (``cpu.*`` to PostgreSQL
only, ``billing.*`` to its own topic), which leaves a third of the batch out of Kafka.
Wall time is too noisy on a shared machine; count instructions instead:

    for n in 2 12; do PYTHONHASHSEED=0 valgrind --tool=cachegrind --cache-sim=no \\
        --cachegrind-out-file=/dev/null python -m bench.sink_routes --writes $n; done

(instructions per write = the difference / 10), on this branch and on main without
``--routes`` (main has no router: the flag is refused there).
"""

from __future__ import annotations

import argparse
import asyncio
import time
from typing import Any

from service.config import KafkaConfig
from service.core.clock import SystemClock
from service.core.events import Aggregate
from service.metrics.collector import MetricsCollector
from service.sinks.kafka import KafkaSink

_PREFIXES = ("cpu", "billing", "web")
_BATCH_RECORDS = 2000


class _Meta:
    def __init__(self, partition: int) -> None:
        self.partition, self.offset = partition, 0


class _Batch:
    def __init__(self) -> None:
        self.n = 0

    def append(self, key: bytes, value: bytes, timestamp: None) -> int | None:
        self.n += 1
        return self.n if self.n < _BATCH_RECORDS else None

    def record_count(self) -> int:
        return self.n


class _Producer:
    """What KafkaSink uses of AIOKafkaProducer, acknowledging every batch at once."""

    async def partitions_for(self, topic: str) -> set[int]:
        return {0, 1, 2}

    def create_batch(self) -> _Batch:
        return _Batch()

    async def send_batch(self, batch: _Batch, topic: str, partition: int) -> Any:
        done = asyncio.get_running_loop().create_future()
        done.set_result(_Meta(partition))
        return done


def _sink(routed: bool) -> KafkaSink:
    if not routed:
        return KafkaSink(KafkaConfig(), MetricsCollector(), SystemClock())
    from service.routes import Route, Router, Routes

    rules = (
        Route("hosts", ("cpu.*",), ("postgres",), postgres_table="host_metrics"),
        Route("billing", ("billing.*",), ("kafka", "postgres"), kafka_topic="billing-aggregates"),
    )
    router = Router(
        Routes(rules=rules),
        outputs=("kafka", "postgres"),
        kafka_topic="aggregated-events",
        postgres_table="aggregated_events",
    )
    return KafkaSink(KafkaConfig(), MetricsCollector(), SystemClock(), router=router)


async def _run(writes: int, size: int, routed: bool) -> float:
    sink = _sink(routed)
    sink._producer = _Producer()  # started without a broker
    t0 = 1.7e9
    batch = [
        Aggregate(
            f"{_PREFIXES[i % 3]}.n{i % 500}",
            "sum",
            1.5 * i,
            3,
            t0 + 60 * (i // 500),
            t0 + 60 * (i // 500) + 60,
            t0 + 999,
        )
        for i in range(size)
    ]
    started = time.process_time()
    for _ in range(writes):
        await sink.write(batch, [])
    return time.process_time() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--writes", type=int, default=10)
    parser.add_argument("--aggregates", type=int, default=5000)
    parser.add_argument("--routes", action="store_true")
    args = parser.parse_args()
    cpu = asyncio.run(_run(args.writes, args.aggregates, args.routes))
    print(
        f"{'routes' if args.routes else 'no routes'}: {args.writes} writes of "
        f"{args.aggregates} aggregates, {cpu / args.writes * 1000:.2f} ms CPU per write"
    )


if __name__ == "__main__":
    main()
