"""``replay`` of windows routed by a rule with ``source`` (several sources; docs/routes.md,
"Sources"), against real PostgreSQL while the service runs: the replay marks archived
events from their ``partition`` as the service marked them, so a corrupted hour of the
source rule's own table and of the default table each come back equal to an independent
computation of exactly their sources' events, and a second run writes nothing."""

from __future__ import annotations

import asyncio
import io
import math
import random
from collections import defaultdict
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import orjson
import pytest

from service.config import AggregationConfig, Config, PostgresConfig, Secret
from service.config.archive import ArchiveConfig
from service.replay.command import replay
from service.replay.span import ReplaySpan
from service.routes.rules import Route, Routes
from tests.integration.test_replay_postgres import Running, archived, table_hour2

pytestmark = pytest.mark.integration

START = 1_699_999_200.0  # 2023-11-14T22:00Z
HOUR2 = START + 3600  # the corrupted hour
ONE, TWO = "p0", "s2/p1"  # a partition of source 1 and one of source 2
FUNCS = ("sum", "avg", "max", "count")
Event = tuple[str, str, str, float, float]  # (partition, name, func, value, ts)


def feed() -> tuple[dict[str, list[bytes]], list[Event]]:
    """Three hours of n0..n3 on both sources."""
    rnd = random.Random(1919)
    feeds: dict[str, list[bytes]] = {ONE: [], TWO: []}
    events: list[Event] = []
    for partition, records in feeds.items():
        t = START
        while t < START + 3 * 3600:
            t += rnd.uniform(1.0, 20.0)
            name, func = f"n{rnd.randrange(4)}", rnd.choice(FUNCS)
            value = round(rnd.uniform(-100, 100), 3)
            records.append(
                orjson.dumps({"name": name, "agg_func": func, "value": value, "timestamp": t})
            )
            events.append((partition, name, func, value, t))
        records.append(orjson.dumps({"name": "zz", "value": 0, "timestamp": START + 4 * 3600}))
    return feeds, events


def expected_hour2(events: list[Event]) -> dict[tuple[str, str, float], tuple[float, int]]:
    values: dict[tuple[str, str, float], list[float]] = defaultdict(list)
    for _, name, func, value, ts in events:
        start = math.floor(ts / 60) * 60.0
        if HOUR2 <= start < HOUR2 + 3600:
            values[(name, func, start)].append(value)
    out = {}
    for key, vs in values.items():
        result = {
            "sum": math.fsum(vs),
            "avg": math.fsum(vs) / len(vs),
            "max": max(vs),
            "count": float(len(vs)),
        }
        out[key] = (result[key[1]], len(vs))
    return out


def routed(e: Event) -> bool:
    """The source rule's events: n1 and n3 of source 2."""
    return e[0] == TWO and e[1] in ("n1", "n3")


@pytest.fixture
async def running(
    postgres_dsn: str, unique_name: str, tmp_path: Path
) -> AsyncIterator[tuple[Running, Config, list[Event]]]:
    own = Route("src2", ("n1", "n3"), ("postgres",), source=2, postgres_table=f"{unique_name}_src2")
    config = Config(
        routes=Routes("routes.yaml", (own,), sources=2),
        aggregation=AggregationConfig(interval_s=60.0),
        outputs=("postgres",),
        postgres=PostgresConfig(
            dsn=Secret(postgres_dsn),
            table=f"{unique_name}_agg",
            dead_letter_table=f"{unique_name}_dlq",
            pool_max_size=2,
        ),
        archive=ArchiveConfig(
            kind="file", url=f"file://{tmp_path}/archive", path=f"{tmp_path}/archive"
        ),
    )
    feeds, events = feed()
    run = Running(config, feeds, tmp_path)
    task = asyncio.create_task(run.service.run())
    try:
        async with asyncio.timeout(60):
            while any(run.bus.positions.get(p) != n for p, n in run.total.items()) or (
                archived(tmp_path / "archive") < len(events) + 2
            ):
                assert not task.done(), task.exception()
                run.clock.advance(1.0)
                await asyncio.sleep(0.02)
        yield run, config, events
    finally:
        run.service.request_stop()
        await asyncio.wait_for(task, 30)


def assert_exact(got: dict[Any, tuple[float, int, int]], events: list[Event]) -> None:
    want = expected_hour2(events)
    assert set(got) == set(want)
    for key, (value, count) in want.items():
        assert got[key][1] == count, key
        assert math.isclose(got[key][0], value, rel_tol=1e-12, abs_tol=1e-9), (key, got[key], value)


async def corrupt(dsn: str, tables: list[str]) -> int:
    """Hour 2 of both tables: n1 shifted, n3 deleted."""
    where = f"window_start >= to_timestamp({HOUR2}) AND window_start < to_timestamp({HOUR2 + 3600})"
    n = 0
    conn = await asyncpg.connect(dsn)
    try:
        for table in tables:
            for sql in (
                f"UPDATE {table} SET value = value + 1 WHERE {where} AND name = 'n1'",
                f"DELETE FROM {table} WHERE {where} AND name = 'n3'",
            ):
                done = int((await conn.execute(sql)).split()[-1])
                assert done > 10, (table, sql)
                n += done
    finally:
        await conn.close()
    return n


async def test_a_source_routed_hour_is_replayed_into_its_own_table_exactly(
    running: tuple[Running, Config, list[Event]], postgres_dsn: str
) -> None:
    run, config, events = running
    default, own = config.postgres.table, config.routes.tables()[0]
    mine = [e for e in events if routed(e)]
    rest = [e for e in events if not routed(e)]
    assert_exact(await table_hour2(postgres_dsn, own), mine)
    assert_exact(await table_hour2(postgres_dsn, default), rest)
    corrupted = await corrupt(postgres_dsn, [default, own])
    span = ReplaySpan(HOUR2, HOUR2 + 3600)
    summary = await replay(config, span, clock=run.clock, err=io.StringIO(), tty=False)
    assert summary.changed + summary.new == corrupted
    assert set(summary.written) == {f"postgres:{default}", f"postgres:{own}"}
    assert summary.held_only == 0
    assert_exact(await table_hour2(postgres_dsn, own), mine)
    assert_exact(await table_hour2(postgres_dsn, default), rest)
    again = await replay(config, span, clock=run.clock, err=io.StringIO(), tty=False)
    assert (again.changed, again.new, sum(again.written.values())) == (0, 0, 0)
