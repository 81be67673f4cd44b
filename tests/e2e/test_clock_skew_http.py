"""Clock skew against the real service process (contract §12.1): on an HTTP bus (one
partition, so no other partition caps its event time) one valid event 3,000 s ahead of
the clock, then on-time traffic. Nothing is late, every aggregate is exact, and the
outlier's window comes out by the quiet rule."""

from __future__ import annotations

import asyncio
import math
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest

from service.dev.emulator import Emulator
from tests.e2e.test_e2e_http import stored_rows, wait_until
from tests.e2e.workload import Key, ServiceProcess, assert_matches, free_port

pytestmark = [pytest.mark.e2e, pytest.mark.integration]

INTERVAL = 2.0
ON_TIME_S = 8.0  # seconds of on-time traffic
STEP_S = 0.05  # one batch of events this often


async def feed(emulator: Emulator, name: str, sent: list[dict[str, Any]]) -> None:
    """On-time events stamped with the wall clock as they are appended; one event 3,000 s
    ahead after the first second (a producer whose clock is 50 minutes fast)."""
    started = time.time()
    k = 0
    outlier_sent = False
    while (now := time.time()) - started < ON_TIME_S:
        batch = [{"name": f"{name}.{k % 3}", "value": float(k), "timestamp": now}]
        if not outlier_sent and now - started >= 1.0:
            batch.append({"name": f"{name}.0", "value": 1e6, "timestamp": now + 3000.0})
            outlier_sent = True
        emulator.append(batch)
        sent.extend(batch)
        k += 1
        await asyncio.sleep(STEP_S)


def expected(sent: list[dict[str, Any]]) -> dict[Key, tuple[float, int]]:
    groups: dict[Key, list[float]] = defaultdict(list)
    for e in sent:
        start = math.floor(e["timestamp"] / INTERVAL) * INTERVAL
        groups[(e["name"], "sum", start)].append(e["value"])
    return {k: (math.fsum(v), len(v)) for k, v in groups.items()}


async def late_dead_letters(dsn: str, name: str) -> int:
    conn = await asyncpg.connect(dsn)
    try:
        n = await conn.fetchval(
            "SELECT count(*) FROM dead_letters WHERE strpos(raw, $1) > 0", f'"{name}.'
        )
    finally:
        await conn.close()
    return int(n)


async def test_one_event_far_ahead_leaves_on_time_events_on_time_end_to_end(
    postgres_dsn: str, unique_name: str, tmp_path: Path
) -> None:
    table = f"agg_{unique_name}"
    sent: list[dict[str, Any]] = []
    async with Emulator() as emulator:
        http_port = free_port()
        proc = ServiceProcess(
            {
                "VABUS_URL": emulator.url,
                "VABUS_WAIT": "0.5",
                "STORAGE_TYPE": "postgres",
                "POSTGRES_DSN": postgres_dsn,
                "POSTGRES_TABLE": table,
                "AGGREGATION_INTERVAL": str(INTERVAL),
                "AGGREGATION_IDLE_TIMEOUT": "2",
                "HTTP_HOST": "127.0.0.1",
                "HTTP_PORT": str(http_port),
                "STATE_DIR": str(tmp_path / "state"),
            },
            tmp_path,
        )
        try:
            await feed(emulator, unique_name, sent)
            want = expected(sent)
            status_url = f"http://127.0.0.1:{http_port}/status"

            async with aiohttp.ClientSession() as http:

                async def status() -> dict[str, Any]:
                    async with http.get(status_url) as r:
                        body: dict[str, Any] = await r.json()
                        return body

                async def all_judged() -> bool:
                    # every event received and no window open: the outlier's window came
                    # out by the quiet rule, 2 s after the last event
                    ledger = (await status())["ledger"]
                    return bool(ledger["received"] == len(sent) and ledger["open"] == 0)

                await wait_until(all_judged, 60, "every event judged", proc)
                final = await status()

                async def all_stored() -> bool:
                    rows = await stored_rows(postgres_dsn, table)
                    return len(rows) >= int(final["aggregates_emitted"])

                await wait_until(all_stored, 30, "aggregates in PostgreSQL", proc)
            assert final["events_late"] == 0
            assert final["ledger"]["late"] == 0
            assert final["ledger"]["imbalance"] == 0
            assert final["events_ahead"] == 1
            assert await late_dead_letters(postgres_dsn, unique_name) == 0
            assert_matches(await stored_rows(postgres_dsn, table), want, "PostgreSQL")
        finally:
            code = proc.terminate()
        assert code == 0, proc.log_text()[-3000:]
