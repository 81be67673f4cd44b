"""``replay`` against real PostgreSQL while the service runs (issue 19 acceptance, in
process): one hour of rows corrupted, replayed from the archive the service wrote; that
hour equals an independent computation, the other hours stay byte for byte, a second
run writes nothing, and a run that fails half-way then runs again writes each revision
once."""

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

from service.app import Service
from service.archive.stores import DirectoryStore
from service.archive.writer import ArchiveWriter
from service.checkpoints.file import FileCheckpointStore
from service.config import AggregationConfig, Config, PostgresConfig, Secret
from service.config.archive import ArchiveConfig
from service.core.clock import ManualClock
from service.metrics.collector import MetricsCollector
from service.replay import command
from service.replay.command import Summary, replay
from service.replay.span import ReplaySpan
from service.sinks.postgres import PostgresSink
from tests.archived import archive_rows
from tests.fakes.bus import MemoryBus

pytestmark = pytest.mark.integration

START = 1_699_999_200.0  # 2023-11-14T22:00Z
HOUR2 = START + 3600  # the corrupted hour
FUNCS = ("sum", "avg", "max", "count")


def feed() -> tuple[dict[str, list[bytes]], list[tuple[str, str, float, float]]]:
    """Three hours over two partitions: (name, func, value, ts) of every event."""
    rnd = random.Random(19)
    feeds: dict[str, list[bytes]] = {"p0": [], "p1": []}
    events = []
    for records in feeds.values():
        t = START
        while t < START + 3 * 3600:
            t += rnd.uniform(0.5, 15.0)
            name, func = f"n{rnd.randrange(4)}", rnd.choice(FUNCS)
            value = round(rnd.uniform(-100, 100), 3)
            records.append(
                orjson.dumps({"name": name, "agg_func": func, "value": value, "timestamp": t})
            )
            events.append((name, func, value, t))
        # every partition's event time past the third hour: its windows close
        records.append(orjson.dumps({"name": "zz", "value": 0, "timestamp": START + 4 * 3600}))
    return feeds, events


def expected_hour2(
    events: list[tuple[str, str, float, float]],
) -> dict[tuple[str, str, float], tuple[float, int]]:
    """The independent computation: value and count per (name, func, window_start)."""
    values: dict[tuple[str, str, float], list[float]] = defaultdict(list)
    for name, func, value, ts in events:
        start = math.floor(ts / 60) * 60.0
        if HOUR2 <= start < HOUR2 + 3600:
            values[(name, func, start)].append(value)
    out = {}
    for (name, func, start), vs in values.items():
        result = {
            "sum": math.fsum(vs),
            "avg": math.fsum(vs) / len(vs),
            "max": max(vs),
            "count": float(len(vs)),
        }
        out[(name, func, start)] = (result[func], len(vs))
    return out


def archived(root: Path) -> int:
    return sum(archive_rows(root).values()) if root.exists() else 0


class Running:
    def __init__(self, config: Config, feeds: dict[str, list[bytes]], tmp: Path) -> None:
        self.clock = ManualClock(START + 5 * 3600)
        metrics = MetricsCollector(self.clock)
        self.bus = MemoryBus(feeds, batch_size=25, clock=self.clock)
        self.sink = PostgresSink(config.postgres, metrics, self.clock)
        self.service = Service(
            config,
            bus=self.bus,
            sinks=[self.sink],
            store=FileCheckpointStore(str(tmp / "state"), "test"),
            metrics=metrics,
            clock=self.clock,
            serve_http=False,
            archive=ArchiveWriter(DirectoryStore(config.archive.path), metrics),
        )
        self.total = {p: len(r) for p, r in feeds.items()}


