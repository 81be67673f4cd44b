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
from service.cli import main
from service.config import AggregationConfig, Config, PostgresConfig, Secret
from service.config.archive import ArchiveConfig
from service.core.clock import ManualClock
from service.metrics.collector import MetricsCollector
from service.replay import command
from service.replay.command import Summary, replay
from service.replay.span import ReplaySpan
from service.routes.rules import Route, Routes
from service.sinks.postgres import PostgresSink
from service.wiring import build_router
from tests.archived import archive_rows
from tests.fakes.bus import MemoryBus
from tests.replayed import rows_between

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
        self.sink = PostgresSink(config.postgres, metrics, self.clock, router=build_router(config))
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


@pytest.fixture(params=["default", "routed"])
async def running(
    request: pytest.FixtureRequest, postgres_dsn: str, unique_name: str, tmp_path: Path
) -> AsyncIterator[tuple[Running, Config, list[tuple[str, str, float, float]]]]:
    # routed: n3 to a table of its own (ROUTES_FILE), the rest to the default table
    own = Route("own", ("n3",), ("postgres",), postgres_table=f"{unique_name}_n3")
    routes = Routes("routes.yaml", (own,)) if request.param == "routed" else Routes()
    config = Config(
        routes=routes,
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


async def table_rows(dsn: str, config: Config) -> dict[tuple[Any, ...], str]:
    """Every row of every table, every column as text (byte for byte), by table and
    primary key."""
    out: dict[tuple[Any, ...], str] = {}
    conn = await asyncpg.connect(dsn)
    try:
        for table in tables_of(config):
            rows = await conn.fetch(
                "SELECT t::text AS row, name, agg_func, window_start, tags::text AS tags "
                f"FROM {table} t"
            )
            for r in rows:
                key = (r["name"], r["agg_func"], r["window_start"].timestamp(), r["tags"], table)
                out[key] = r["row"]
    finally:
        await conn.close()
    return out


def tables_of(config: Config) -> list[str]:
    return [config.postgres.table, *config.routes.tables()]


async def hour2_values(
    dsn: str, config: Config
) -> dict[tuple[str, str, float], tuple[float, int, int]]:
    """Hour 2 over every table (a name lives in one table only)."""
    out: dict[tuple[str, str, float], tuple[float, int, int]] = {}
    for table in tables_of(config):
        got = await table_hour2(dsn, table)
        assert not set(got) & set(out), "a window in two tables"
        out.update(got)
    return out


async def table_hour2(dsn: str, table: str) -> dict[tuple[str, str, float], tuple[float, int, int]]:
    return await rows_between(dsn, table, HOUR2, HOUR2 + 3600)


async def corrupt(dsn: str, config: Config) -> dict[str, int]:
    """Hour 2: values shifted (n0, and n3's first minute, in its own table when routed),
    counts raised (n1), rows deleted (n2); hours 1 and 3 untouched."""
    where = f"window_start >= to_timestamp({HOUR2}) AND window_start < to_timestamp({HOUR2 + 3600})"
    first = f"window_start = to_timestamp({HOUR2})"
    done: dict[str, int] = {}
    conn = await asyncpg.connect(dsn)
    try:
        for table in tables_of(config):
            for what, sql in (
                ("shifted", f"UPDATE {table} SET value = value + 1 WHERE {where} AND name = 'n0'"),
                ("counted", f"UPDATE {table} SET count = count + 1 WHERE {where} AND name = 'n1'"),
                ("deleted", f"DELETE FROM {table} WHERE {where} AND name = 'n2'"),
                ("n3", f"UPDATE {table} SET value = value - 1 WHERE {first} AND name = 'n3'"),
            ):
                n = int((await conn.execute(sql)).split()[-1])
                done[what] = done.get(what, 0) + n
                if n:
                    done[f"{what}:{table}"] = n
    finally:
        await conn.close()
    return done


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
    before = await table_rows(postgres_dsn, config)
    assert_hour2_exact(await hour2_values(postgres_dsn, config), events)
    done = await corrupt(postgres_dsn, config)
    assert all(done[k] > 10 for k in ("shifted", "counted", "deleted")) and done["n3"], done
    span = ReplaySpan(HOUR2, HOUR2 + 3600)
    out = io.StringIO()
    summary = await replay(config, span, clock=run.clock, err=out, tty=False)
    assert summary.changed == done["shifted"] + done["counted"] + done["n3"]
    assert summary.new == done["deleted"]
    default, own = config.postgres.table, (*config.routes.tables(), None)[0]
    if own is None:  # every name in the default table
        assert summary.written == {f"postgres:{default}": summary.changed + summary.new}
    else:  # each window written at its route's table
        assert done[f"n3:{own}"] == done["n3"]
        assert summary.written == {
            f"postgres:{default}": summary.changed + summary.new - done["n3"],
            f"postgres:{own}": done["n3"],
        }
    assert summary.skipped_open == 0 and summary.held_only == 0
    assert summary.windows == summary.changed + summary.new + summary.unchanged
    assert "replay: 2023-11-14T23 read" in out.getvalue()
    got = await hour2_values(postgres_dsn, config)
    assert_hour2_exact(got, events)
    revisions = {k: v[2] for k, v in got.items()}
    for (name, func, start), revision in revisions.items():
        corrected = name in ("n0", "n1") or (name == "n3" and start == HOUR2)
        assert revision == (2 if corrected else 1), (name, func, start)
    after = await table_rows(postgres_dsn, config)
    outside = [k for k in before if not HOUR2 <= k[2] < HOUR2 + 3600]
    assert len(outside) > 500
    assert {k: after[k] for k in outside} == {k: before[k] for k in outside}
    untouched = [k for k in before if HOUR2 < k[2] < HOUR2 + 3600 and k[0] == "n3"]
    assert {k: after[k] for k in untouched} == {k: before[k] for k in untouched}
    again = await replay(config, span, clock=run.clock, err=io.StringIO(), tty=False)
    assert (again.changed, again.new, sum(again.written.values())) == (0, 0, 0)
    assert again.unchanged == summary.windows
    assert await table_rows(postgres_dsn, config) == after


async def test_a_replay_that_fails_half_way_then_runs_again_writes_each_revision_once(
    running: tuple[Running, Config, list[Any]], postgres_dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    run, config, events = running
    await corrupt(postgres_dsn, config)
    corrupted = await hour2_values(postgres_dsn, config)
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
    half = await hour2_values(postgres_dsn, config)
    assert sum(1 for k, v in half.items() if corrupted.get(k) != v) == 10  # the first chunk
    monkeypatch.setattr(PostgresSink, "write", real_write)
    rerun: Summary = await replay(config, span, clock=run.clock, err=io.StringIO(), tty=False)
    got = await hour2_values(postgres_dsn, config)
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


async def test_the_command_line_configured_by_the_environment_prints_its_summary(
    running: tuple[Running, Config, list[Any]],
    postgres_dsn: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
) -> None:
    _, config, _ = running
    if config.routes:
        pytest.skip("the routes file is the other case's")
    await corrupt(postgres_dsn, config)
    env = {
        "STORAGE_TYPE": "postgres",
        "POSTGRES_DSN": postgres_dsn,
        "POSTGRES_TABLE": config.postgres.table,
        "ARCHIVE_URL": config.archive.url,
        "AGGREGATION_INTERVAL": "60",
    }
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.chdir(tmp_path)  # no .env
    # the root logger stays pytest's
    monkeypatch.setattr("service.cli.setup_logging", lambda *a, **k: None)
    argv = ["replay", "--from", "2023-11-14T23:00:00Z", "--to", str(int(HOUR2 + 3600))]
    assert await asyncio.to_thread(main, argv) == 0
    out = capsys.readouterr()
    lines = out.out.splitlines()
    assert lines[0].startswith("replay: ") and "archive file(s)" in lines[0]
    assert lines[1].startswith("windows read ") and ": changed " in lines[1]
    assert lines[2].startswith(f"written to postgres:{config.postgres.table}: ")
    assert "replay: 2023-11-14T23 read" in out.err  # not a terminal: a line per hour
    assert await asyncio.to_thread(main, argv) == 0
    assert "written: nothing" in capsys.readouterr().out
