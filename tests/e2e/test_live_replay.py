"""Issue 19 acceptance for ``replay``, with the service as a process: three hours of
event time over four Kafka partitions into PostgreSQL with an archive in a directory;
one hour of rows corrupted while the service runs; ``vabus-aggregator replay`` for that
hour (a process, configured by the same environment) makes it equal an independent
computation, leaves the other hours byte for byte, and a second run writes nothing."""

from __future__ import annotations

import asyncio
import math
import os
import random
import subprocess
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

import asyncpg
import orjson
import pytest

from tests.archived import archive_rows
from tests.e2e.workload import checkout_on_path
from tests.fault.harness import Incarnation, Stream, create_topic, feed_kafka, service_env, wait_for
from tests.replayed import rows_between

pytestmark = [pytest.mark.integration, pytest.mark.e2e]

T0 = 1_699_999_200.0  # 2023-11-14T22:00Z
HOUR2 = T0 + 3600
FUNCS = ("sum", "avg", "max", "count")
Window = tuple[str, str, float]


def stream() -> Stream:
    rnd = random.Random(1919)
    messages: list[tuple[bytes | None, bytes]] = []
    valid: list[dict[str, Any]] = []
    t = T0
    while t < T0 + 3 * 3600:
        t += rnd.uniform(0.2, 1.5)
        ev = {
            "name": f"r{rnd.randrange(4)}",
            "agg_func": rnd.choice(FUNCS),
            "value": round(rnd.uniform(-100, 100), 3),
            "timestamp": round(t, 3),
        }
        messages.append((None, orjson.dumps(ev)))  # unkeyed: round robin over partitions
        valid.append(ev)
    for _ in range(4):  # each partition's event time past the third hour
        ev = {"name": "zz", "value": 0.0, "timestamp": T0 + 4 * 3600}
        messages.append((None, orjson.dumps(ev)))
        valid.append(ev)
    return Stream(messages, valid)


def expected_hour2(valid: list[dict[str, Any]]) -> dict[Window, tuple[float, int]]:
    values: dict[Window, list[float]] = defaultdict(list)
    for e in valid:
        start = math.floor(e["timestamp"] / 60) * 60.0
        if HOUR2 <= start < HOUR2 + 3600:
            values[(e["name"], e.get("agg_func", "sum"), start)].append(e["value"])
    out = {}
    for (name, func, start), vs in values.items():
        total = math.fsum(vs)
        result = {"sum": total, "avg": total / len(vs), "max": max(vs), "count": float(len(vs))}
        out[(name, func, start)] = (result[func], len(vs))
    return out


async def rows(dsn: str, table: str) -> dict[tuple[str, str, float], str]:
    conn = await asyncpg.connect(dsn)
    try:
        got = await conn.fetch(
            f"SELECT t::text AS row, name, agg_func, window_start FROM {table} t"
        )
    finally:
        await conn.close()
    return {(r["name"], r["agg_func"], r["window_start"].timestamp()): r["row"] for r in got}


async def hour2(dsn: str, table: str) -> dict[Window, tuple[float, int, int]]:
    return await rows_between(dsn, table, HOUR2, HOUR2 + 3600)


def run_replay(env: dict[str, str], workdir: Path) -> subprocess.CompletedProcess[str]:
    full = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("VABUS_", "KAFKA_", "POSTGRES_", "STORAGE_", "AGGREGATION_"))
    }
    full.update(env)
    full["PYTHONPATH"] = checkout_on_path(full.get("PYTHONPATH"))
    argv = ["--from", "2023-11-14T23:00:00Z", "--to", "2023-11-15T00:00:00+00:00"]
    return subprocess.run(
        [sys.executable, "-m", "service", "replay", *argv],
        env=full,
        cwd=workdir,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


async def test_a_corrupted_hour_is_replayed_while_the_service_runs(
    kafka_bootstrap: str, postgres_dsn: str, unique_name: str, tmp_path: Path
) -> None:
    topic, table = f"{unique_name}-in", f"{unique_name}_agg"
    await create_topic(kafka_bootstrap, topic)
    archive = tmp_path / "archive"
    env = service_env(
        bus_url=f"kafka://{kafka_bootstrap}/{topic}?group=g-{unique_name}&metrics_topic=m-{unique_name}",
        storage="postgres",
        kafka_bootstrap=kafka_bootstrap,
        topic=f"{unique_name}-out",
        state_dir=tmp_path / "state",
        postgres_dsn=postgres_dsn,
        table=table,
        extra={"AGGREGATION_INTERVAL": "60", "ARCHIVE_URL": f"file://{archive}"},
    )
    s = stream()
    service = Incarnation(env, tmp_path, 0)
    try:
        await feed_kafka(kafka_bootstrap, topic, s, rate=20_000)

        async def settled() -> bool:
            if not archive.exists() or sum(archive_rows(archive).values()) < len(s.valid):
                return False
            return len(await hour2(postgres_dsn, table)) == len(expected_hour2(s.valid))

        await wait_for(settled, 120, "every event archived and hour 2 written", service.proc)
        await asyncio.sleep(2)  # hour 3's last windows too
        before = await rows(postgres_dsn, table)
        conn = await asyncpg.connect(postgres_dsn)
        try:
            where = (
                f"window_start >= to_timestamp({HOUR2}) "
                f"AND window_start < to_timestamp({HOUR2 + 3600})"
            )
            await conn.execute(
                f"UPDATE {table} SET value = value * 2 + 1 WHERE {where} AND name = 'r0'"
            )
            await conn.execute(
                f"UPDATE {table} SET count = count + 3 WHERE {where} AND name = 'r1'"
            )
            await conn.execute(f"DELETE FROM {table} WHERE {where} AND name = 'r2'")
        finally:
            await conn.close()
        first = run_replay(env, tmp_path)
        assert first.returncode == 0, first.stderr[-3000:]
        assert "2023-11-14T23 read" in first.stderr
        lines = first.stdout.splitlines()
        assert any(line.startswith(f"written to postgres:{table}: ") for line in lines), lines
        got = await hour2(postgres_dsn, table)
        want = expected_hour2(s.valid)
        assert set(got) == set(want)
        for key, (value, count) in want.items():
            assert got[key][1] == count, key
            assert math.isclose(got[key][0], value, rel_tol=1e-12, abs_tol=1e-9), (key, got[key])
            assert got[key][2] == (2 if key[0] in ("r0", "r1") else 1), (key, got[key])
        after = await rows(postgres_dsn, table)
        outside = [k for k in before if not HOUR2 <= k[2] < HOUR2 + 3600]
        assert len(outside) > 1000
        assert {k: after[k] for k in outside} == {k: before[k] for k in outside}
        again = run_replay(env, tmp_path)
        assert again.returncode == 0, again.stderr[-3000:]
        assert "written: nothing" in again.stdout, again.stdout
        assert await rows(postgres_dsn, table) == after
        assert service.proc.proc.poll() is None  # the service ran throughout
    finally:
        assert service.terminate() == 0, service.proc.log_text()[-3000:]
