"""``dlq replay`` against real PostgreSQL while the service runs (issue 19 acceptance, in
process): the service dead-letters messages over a small VABUS_MAX_MESSAGE_BYTES and
the elements past a small VABUS_MAX_EVENTS_PER_MESSAGE; once their windows are closed,
the limits are raised and the dead letters redriven. The affected windows then equal
an independent computation of every event with revision 2, the others are untouched,
each dead letter is marked, the ledger counts each redriven element once, and a second
run adds nothing. A run crashed after marking or after the archive write is finished
by the next one, exactly."""

from __future__ import annotations

import asyncio
import io
import math
import random
from collections import defaultdict
from collections.abc import AsyncIterator
from dataclasses import replace
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
from service.config import AggregationConfig, BusConfig, Config, PostgresConfig, Secret, load_config
from service.config.archive import ArchiveConfig
from service.core.clock import ManualClock
from service.core.errors import PermanentError
from service.dlq import command
from service.dlq.command import DlqSummary, dlq_replay
from service.metrics.collector import MetricsCollector
from service.sinks.postgres import PostgresSink
from tests.archived import archive_rows
from tests.fakes.bus import MemoryBus

pytestmark = pytest.mark.integration

START = 1_699_999_200.0  # 2023-11-14T22:00Z
FUNCS = ("sum", "avg", "max", "count")
SMALL = BusConfig(max_message_bytes=400, max_events_per_message=2)
RAISED = BusConfig(max_message_bytes=1_048_576, max_events_per_message=100)

Ev = tuple[str, str, float, float]


def event(rnd: random.Random, t: float) -> dict[str, Any]:
    name, func = f"n{rnd.randrange(4)}", rnd.choice(FUNCS)
    return {
        "name": name,
        "agg_func": func,
        "value": round(rnd.uniform(-100, 100), 3),
        "timestamp": t,
    }


def ev_of(d: dict[str, Any]) -> Ev:
    return (d["name"], d["agg_func"], d["value"], d["timestamp"])


class Feed:
    """Two hours over two partitions. Most messages are one event; some an array too
    big for SMALL (dead-lettered whole), some an array of 3 (its third element past
    SMALL's cap of 2)."""

    def __init__(self) -> None:
        rnd = random.Random(1919)
        self.records: dict[str, list[bytes]] = {"p0": [], "p1": []}
        self.first: list[Ev] = []  # accepted by the service
        self.redriven: list[Ev] = []  # dead-lettered too_large, valid under RAISED
        self.big = self.past = 0
        for records in self.records.values():
            t = START
            while t < START + 2 * 3600:
                t += rnd.uniform(1.0, 20.0)
                # none in the first 10 minutes: an hour's rollup then starts well before
                # the first redriven event (its span must reach back to it)
                kind = rnd.random() if t > START + 600 else 1.0
                if kind < 0.05:  # too many bytes (6 events, ~600 bytes)
                    evs = [event(rnd, t + i * 0.01) for i in range(6)]
                    records.append(orjson.dumps(evs))
                    self.redriven += map(ev_of, evs)
                    self.big += 1
                elif kind < 0.10:  # three elements: the third past the cap
                    evs = [event(rnd, t + i * 0.01) for i in range(3)]
                    records.append(orjson.dumps(evs))
                    self.first += map(ev_of, evs[:2])
                    self.redriven.append(ev_of(evs[2]))
                    self.past += 1
                else:
                    d = event(rnd, t)
                    records.append(orjson.dumps(d))
                    self.first.append(ev_of(d))
            # every partition's event time past the second hour: its windows close
            closing = {"name": "zz", "value": 0, "timestamp": START + 3 * 3600}
            records.append(orjson.dumps(closing))
        assert len(max(self.records["p0"], key=len)) < RAW_CHECK


RAW_CHECK = 4096  # every raw is far from decode.RAW_LIMIT: none truncated


Window = tuple[str, str, float, float]  # name, agg_func, window_start, window_end


Level = tuple[float, float]  # windows of this length, starting every step


def expected(
    events: list[Ev], levels: tuple[Level, ...] = ((60.0, 60.0),)
) -> dict[Window, tuple[float, int]]:
    """The independent computation: value and count per window of each level, up to
    the second hour's end (the service emits the windows that ended by then)."""
    values: dict[Window, list[float]] = defaultdict(list)
    for name, func, value, ts in events:
        for length, step in levels:
            last = math.floor(ts / step) * step
            for k in range(round(length / step)):
                start = last - k * step
                if start + length <= START + 2 * 3600:
                    values[(name, func, start, start + length)].append(value)
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


