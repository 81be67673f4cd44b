"""Issue 19 acceptance for ``dlq replay``, with the service as a process: two hours of
event time over four Kafka partitions into PostgreSQL with an archive, under a small
VABUS_MAX_MESSAGE_BYTES and VABUS_MAX_EVENTS_PER_MESSAGE, so that some messages are
dead-lettered ``too_large`` whole and some lose their elements past the cap. While the
service runs, ``vabus-aggregator dlq replay --reason too_large`` (a process, the limits
raised in its environment) makes every window equal an independent computation of all
the events; each dead letter is marked; a second run adds nothing."""

from __future__ import annotations

import math
import os
import random
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import asyncpg
import orjson
import pytest

from tests.archived import archive_rows
from tests.e2e.workload import checkout_on_path
from tests.fault.harness import Incarnation, Stream, create_topic, feed_kafka, service_env, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.e2e]

T0 = 1_699_999_200.0  # 2023-11-14T22:00Z
FUNCS = ("sum", "avg", "max", "count")
Window = tuple[str, str, float]


def event(rnd: random.Random, t: float) -> dict[str, Any]:
    return {
        "name": f"d{rnd.randrange(4)}",
        "agg_func": rnd.choice(FUNCS),
        "value": round(rnd.uniform(-100, 100), 3),
        "timestamp": round(t, 3),
    }


def stream() -> tuple[Stream, list[dict[str, Any]], int]:
    """(the stream with the events the service accepts as ``valid``, the events it
    dead-letters, how many dead letters)."""
    rnd = random.Random(1920)
    messages: list[tuple[bytes | None, bytes]] = []
    first: list[dict[str, Any]] = []
    redriven: list[dict[str, Any]] = []
    letters = 0
    t = T0
    while t < T0 + 2 * 3600:
        t += rnd.uniform(0.5, 3.0)
        kind = rnd.random()
        if kind < 0.03:  # over 400 bytes: dead-lettered whole
            evs = [event(rnd, t + i * 0.01) for i in range(6)]
            redriven += evs
        elif kind < 0.06:  # three elements: the third past the cap of 2
            evs = [event(rnd, t + i * 0.01) for i in range(3)]
            first += evs[:2]
            redriven.append(evs[2])
        else:
            ev = event(rnd, t)
            messages.append((None, orjson.dumps(ev)))
            first.append(ev)
            continue
        messages.append((None, orjson.dumps(evs)))
        letters += 1
    for _ in range(4):  # each partition's event time past the second hour
        ev = {"name": "zz", "value": 0.0, "timestamp": T0 + 3 * 3600}
        messages.append((None, orjson.dumps(ev)))
        first.append(ev)
    return Stream(messages, first), redriven, letters


def expected(events: list[dict[str, Any]]) -> dict[Window, tuple[float, int]]:
    values: dict[Window, list[float]] = defaultdict(list)
    for e in events:
        if e["name"] != "zz":
            start = math.floor(e["timestamp"] / 60) * 60.0
            values[(e["name"], e.get("agg_func", "sum"), start)].append(e["value"])
    out = {}
    for (name, func, start), vs in values.items():
        total = math.fsum(vs)
        result = {"sum": total, "avg": total / len(vs), "max": max(vs), "count": float(len(vs))}
        out[(name, func, start)] = (result[func], len(vs))
    return out


async def windows(dsn: str, table: str) -> dict[Window, tuple[float, int, int]]:
    conn = await asyncpg.connect(dsn)
    try:
        got = await conn.fetch(
            "SELECT name, agg_func, extract(epoch FROM window_start)::float8 AS ws, value, "
            f"count, revision FROM {table} WHERE name <> 'zz' AND window_start < to_timestamp($1)",
            T0 + 2 * 3600 + 60,
        )
    finally:
        await conn.close()
    return {
        (r["name"], r["agg_func"], r["ws"]): (r["value"], r["count"], r["revision"]) for r in got
    }


