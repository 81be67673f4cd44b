"""Hand-off time after ``kill -9`` of one of two instances holding 100k open windows
(not a test: prints numbers).

Kafka bus, 4 partitions, 100k distinct names with one event each in one window
(``AGGREGATION_INTERVAL=3600``, so nothing closes), checkpoints in the cluster
(``--storage kafka``: the group's checkpoint topic; ``kafka,postgres``: PostgreSQL).
Two instances share the partitions; once both hold their windows and a checkpoint of
them is durable, one is killed with ``kill -9``. Reported, from the kill:

* ``assigned`` - the survivor holds every partition;
* ``restored`` - the survivor shows all 100k windows open;
* ``process``  - an event sent after the kill to a partition of the dead instance has
  been aggregated by the survivor.

Run: ``.venv/bin/python -m bench.measure_handoff [--storage kafka|kafka,postgres]
[--windows N] [--repeat N]``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import orjson
from aiokafka import AIOKafkaProducer
from aiokafka.partitioner import murmur2

from service.dev.broker import EmbeddedKafka
from service.dev.postgres_server import EmbeddedPostgres
from tests.fault.harness import Incarnation, create_topic, service_env, wait_for

INTERVAL = 3600
PARTITIONS = 4


async def produce(bootstrap: str, topic: str, names: list[str], ts: float) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=20)
    await producer.start()
    try:
        sent = [
            await producer.send(
                topic,
                orjson.dumps({"name": n, "value": 1.0, "timestamp": ts, "agg_func": "avg"}),
                key=n.encode(),
            )
            for n in names
        ]
        await asyncio.gather(*sent)
    finally:
        await producer.stop()


async def one_round(
    env: dict[str, str], work: Path, bootstrap: str, topic: str, windows: int, index: int
) -> dict[str, float]:
    ts = math.floor(time.time() / INTERVAL) * INTERVAL + 1.0
    a, b = Incarnation(env, work, index * 2), Incarnation(env, work, index * 2 + 1)
    try:

        async def both_hold() -> bool:
            sa, sb = await a.status(), await b.status()
            return bool(sa and sb and sa["partitions"] and sb["partitions"])

        await wait_for(both_hold, 60, "both instances holding partitions")
        await produce(bootstrap, topic, [f"handoff.{i:06d}" for i in range(windows)], ts)

        async def all_open() -> bool:
            sa, sb = await a.status(), await b.status()
            return bool(sa and sb and sa["open_windows"] + sb["open_windows"] >= windows)

        await wait_for(all_open, 120, f"{windows} open windows")
        sb = await b.status()
        assert sb is not None
        checkpoints = sb["checkpoints"]

        async def checkpointed() -> bool:
            now = await b.status()
            return bool(now and now["checkpoints"] >= checkpoints + 2)

        await wait_for(checkpointed, 30, "a checkpoint of every window")
        dead = sorted(sb["partitions"])
        b.kill9()
        killed = time.monotonic()
        # an event for a partition the dead instance held (the default partitioner)
        moved = {int(p.rsplit(":", 1)[1]) for p in dead}
        probe = next(
            n
            for n in (f"handoff.{i:06d}" for i in range(windows))
            if (murmur2(n.encode()) & 0x7FFFFFFF) % PARTITIONS in moved
        )
        result: dict[str, float] = {}

        async def assigned() -> bool:
            st = await a.status()
            return bool(st and len(st["partitions"]) == PARTITIONS)

        await wait_for(assigned, 60, "the survivor holding every partition", a.proc)
        result["assigned"] = time.monotonic() - killed

        async def restored() -> bool:
            st = await a.status()
            return bool(st and st["open_windows"] >= windows)

        await wait_for(restored, 60, "every window open on the survivor", a.proc)
        result["restored"] = time.monotonic() - killed
        before = (await a.status() or {}).get("events_aggregated", 0)
        await produce(bootstrap, topic, [probe], ts)

        async def processed() -> bool:
            st = await a.status()
            return bool(st and st["events_aggregated"] > before)

        await wait_for(processed, 60, "an event processed after the kill", a.proc)
        result["process"] = time.monotonic() - killed
        result["partitions_moved"] = float(len(dead))
        return result
    finally:
        with contextlib.suppress(Exception):
            b.kill9()
        a.kill9()


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--storage", choices=["kafka", "kafka,postgres"], default="kafka")
    parser.add_argument("--windows", type=int, default=100_000)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    results: list[dict[str, float]] = []
    with tempfile.TemporaryDirectory(prefix="vabus-handoff-") as tmp:
        root = Path(tmp)
        kafka = EmbeddedKafka(root / "kafka")
        pg = EmbeddedPostgres(root / "pg")
        await kafka.start()
        if "postgres" in args.storage:
            await pg.start()
        try:
            for r in range(args.repeat):
                topic = f"handoff-in-{r}"
                await create_topic(kafka.bootstrap_servers, topic, PARTITIONS)
                env = service_env(
                    bus_url=f"kafka://{kafka.bootstrap_servers}/{topic}?group=handoff-{r}",
                    storage=args.storage,
                    kafka_bootstrap=kafka.bootstrap_servers,
                    topic=f"handoff-out-{r}",
                    state_dir=root / f"state{r}",
                    postgres_dsn=pg.dsn if "postgres" in args.storage else None,
                    table=f"handoff_{r}",
                    extra={
                        "AGGREGATION_INTERVAL": str(INTERVAL),
                        "AGGREGATION_IDLE_TIMEOUT": "3600",
                        "VABUS_KAFKA_SESSION_TIMEOUT_MS": "3000",
                        "LOG_LEVEL": "WARNING",
                    },
                )
                res = await one_round(
                    env, root / f"run{r}", kafka.bootstrap_servers, topic, args.windows, r
                )
                results.append(res)
                print(
                    f"{args.storage} round {r}: {res['partitions_moved']:.0f} partitions moved; "
                    f"assigned {res['assigned']:.2f} s, windows restored {res['restored']:.2f} s, "
                    f"new event processed {res['process']:.2f} s after the kill",
                    flush=True,
                )
        finally:
            await kafka.stop()
            if "postgres" in args.storage:
                await pg.stop()
    med: dict[str, Any] = {
        k: statistics.median(r[k] for r in results) for k in ("assigned", "restored", "process")
    }
    print(
        f"median of {len(results)}: assigned {med['assigned']:.2f} s, restored "
        f"{med['restored']:.2f} s, processed {med['process']:.2f} s"
    )


if __name__ == "__main__":
    asyncio.run(main())