class Running:
    def __init__(self, config: Config, feed: Feed, tmp: Path) -> None:
        self.clock = ManualClock(START + 5 * 3600)
        metrics = MetricsCollector(self.clock)
        self.bus = MemoryBus(feed.records, batch_size=25, clock=self.clock)
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
        self.total = {p: len(r) for p, r in feed.records.items()}


Setup = tuple[Running, Config, Feed]


@pytest.fixture(params=["minutes", "rollups", "hopping"])
async def running(
    request: pytest.FixtureRequest, postgres_dsn: str, unique_name: str, tmp_path: Path
) -> AsyncIterator[Setup]:
    rollups = (3600.0,) if request.param == "rollups" else ()  # hourly rows too
    hop = 20.0 if request.param == "hopping" else None  # minutes every 20 s
    config = Config(
        bus=SMALL,
        aggregation=AggregationConfig(interval_s=60.0, rollups_s=rollups, hop_s=hop),
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
    feed = Feed()
    run = Running(config, feed, tmp_path)
    task = asyncio.create_task(run.service.run())
    archive = tmp_path / "archive"
    try:
        async with asyncio.timeout(60):
            while any(run.bus.positions.get(p) != n for p, n in run.total.items()) or (
                (sum(archive_rows(archive).values()) if archive.exists() else 0)
                < len(feed.first) + 2
            ):
                assert not task.done(), task.exception()
                run.clock.advance(1.0)
                await asyncio.sleep(0.02)
        yield run, config, feed
    finally:
        run.service.request_stop()
        await asyncio.wait_for(task, 30)


def raised(config: Config, **aggregation: Any) -> Config:
    """The operator's fix: the limits raised (and, for a test, other settings)."""
    return replace(config, bus=RAISED, aggregation=replace(config.aggregation, **aggregation))


async def windows(dsn: str, table: str) -> dict[Window, tuple[float, int, int]]:
    """The windows that ended by the second hour's end (later ones may still be open)."""
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch(
            "SELECT name, agg_func, extract(epoch FROM window_start)::float8 AS ws, "
            "extract(epoch FROM window_end)::float8 AS we, value, count, revision "
            f"FROM {table} WHERE name <> 'zz' AND window_end <= to_timestamp($1)",
            START + 2 * 3600,
        )
    finally:
        await conn.close()
    return {
        (r["name"], r["agg_func"], r["ws"], r["we"]): (r["value"], r["count"], r["revision"])
        for r in rows
    }


async def dead_letters(dsn: str, table: str) -> list[dict[str, Any]]:
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch(
            f"SELECT id, reason, detail, replayed_at, replay_outcome FROM {table} ORDER BY id"
        )
    finally:
        await conn.close()
    return [dict(r) for r in rows]


async def ledger(dsn: str) -> dict[str, int]:
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch(
            "SELECT counter, sum(n)::int8 AS n FROM vabus_ledger WHERE partition = 'dlq' "
            "GROUP BY counter"
        )
    finally:
        await conn.close()
    return {r["counter"]: r["n"] for r in rows}


def lengths(config: Config) -> tuple[Level, ...]:
    agg = config.aggregation
    return ((agg.interval_s, agg.pane_s), *((r, r) for r in agg.rollups_s))


def assert_exact(got: dict[Window, tuple[float, int, int]], feed: Feed, config: Config) -> None:
    want = expected(feed.first + feed.redriven, lengths(config))
    assert set(got) == set(want)
    touched = set(expected(feed.redriven, lengths(config)))
    first = expected(feed.first, lengths(config))
    assert touched - set(first) and touched & set(first)  # both kinds are tested
    for key, (value, count) in want.items():
        assert got[key][1] == count, key
        assert math.isclose(got[key][0], value, rel_tol=1e-12, abs_tol=1e-9), (key, got[key])
        # a window the redriven events changed: the next revision; one they alone
        # make is new (revision 1)
        assert got[key][2] == (2 if key in touched and key in first else 1), key


def delta(after: dict[str, int], before: dict[str, int]) -> dict[str, int]:
    return {k: n - before.get(k, 0) for k, n in after.items() if n != before.get(k, 0)}


async def test_raised_limits_redrive_too_large_exactly_once(
    running: Setup, postgres_dsn: str
) -> None:
    run, config, feed = running
    agg_table, dlq_table = config.postgres.table, config.postgres.dead_letter_table
    before = await windows(postgres_dsn, agg_table)
    first = expected(feed.first, lengths(config))
    assert set(before) == set(first)  # the dead-lettered events are in no window yet
    assert all(before[k][1:] == (n, 1) for k, (_, n) in first.items())
    letters = await dead_letters(postgres_dsn, dlq_table)
    assert len(letters) == feed.big + feed.past and feed.big > 5 and feed.past > 5
    assert {d["reason"] for d in letters} == {"too_large"}
    ledger_before = await ledger(postgres_dsn)
    summary = await dlq_replay(
        raised(config), "too_large", None, clock=run.clock, err=io.StringIO()
    )
    assert (summary.selected, summary.accepted, summary.events) == (
        len(letters),
        len(letters),
        len(feed.redriven),
    )
    assert not summary.failed and summary.deferred == 0 and summary.skipped == 0
    assert summary.changed + summary.new > 0
    assert_exact(await windows(postgres_dsn, agg_table), feed, config)
    marked = await dead_letters(postgres_dsn, dlq_table)
    assert all(d["replayed_at"] is not None and d["replay_outcome"] == "accepted" for d in marked)
    n = len(feed.redriven)
    assert delta(await ledger(postgres_dsn), ledger_before) == {
        "redriven": n,
        "redriven:accepted": n,
    }
    after = await windows(postgres_dsn, agg_table)
    again = await dlq_replay(raised(config), "too_large", None, clock=run.clock, err=io.StringIO())
    assert (again.selected, again.skipped, again.events, again.windows) == (0, len(letters), 0, 0)
    assert not again.written
    assert await windows(postgres_dsn, agg_table) == after
    assert delta(await ledger(postgres_dsn), ledger_before) == {
        "redriven": n,
        "redriven:accepted": n,
    }


async def test_unchanged_limits_fail_again_and_are_not_retried(
    running: Setup, postgres_dsn: str
) -> None:
    run, config, feed = running
    before = await windows(postgres_dsn, config.postgres.table)
    summary = await dlq_replay(config, "too_large", None, clock=run.clock, err=io.StringIO())
    assert summary.events == 0 and summary.accepted == 0
    # per element: a whole message counts once, as the service counted it
    assert summary.failed == {"too_large": feed.big + feed.past}
    assert not summary.written
    assert await windows(postgres_dsn, config.postgres.table) == before
    letters = await dead_letters(postgres_dsn, config.postgres.dead_letter_table)
    assert {d["replay_outcome"] for d in letters} == {"too_large"}
    again = await dlq_replay(raised(config), "too_large", None, clock=run.clock, err=io.StringIO())
    assert again.selected == 0 and again.skipped == len(letters)  # at most once


async def test_dead_letters_of_windows_still_correctable_are_deferred(
    running: Setup, postgres_dsn: str
) -> None:
    run, config, feed = running
    before = await windows(postgres_dsn, config.postgres.table)
    open_ = raised(config, allowed_lateness_s=3 * 3600.0)
    summary = await dlq_replay(open_, "too_large", None, clock=run.clock, err=io.StringIO())
    assert summary.deferred == feed.big + feed.past and summary.events == 0
    assert any(line.startswith("deferred (window still open): ") for line in summary.lines())
    assert await windows(postgres_dsn, config.postgres.table) == before
    letters = await dead_letters(postgres_dsn, config.postgres.dead_letter_table)
    assert all(d["replayed_at"] is None for d in letters)
    later = await dlq_replay(raised(config), "too_large", None, clock=run.clock, err=io.StringIO())
    assert later.events == len(feed.redriven)
    assert_exact(await windows(postgres_dsn, config.postgres.table), feed, config)


class Crash(Exception):
    pass


@pytest.mark.parametrize("at", ["marked", "archived"])
async def test_a_run_killed_after_a_step_is_finished_by_the_next(
    running: Setup, postgres_dsn: str, at: str
) -> None:
    run, config, feed = running
    ledger_before = await ledger(postgres_dsn)

    def crash(step: str) -> None:
        if step == at:
            raise Crash(step)

    with pytest.raises(Crash):
        await dlq_replay(raised(config), "too_large", None, clock=run.clock, step=crash)
    letters = await dead_letters(postgres_dsn, config.postgres.dead_letter_table)
    assert all(d["replayed_at"] is not None for d in letters)  # marked before the crash
    rerun: DlqSummary = await dlq_replay(
        raised(config), "too_large", None, clock=run.clock, err=io.StringIO()
    )
    assert rerun.resumed == 1 and rerun.selected == 0 and rerun.skipped == len(letters)
    assert_exact(await windows(postgres_dsn, config.postgres.table), feed, config)
    n = len(feed.redriven)
    assert delta(await ledger(postgres_dsn), ledger_before) == {
        "redriven": n,
        "redriven:accepted": n,
    }
    again = await dlq_replay(raised(config), "too_large", None, clock=run.clock, err=io.StringIO())
    assert again.resumed == 0 and not again.written


async def test_the_command_line_validates_and_prints_its_summary(
    running: Setup,
    postgres_dsn: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
) -> None:
    _, config, feed = running
    env = {
        "STORAGE_TYPE": "postgres",
        "POSTGRES_DSN": postgres_dsn,
        "POSTGRES_TABLE": config.postgres.table,
        "ARCHIVE_URL": config.archive.url,
        "AGGREGATION_INTERVAL": "60",
        "VABUS_MAX_EVENTS_PER_MESSAGE": "100",
    }
    if config.aggregation.rollups_s:
        env["AGGREGATION_ROLLUPS"] = "3600"
    if config.aggregation.hop_s:
        env["AGGREGATION_HOP"] = "20"
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.chdir(tmp_path)  # no .env
    monkeypatch.setattr("service.cli.setup_logging", lambda *a, **k: None)
    real_load = load_config

    def own_table(*args: Any, **kwargs: Any) -> Config:
        # the dead-letter table is `dead_letters` (contract §6): this test's own instead
        got = real_load(*args, **kwargs)
        return replace(got, postgres=replace(got.postgres, dead_letter_table=dlq_table))

    dlq_table = config.postgres.dead_letter_table
    monkeypatch.setattr("service.cli.load_config", own_table)
    for bad in (["--reason", "too_big"], ["--reason", "too_large", "--since", "09:00"]):
        assert await asyncio.to_thread(main, ["dlq", "replay", *bad]) == 2
        assert "dlq replay: " in capsys.readouterr().err
    monkeypatch.delenv("ARCHIVE_URL")
    assert await asyncio.to_thread(main, ["dlq", "replay", "--reason", "too_large"]) == 2
    assert "ARCHIVE_URL is not set: dlq replay adds" in capsys.readouterr().err
    monkeypatch.setenv("ARCHIVE_URL", config.archive.url)
    argv = ["dlq", "replay", "--reason", "too_large", "--since", str(int(START))]
    assert await asyncio.to_thread(main, argv) == 0
    lines = capsys.readouterr().out.splitlines()
    letters = feed.big + feed.past
    assert lines[0] == (
        f"dlq replay: selected {letters}, accepted {letters} ({len(feed.redriven)} event(s)), "
        "already replayed (skipped) 0"
    )
    assert lines[1].startswith("windows recomputed ") and lines[2].startswith("written to ")
    assert await asyncio.to_thread(main, argv) == 0
    assert "written: nothing" in capsys.readouterr().out


async def test_a_dead_letter_table_that_does_not_exist_is_named(
    postgres_dsn: str, unique_name: str, tmp_path: Path
) -> None:
    config = Config(
        outputs=("postgres",),
        postgres=PostgresConfig(
            dsn=Secret(postgres_dsn), table=f"{unique_name}_agg", dead_letter_table=unique_name
        ),
        archive=ArchiveConfig(kind="file", url=f"file://{tmp_path}", path=str(tmp_path)),
    )
    with pytest.raises(PermanentError, match=f"table {unique_name} does not exist"):
        await dlq_replay(config, "too_large", None, err=io.StringIO())


async def test_a_run_whose_recomputation_skipped_a_window_is_finished_by_the_next(
    running: Setup, postgres_dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The service may still write a window the replay found open (its own rule, which
    the deferral mirrors): the run stays unfinished, and the next one finishes it."""
    run, config, feed = running
    if config.aggregation.rollups_s or config.aggregation.hop_s:
        pytest.skip("the minutes case's")
    from service.replay.command import replay as real

    async def skips_everything(cfg: Config, span: Any, **kw: Any) -> Any:
        late = replace(cfg, aggregation=replace(cfg.aggregation, allowed_lateness_s=1e6))
        return await real(late, span, **kw)

    monkeypatch.setattr(command, "replay", skips_everything)
    first = await dlq_replay(raised(config), "too_large", None, clock=run.clock, err=io.StringIO())
    assert first.pending == 1 and not first.written
    assert any(line.startswith("runs left to finish") for line in first.lines())
    monkeypatch.setattr(command, "replay", real)
    rerun = await dlq_replay(raised(config), "too_large", None, clock=run.clock, err=io.StringIO())
    assert rerun.resumed == 1 and rerun.pending == 0 and rerun.selected == 0
    assert_exact(await windows(postgres_dsn, config.postgres.table), feed, config)
    again = await dlq_replay(raised(config), "too_large", None, clock=run.clock, err=io.StringIO())
    assert again.resumed == 0 and not again.written