async def letters_of(dsn: str, topic: str) -> list[dict[str, Any]]:
    conn = await asyncpg.connect(dsn)
    try:
        if await conn.fetchval("SELECT to_regclass('dead_letters')") is None:
            return []
        rows = await conn.fetch(
            "SELECT reason, replayed_at, replay_outcome FROM dead_letters "
            "WHERE starts_with(source, $1)",
            f"kafka {topic}/",
        )
    finally:
        await conn.close()
    return [dict(r) for r in rows]


def run_dlq(env: dict[str, str], workdir: Path, since: str) -> subprocess.CompletedProcess[str]:
    full = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("VABUS_", "KAFKA_", "POSTGRES_", "STORAGE_", "AGGREGATION_"))
    }
    full.update(env)
    # the operator's fix: the limits raised for the redrive (the service keeps its own)
    full.update({"VABUS_MAX_MESSAGE_BYTES": "1048576", "VABUS_MAX_EVENTS_PER_MESSAGE": "100"})
    full["PYTHONPATH"] = checkout_on_path(full.get("PYTHONPATH"))
    argv = ["dlq", "replay", "--reason", "too_large", "--since", since]
    return subprocess.run(
        [sys.executable, "-m", "service", *argv],
        env=full,
        cwd=workdir,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )


async def test_raised_limits_redrive_too_large_while_the_service_runs(
    kafka_bootstrap: str, postgres_dsn: str, unique_name: str, tmp_path: Path
) -> None:
    since = str(int(time.time()) - 1)  # this test's dead letters only (a shared table)
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
        extra={
            "AGGREGATION_INTERVAL": "60",
            "ARCHIVE_URL": f"file://{archive}",
            "VABUS_MAX_MESSAGE_BYTES": "400",
            "VABUS_MAX_EVENTS_PER_MESSAGE": "2",
        },
    )
    s, redriven, letters = stream()
    first = expected(s.valid)
    service = Incarnation(env, tmp_path, 0)
    try:
        await feed_kafka(kafka_bootstrap, topic, s, rate=20_000)

        async def settled() -> bool:
            if not archive.exists() or sum(archive_rows(archive).values()) < len(s.valid):
                return False
            if len(await letters_of(postgres_dsn, topic)) < letters:
                return False
            return len(await windows(postgres_dsn, table)) == len(first)

        await wait_for(settled, 120, "every event archived, dead letters and windows", service.proc)
        before = await windows(postgres_dsn, table)
        assert all(before[k][1:] == (n, 1) for k, (_, n) in first.items())
        done = run_dlq(env, tmp_path, since)
        assert done.returncode == 0, done.stderr[-3000:]
        lines = done.stdout.splitlines()
        assert lines[0] == (
            f"dlq replay: selected {letters}, accepted {letters} ({len(redriven)} event(s)), "
            "already replayed (skipped) 0"
        ), lines
        assert any(line.startswith(f"written to postgres:{table}: ") for line in lines), lines
        got = await windows(postgres_dsn, table)
        want = expected(s.valid + redriven)
        assert set(got) == set(want)
        for key, (value, count) in want.items():
            assert got[key][1] == count, key
            assert math.isclose(got[key][0], value, rel_tol=1e-12, abs_tol=1e-9), (key, got[key])
            changed = key in first and first[key][1] != count
            assert got[key][2] == (2 if changed else 1), (key, got[key])
        marked = await letters_of(postgres_dsn, topic)
        assert len(marked) == letters
        assert all(d["replayed_at"] and d["replay_outcome"] == "accepted" for d in marked)
        again = run_dlq(env, tmp_path, since)
        assert again.returncode == 0, again.stderr[-3000:]
        assert again.stdout.splitlines()[0].startswith("dlq replay: selected 0, accepted 0")
        assert "written: nothing" in again.stdout, again.stdout
        assert await windows(postgres_dsn, table) == got
        assert service.proc.proc.poll() is None  # the service ran throughout
    finally:
        assert service.terminate() == 0, service.proc.log_text()[-3000:]
