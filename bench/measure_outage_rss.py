"""Peak RSS of the service while PostgreSQL is down, with events arriving (not a test).

The emulator's load generator appends ``--rate`` events/s (default 20k) over ``--names``
names; the service writes to Kafka and PostgreSQL. After ``--warmup`` seconds PostgreSQL
is stopped for ``--down`` seconds (default 60), then started again, and the run goes on
until the service has caught up. The service's RSS is sampled every 0.5 s from /proc.

Run: ``.venv/bin/python -m bench.measure_outage_rss [--rate N] [--down S]``.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from pathlib import Path

from service.dev.broker import EmbeddedKafka
from service.dev.emulator import Emulator
from service.dev.load import LoadGenerator
from service.dev.postgres_server import EmbeddedPostgres
from tests.fault.harness import Incarnation, service_env


def rss_kib(pid: int, field: str = "VmRSS") -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rate", type=float, default=20_000)
    parser.add_argument("--names", type=int, default=1000)
    parser.add_argument("--warmup", type=float, default=20)
    parser.add_argument("--down", type=float, default=60)
    parser.add_argument("--catchup-limit", type=float, default=120)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="vabus-rss-") as tmp:
        root = Path(tmp)
        kafka, pg = EmbeddedKafka(root / "kafka"), EmbeddedPostgres(root / "pg")
        await kafka.start()
        await pg.start()
        emulator = Emulator(max_events=int(args.rate * (args.down + args.warmup + 60)))
        await emulator.start()
        gen = LoadGenerator(emulator, rate=args.rate, names=args.names, seed=1)
        generating = asyncio.create_task(gen.run())
        env = service_env(
            bus_url=emulator.url,
            storage="kafka,postgres",
            kafka_bootstrap=kafka.bootstrap_servers,
            topic="rss",
            state_dir=root / "state",
            postgres_dsn=pg.dsn,
            table="rss",
            extra={
                "AGGREGATION_GRACE": "2",
                "AGGREGATION_IDLE_TIMEOUT": "30",
                "LOG_LEVEL": "WARNING",
            },
        )
        inc = Incarnation(env, root, 0)
        pid = inc.proc.proc.pid
        peaks = {"warm-up": 0, "postgres down": 0, "catch-up": 0}
        try:
            t0 = time.monotonic()
            phase = "warm-up"
            down_at = up_at = caught_up_at = None
            while True:
                await asyncio.sleep(0.5)
                now = time.monotonic() - t0
                assert inc.proc.proc.poll() is None, inc.proc.log_text()[-3000:]
                peaks[phase] = max(peaks[phase], rss_kib(pid))
                if phase == "warm-up" and now >= args.warmup:
                    await pg.stop()
                    down_at, phase = now, "postgres down"
                elif (
                    phase == "postgres down" and down_at is not None and now >= down_at + args.down
                ):
                    st = await inc.status()
                    backlog = emulator.stats()["events_stored"] - (st or {}).get(
                        "events_received", 0
                    )
                    print(
                        f"end of outage: {backlog} events waiting in the bus, service "
                        f"{(st or {}).get('subscribers')}",
                        flush=True,
                    )
                    await pg.start()
                    up_at, phase = now, "catch-up"
                elif phase == "catch-up" and up_at is not None:
                    st = await inc.status()
                    behind = emulator.stats()["events_stored"] - (st or {}).get(
                        "events_received", 0
                    )
                    if behind < args.rate:  # within a second of the head
                        caught_up_at = now
                        break
                    if now > up_at + args.catchup_limit:
                        print(f"not caught up after {args.catchup_limit} s: {behind} behind")
                        break
                if int(now) % 10 == 0 and now - int(now) < 0.5:
                    st = await inc.status() or {}
                    print(
                        f"{now:5.0f} s {phase:14s} RSS {rss_kib(pid) / 1024:6.1f} MiB, "
                        f"received {st.get('events_received')}, "
                        f"open windows {st.get('open_windows')}",
                        flush=True,
                    )
            hwm = rss_kib(pid, "VmHWM")
        finally:
            generating.cancel()
            inc.terminate()
            await emulator.stop()
            await pg.stop()
            await kafka.stop()
        summary = ", ".join(f"{k} {v / 1024:.1f} MiB" for k, v in peaks.items())
        print(
            f"rate {args.rate:.0f} events/s, PostgreSQL down {args.down:.0f} s: peak RSS "
            f"{summary}; VmHWM {hwm / 1024:.1f} MiB; caught up "
            f"{'-' if caught_up_at is None or up_at is None else f'{caught_up_at - up_at:.0f} s'}"
            " after PostgreSQL returned"
        )


if __name__ == "__main__":
    asyncio.run(main())
