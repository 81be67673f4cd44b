"""Restart time after ``kill -9`` with 100k open windows (not a test: prints numbers).

100k distinct names, one event each, all in one window (``AGGREGATION_INTERVAL=3600``,
so nothing closes), over the HTTP bus; once a checkpoint holding all of them is
durable, ``kill -9`` and start again. Reported, from the new process's start:

* ``status``   - /status answers;
* ``restored`` - /status shows all 100k windows open again;
* ``process``  - an event appended after the restart has been received and aggregated.

Run: ``.venv/bin/python -m bench.measure_restart [--store file|postgres|both]
[--windows N] [--repeat N]``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import tempfile
import time
from pathlib import Path
from typing import Any

import orjson

from service.dev.broker import EmbeddedKafka
from service.dev.emulator import Emulator
from service.dev.postgres_server import EmbeddedPostgres
from tests.fault.harness import Incarnation, service_env, wait_for

INTERVAL = 3600


def events(n: int, ts: float) -> list[bytes]:
    return [
        orjson.dumps(
            {"name": f"restart.{i:06d}", "value": float(i), "timestamp": ts, "agg_func": "avg"}
        )
        for i in range(n)
    ]


async def one_round(
    env: dict[str, str], work: Path, emulator: Emulator, windows: int, ts: float, index: int
) -> dict[str, float]:
    first = Incarnation(env, work, index * 2)
    try:
        emulator.append(events(windows, ts))

        async def all_open() -> dict[str, Any] | None:
            st = await first.status()
            return st if st and st.get("open_windows") == windows else None

        await wait_for(all_open, 120, f"{windows} open windows", first.proc)
        st = await first.status()
        assert st is not None
        checkpoints = st["checkpoints"]

        # The checkpoint that follows the last batch holds every window (if it had already
        # been taken, the count does not move: the restored window count tells).
        async def checkpointed_after() -> bool:
            now = await first.status()
            return bool(now and now["checkpoints"] >= checkpoints + 1)

        with contextlib.suppress(AssertionError):
            await wait_for(checkpointed_after, 10, "a checkpoint of every window", first.proc)
        await asyncio.sleep(1)
    finally:
        first.kill9()
    second = Incarnation(env, work, index * 2 + 1)
    t0 = second.started
    try:
        result: dict[str, float] = {}
        emulator.append([orjson.dumps({"name": "restart.new", "value": 1.0, "timestamp": ts})])

        async def answers() -> bool:
            return await second.status() is not None

        await wait_for(answers, 60, "/status", second.proc)
        result["status"] = time.monotonic() - t0

        async def restored() -> dict[str, Any] | None:
            st = await second.status()
            return st if st and (st.get("open_windows") or 0) >= windows else None

        await wait_for(restored, 120, "restored windows", second.proc)
        result["restored"] = time.monotonic() - t0

        async def processed() -> bool:
            st = await second.status()
            return bool(st and st.get("events_aggregated", 0) >= 1)

        await wait_for(processed, 60, "a new event processed", second.proc)
        result["process"] = time.monotonic() - t0
        result["checkpoint_bytes"] = _checkpoint_size(env)
        return result
    finally:
        second.kill9()


def _checkpoint_size(env: dict[str, str]) -> float:
    files = list(Path(env["STATE_DIR"]).glob("*.checkpoint"))
    return float(files[0].stat().st_size) if files else math.nan


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", choices=["file", "postgres", "both"], default="both")
    parser.add_argument("--windows", type=int, default=100_000)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    stores = ["file", "postgres"] if args.store == "both" else [args.store]
    with tempfile.TemporaryDirectory(prefix="vabus-restart-") as tmp:
        root = Path(tmp)
        kafka = EmbeddedKafka(root / "kafka")
        pg = EmbeddedPostgres(root / "pg")
        await kafka.start()
        await pg.start()
        try:
            for store in stores:
                for r in range(args.repeat):
                    work = root / f"{store}{r}"
                    ts = (math.floor(time.time() / INTERVAL)) * INTERVAL + 1.0
                    async with Emulator(max_events=args.windows * 3) as emulator:
                        env = service_env(
                            bus_url=emulator.url,
                            storage="kafka" if store == "file" else "postgres",
                            kafka_bootstrap=kafka.bootstrap_servers,
                            topic=f"restart-{store}{r}",
                            state_dir=work / "state",
                            postgres_dsn=pg.dsn,
                            table=f"restart_{store}{r}",
                            extra={
                                "AGGREGATION_INTERVAL": str(INTERVAL),
                                "AGGREGATION_GRACE": "0",
                                "AGGREGATION_IDLE_TIMEOUT": "3600",
                                "VABUS_BATCH_LIMIT": "10000",
                                "LOG_LEVEL": "WARNING",
                            },
                        )
                        res = await one_round(env, work, emulator, args.windows, ts, r)
                    print(
                        f"{store:8s} round {r}: /status {res['status']:.2f} s, windows "
                        f"restored {res['restored']:.2f} s, new event processed "
                        f"{res['process']:.2f} s; checkpoint file "
                        f"{res['checkpoint_bytes'] / 1e6:.1f} MB",
                        flush=True,
                    )
        finally:
            await pg.stop()
            await kafka.stop()


if __name__ == "__main__":
    asyncio.run(main())