@pytest.fixture
async def running(
    postgres_dsn: str, unique_name: str, tmp_path: Path
) -> AsyncIterator[tuple[Running, Config, list[tuple[str, str, float, float]]]]:
    config = Config(
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
            # drained, and every event in a checkpointed archive file (the checkpoint
            # interval runs on the injected clock)
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


async def table_rows(dsn: str, table: str) -> dict[tuple[Any, ...], tuple[Any, ...]]:
    """Every row, every column as text (byte for byte), by primary key."""
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch(
            "SELECT t::text AS row, name, agg_func, window_start, tags::text AS tags "
            f"FROM {table} t"
        )
    finally:
        await conn.close()
    return {
        (r["name"], r["agg_func"], r["window_start"].timestamp(), r["tags"]): (r["row"],)
        for r in rows
    }


async def hour2_values(
    dsn: str, table: str
) -> dict[tuple[str, str, float], tuple[float, int, int]]:
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch(
            "SELECT name, agg_func, extract(epoch FROM window_start)::float8 AS ws, value, "
            f"count, revision FROM {table} "
            "WHERE window_start >= to_timestamp($1) AND window_start < to_timestamp($2)",
            HOUR2,
            HOUR2 + 3600,
        )
    finally:
        await conn.close()
    return {
        (r["name"], r["agg_func"], r["ws"]): (r["value"], r["count"], r["revision"]) for r in rows
    }


async def corrupt(dsn: str, table: str) -> dict[str, int]:
    """Hour 2: values shifted, counts raised, rows deleted; hour-1 and hour-3 untouched."""
    conn = await asyncpg.connect(dsn)
    try:
        where = (
            f"window_start >= to_timestamp({HOUR2}) AND window_start < to_timestamp({HOUR2 + 3600})"
        )
        shifted = await conn.execute(
            f"UPDATE {table} SET value = value + 1 WHERE {where} AND name = 'n0'"
        )
        counted = await conn.execute(
            f"UPDATE {table} SET count = count + 1 WHERE {where} AND name = 'n1'"
        )
        deleted = await conn.execute(f"DELETE FROM {table} WHERE {where} AND name = 'n2'")
    finally:
        await conn.close()
    return {
        k: int(v.split()[-1])
        for k, v in (("shifted", shifted), ("counted", counted), ("deleted", deleted))
    }


def assert_hour2_exact(
    got: dict[tuple[str, str, float], tuple[float, int, int]], events: list[Any]
) -> None:
    want = expected_hour2(events)
    assert set(got) == set(want)
    for key, (value, count) in want.items():
        assert got[key][1] == count, key
        assert math.isclose(got[key][0], value, rel_tol=1e-12, abs_tol=1e-9), (key, got[key], value)


async def test_a_corrupted_hour_is_replayed_exactly_and_a_second_run_writes_nothing(
    running: tuple[Running, Config, list[Any]], postgres_dsn: str
) -> None:
    run, config, events = running
    table = config.postgres.table
    before = await table_rows(postgres_dsn, table)
    assert_hour2_exact({k: v for k, v in (await hour2_values(postgres_dsn, table)).items()}, events)
    done = await corrupt(postgres_dsn, table)
    assert all(n > 10 for n in done.values()), done
    span = ReplaySpan(HOUR2, HOUR2 + 3600)
    out = io.StringIO()
    summary = await replay(config, span, clock=run.clock, err=out, tty=False)
    assert summary.changed == done["shifted"] + done["counted"]
    assert summary.new == done["deleted"]
    assert summary.written == {f"postgres:{table}": summary.changed + summary.new}
    assert summary.skipped_open == 0 and summary.held_only == 0
    assert summary.windows == summary.changed + summary.new + summary.unchanged
    assert "replay: 2023-11-14T23 read" in out.getvalue()
    got = await hour2_values(postgres_dsn, table)
    assert_hour2_exact(got, events)
    revisions = {k[0]: v[2] for k, v in got.items()}
    assert revisions == {"n0": 2, "n1": 2, "n2": 1, "n3": 1}
    after = await table_rows(postgres_dsn, table)
    outside = [k for k in before if not HOUR2 <= k[2] < HOUR2 + 3600]
    assert len(outside) > 500
    assert {k: after[k] for k in outside} == {k: before[k] for k in outside}
    untouched = [k for k in before if HOUR2 <= k[2] < HOUR2 + 3600 and k[0] == "n3"]
    assert {k: after[k] for k in untouched} == {k: before[k] for k in untouched}
    again = await replay(config, span, clock=run.clock, err=io.StringIO(), tty=False)
    assert (again.changed, again.new, sum(again.written.values())) == (0, 0, 0)
    assert again.unchanged == summary.windows
    assert await table_rows(postgres_dsn, table) == after


async def test_a_replay_that_fails_half_way_then_runs_again_writes_each_revision_once(
    running: tuple[Running, Config, list[Any]], postgres_dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    run, config, events = running
    table = config.postgres.table
    await corrupt(postgres_dsn, table)
    corrupted = await hour2_values(postgres_dsn, table)
    writes = 0
    real_write = PostgresSink.write

    async def dies_on_the_second_chunk(self: PostgresSink, aggs: Any, dead: Any) -> None:
        nonlocal writes
        writes += 1
        if writes == 2:
            raise ConnectionResetError("killed")
        await real_write(self, aggs, dead)

    monkeypatch.setattr(command, "_WRITE_CHUNK", 10)
    monkeypatch.setattr(PostgresSink, "write", dies_on_the_second_chunk)
    span = ReplaySpan(HOUR2, HOUR2 + 3600)
    with pytest.raises(ConnectionResetError):
        await replay(config, span, clock=run.clock, err=io.StringIO(), tty=False)
    half = await hour2_values(postgres_dsn, table)
    assert sum(1 for k, v in half.items() if corrupted.get(k) != v) == 10  # the first chunk
    monkeypatch.setattr(PostgresSink, "write", real_write)
    rerun: Summary = await replay(config, span, clock=run.clock, err=io.StringIO(), tty=False)
    got = await hour2_values(postgres_dsn, table)
    assert_hour2_exact(got, events)
    assert {v[2] for v in got.values()} == {1, 2}  # never a third revision
    assert rerun.unchanged >= 10


async def test_windows_the_service_may_still_emit_or_correct_are_skipped(
    running: tuple[Running, Config, list[Any]], postgres_dsn: str
) -> None:
    run, config, _ = running
    lateness = replace_lateness(config, 3 * 3600.0)  # hour 2 still correctable
    summary = await replay(
        lateness, ReplaySpan(HOUR2, HOUR2 + 3600), clock=run.clock, err=io.StringIO(), tty=False
    )
    assert summary.windows > 100 and summary.skipped_open == summary.windows
    assert not summary.written


def replace_lateness(config: Config, lateness: float) -> Config:
    from dataclasses import replace

    return replace(config, aggregation=replace(config.aggregation, allowed_lateness_s=lateness))
