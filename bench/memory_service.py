"""MEMORY, through the service: N distinct names open at once, peak RSS of the process.

``python -m bench.memory_service [-n N] [--limit L] [--hold S]``

Starts the embedded broker, loads N events with N distinct names (one 3600 s window, so
nothing closes during the run) into a 4-partition topic, runs ``python -m service run``
(Kafka bus -> Kafka output, ``AGGREGATION_MAX_OPEN_WINDOWS=L``, default N), waits until
``/status`` shows every event taken (open windows plus ``cardinality_limit`` rejects),
keeps it running ``--hold`` seconds (checkpoints of the open windows happen meanwhile),
and prints the peak RSS (VmHWM), the RSS and the CPU seconds of the service process at
each step. With ``L < N`` the run fails unless open windows stay at L and the other
N - L events are dead-lettered ``cardinality_limit``.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
import orjson
from aiokafka import AIOKafkaProducer

from bench.feed import clean_env, free_port
from bench.proc import Child, proc_cpu_s, proc_peak_rss_mb
from bench.workload import create_topic
from service.dev.devstack import DevStack

TOPIC = "mem-events"
PARTITIONS = 4
_REJECTED = re.compile(
    rb'^vabus_aggregator_events_rejected_total\{reason="cardinality_limit"\} ([0-9.e+]+)$', re.M
)


def vm_kb(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


async def load(bootstrap: str, n: int, window_start: float) -> None:
    await create_topic(bootstrap, TOPIC, PARTITIONS)
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks=1, max_batch_size=1 << 20)
    await producer.start()
    try:
        batches = [producer.create_batch() for _ in range(PARTITIONS)]
        pending = []
        for i in range(n):
            p = i % PARTITIONS
            value = orjson.dumps(
                {
                    "name": f"host-{i:07d}.cpu.load",
                    "value": i * 0.5,
                    "timestamp": window_start + (i % 1000) / 10,
                }
            )
            if batches[p].append(key=None, value=value, timestamp=None) is None:
                batch, batches[p] = batches[p], producer.create_batch()
                batch.close()
                pending.append(await producer.send_batch(batch, TOPIC, partition=p))
                batches[p].append(key=None, value=value, timestamp=None)
        for p, batch in enumerate(batches):
            batch.close()
            pending.append(await producer.send_batch(batch, TOPIC, partition=p))
        await asyncio.gather(*pending)
    finally:
        await producer.stop()


async def status(session: aiohttp.ClientSession, port: int) -> tuple[dict[str, Any], float]:
    async with session.get(f"http://127.0.0.1:{port}/status") as resp:
        st: dict[str, Any] = await resp.json()
    async with session.get(f"http://127.0.0.1:{port}/metrics") as resp:
        m = _REJECTED.search(await resp.read())
    return st, float(m.group(1)) if m else 0.0


def line(child: Child, what: str, t0: float) -> str:
    pid = child.pid
    return (
        f"{time.monotonic() - t0:6.1f} s  {what:<34} RSS {vm_kb(pid, 'VmRSS') / 1024:7.1f} MB"
        f"  peak {proc_peak_rss_mb(pid) or 0:7.1f} MB  CPU {proc_cpu_s(pid) or 0:6.1f} s"
    )


async def main_async(args: argparse.Namespace) -> int:
    limit = args.limit or args.n
    window_start = (time.time() // 3600) * 3600
    with tempfile.TemporaryDirectory(prefix="vabus-mem-") as tmp:
        run_dir = Path(tmp)
        async with DevStack(run_dir / "stack", postgres=False) as stack:
            assert stack.kafka is not None
            bootstrap = stack.kafka.bootstrap_servers
            await load(bootstrap, args.n, window_start)
            port = free_port()
            env = {
                **clean_env(),
                "VABUS_URL": f"kafka://{bootstrap}/{TOPIC}?group=mem",
                "VABUS_KAFKA_SESSION_TIMEOUT_MS": "3000",
                "STORAGE_TYPE": "kafka",
                "KAFKA_BOOTSTRAP_SERVERS": bootstrap,
                "KAFKA_TOPIC": "mem-out",
                "AGGREGATION_INTERVAL": "3600",
                "AGGREGATION_MAX_OPEN_WINDOWS": str(limit),
                "STATE_DIR": str(run_dir / "state"),
                "HTTP_HOST": "127.0.0.1",
                "HTTP_PORT": str(port),
                "LOG_LEVEL": "WARNING",
            }
            child = Child(
                [sys.executable, "-m", "service", "run"],
                run_dir / "service.log",
                cwd=run_dir,
                env=env,
            )
            t0 = time.monotonic()
            ok = False
            try:
                async with aiohttp.ClientSession() as session:
                    open_w, rejected = 0, 0.0
                    while time.monotonic() - t0 < args.timeout and child.poll() is None:
                        try:
                            st, rejected = await status(session, port)
                            open_w = st.get("open_windows", 0)
                        except (aiohttp.ClientError, ValueError):
                            pass
                        if open_w + rejected >= args.n:
                            break
                        await asyncio.sleep(0.5)
                    print(line(child, f"all taken: {open_w:,} open", t0), flush=True)
                    ok = open_w == limit and rejected == args.n - limit
                    for _ in range(int(args.hold)):
                        await asyncio.sleep(1.0)
                    print(line(child, f"after holding {args.hold:.0f} s", t0), flush=True)
            finally:
                how, usage = await child.stop(signal.SIGTERM, 120.0)
            if usage is not None:
                print(
                    f"stopped by {how} (graceful: final checkpoint), exit {usage.exit_code}: "
                    f"peak {usage.peak_rss_mb:.1f} MB, CPU {usage.cpu_s:.1f} s"
                )
            print(f"rejected cardinality_limit: {rejected:,.0f}; expected {args.n - limit:,}")
            print("OK" if ok else f"FAILED (see {child.log_path})")
            return 0 if ok else 1


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("-n", type=int, default=1_000_000)
    ap.add_argument("--limit", type=int, default=0)
    ap.add_argument("--hold", type=float, default=10.0)
    ap.add_argument("--timeout", type=float, default=300.0)
    sys.exit(asyncio.run(main_async(ap.parse_args())))


if __name__ == "__main__":
    main()
