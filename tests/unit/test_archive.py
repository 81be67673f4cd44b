"""The archive (ARCHIVE_URL): configuration, file layout, the exactly-once writer step,
and the service on fakes keeping exactly its accepted events."""

from __future__ import annotations

import asyncio
from collections import Counter
from pathlib import Path
from typing import Any

import orjson
import pytest

from service.aggregation.aggregator import EventAggregator
from service.aggregation.batch_run import BatchRun
from service.app import Service
from service.archive.layout import data_name, intent_name, token
from service.archive.rows import ArchiveSlice, Rows
from service.archive.stores import DirectoryStore
from service.archive.writer import ArchiveWriter
from service.bus.base import SourceBatch
from service.checkpoints.base import PartitionCheckpoint
from service.checkpoints.file import FileCheckpointStore
from service.config import AggregationConfig, BusConfig, Config, load_config
from service.core.clock import ManualClock
from service.core.errors import ConfigError, TransientError
from service.metrics.collector import MetricsCollector
from service.pipeline.flow import Outputs
from tests.archived import Row, archive_files, archive_rows
from tests.fakes.bus import MemoryBus
from tests.fakes.sinks import MemorySink

START = 1_699_999_200.0  # the start of an hour: 2023-11-14T22:00Z
HOUR = int(START // 3600)


def us(ts: float) -> int:
    return round(ts * 1_000_000)


# -- configuration ------------------------------------------------------------------------
def test_archive_url_takes_a_directory_or_a_bucket_with_its_endpoint() -> None:
    cfg = load_config({"ARCHIVE_URL": "file:///var/archive/"}, dotenv=None).archive
    assert (cfg.kind, cfg.path, cfg.enabled) == ("file", "/var/archive", True)
    env = {"ARCHIVE_URL": "s3://raw-events/vabus/a", "AWS_ENDPOINT_URL": "http://127.0.0.1:9"}
    cfg = load_config(env, dotenv=None).archive
    assert (cfg.kind, cfg.bucket, cfg.path, cfg.endpoint_url) == (
        "s3",
        "raw-events",
        "vabus/a",
        "http://127.0.0.1:9",
    )
    assert not load_config({}, dotenv=None).archive.enabled


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("ARCHIVE_URL", "ftp://host/dir"),
        ("ARCHIVE_URL", "file://relative/dir"),
        ("ARCHIVE_URL", "s3://Bad_Bucket/x"),
        ("ARCHIVE_URL", "s3://bucket/x?versioned=1"),
        ("AWS_ENDPOINT_URL", "minio:9000"),
    ],
)
def test_a_bad_archive_variable_is_reported_by_name_before_connecting(
    name: str, value: str
) -> None:
    env = {"ARCHIVE_URL": "s3://bucket/p", name: value}
    with pytest.raises(ConfigError) as info:
        load_config(env, dotenv=None)
    assert len(info.value.problems) == 1
    assert info.value.problems[0].startswith(f"{name}='{value}': expected ")


# -- layout -------------------------------------------------------------------------------
def test_file_names_derive_from_partition_and_positions_one_to_one() -> None:
    name = data_name(HOUR, "vabus-events:3", "120", "4400")
    assert name == "hour=2023-11-14T22/vabus-events_3@120-4400.parquet"
    assert intent_name("vabus-events:3") == "_intents/vabus-events_3.json"
    # no two partitions or positions share a token
    texts = ["a:b", "a_b", "origin", None, ".x", "x/y", "cursor=42", "é"]
    tokens = [token(t) for t in texts]
    assert len(set(tokens)) == len(tokens)
    assert all("/" not in t and not t.startswith(".") for t in tokens)


# -- the writer step ----------------------------------------------------------------------
def rows_of(*events: tuple[str, float, float]) -> Rows:
    rows = Rows()
    for name, value, ts in events:
        rows.add(name, "sum", value, ts, None)
    return rows


def writer(root: Path) -> ArchiveWriter:
    return ArchiveWriter(DirectoryStore(str(root)), MetricsCollector(ManualClock(START)))


def expected(*events: tuple[str, float, float]) -> Counter[Row]:
    return Counter((n, "sum", float(v), us(ts), None) for n, v, ts in events)


async def test_a_slice_is_one_file_per_hour_of_event_time(tmp_path: Path) -> None:
    events = [("a", 1.0, START + 10), ("b", 2.0, START - 10), ("a", 3.0, START + 3600.5)]
    await writer(tmp_path).write([ArchiveSlice("t:0", "0", "3", rows_of(*events), True)])
    hours = sorted(p.parent.name for p in archive_files(tmp_path))
    assert hours == ["hour=2023-11-14T21", "hour=2023-11-14T22", "hour=2023-11-14T23"]
    assert archive_rows(tmp_path) == expected(*events)


async def test_a_replay_from_the_same_position_supersedes_the_crashed_attempt_in_every_hour(
    tmp_path: Path,
) -> None:
    # the crashed attempt read positions 10..20 (two hours) and never checkpointed 20
    crashed = [("a", 1.0, START + 5), ("b", 2.0, START + 3605)]
    await writer(tmp_path).write([ArchiveSlice("t:0", "10", "20", rows_of(*crashed), True)])
    # the restart (a new writer: nothing in memory) restores 10 and cuts at 15 first:
    # its first slice holds only the first hour's event
    again = writer(tmp_path)
    await again.write([ArchiveSlice("t:0", "10", "15", rows_of(crashed[0]), True)])
    assert archive_rows(tmp_path) == expected(crashed[0])  # not the second hour's copy
    await again.write([ArchiveSlice("t:0", "15", "20", rows_of(crashed[1]), False)])
    assert archive_rows(tmp_path) == expected(*crashed)


async def test_a_replay_with_nothing_accepted_still_removes_the_crashed_attempt(
    tmp_path: Path,
) -> None:
    crashed = [("a", 1.0, START + 5)]
    await writer(tmp_path).write([ArchiveSlice("t:0", "10", "20", rows_of(*crashed), True)])
    await writer(tmp_path).write([ArchiveSlice("t:0", "10", "11", Rows(), True)])
    assert archive_rows(tmp_path) == Counter()


async def test_a_restore_at_a_later_position_keeps_what_was_checkpointed(tmp_path: Path) -> None:
    first = [("a", 1.0, START + 5)]
    await writer(tmp_path).write([ArchiveSlice("t:0", "10", "20", rows_of(*first), True)])
    # the checkpoint at 20 was saved: a restart restores 20, not 10
    await writer(tmp_path).write([ArchiveSlice("t:0", "20", "25", Rows(), True)])
    second = [("b", 2.0, START + 6)]
    await writer(tmp_path).write([ArchiveSlice("t:0", "20", "30", rows_of(*second), True)])
    assert archive_rows(tmp_path) == expected(*first, *second)


async def test_a_failed_write_is_transient_and_counted(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_bytes(b"")  # the archive's root cannot be a directory
    w = writer(blocker)
    with pytest.raises(TransientError, match="archive"):
        await w.write([ArchiveSlice("t:0", None, "1", rows_of(("a", 1.0, START)), True)])


# -- the service on fakes -------------------------------------------------------------------
def ev(name: str, value: float, ts: float, **extra: Any) -> bytes:
    return orjson.dumps({"name": name, "value": value, "timestamp": ts, **extra})


def ev_of(name: str, value: float, ts: float) -> dict[str, Any]:
    return {"name": name, "value": value, "timestamp": ts}


def build(
    records: dict[str, list[Any]],
    state: Path,
    archive: Path,
    agg: AggregationConfig,
    *,
    batch_size: int = 3,
) -> tuple[Service, MemoryBus, MemorySink]:
    clock = ManualClock(START + 7200)
    metrics = MetricsCollector(clock)
    bus = MemoryBus(records, batch_size=batch_size, clock=clock)
    sink = MemorySink()
    service = Service(
        Config(aggregation=agg),
        bus=bus,
        sinks=[sink],
        store=FileCheckpointStore(str(state), "test"),
        metrics=metrics,
        clock=clock,
        serve_http=False,
        archive=ArchiveWriter(DirectoryStore(str(archive)), metrics),
    )
    return service, bus, sink


async def run_until_drained(service: Service, bus: MemoryBus, total: dict[str, int]) -> None:
    task = asyncio.create_task(service.run())
    try:
        async with asyncio.timeout(10):
            while any(bus.positions.get(p) != n for p, n in total.items()):
                assert not task.done(), task.exception()
                await asyncio.sleep(0.01)
    finally:
        service.request_stop()
        await asyncio.wait_for(task, 10)


async def test_the_archive_holds_the_accepted_events_and_no_dead_letter(tmp_path: Path) -> None:
    t = START + 60
    records = {
        "p0": [
            ev("a", 1, t + 1, agg_func="avg"),
            ev("a", 2, t + 70),  # closes the first window
            ev("a", 3, t + 2),  # late: a dead letter
            b"not json",
            orjson.dumps([{"name": "b", "value": 4, "timestamp": t + 71}, {"name": "b"}]),
            ev("c", 5.5, t + 75, agg_func="p99"),
        ]
    }
    agg = AggregationConfig(interval_s=60.0)
    service, bus, sink = build(records, tmp_path / "state", tmp_path / "archive", agg)
    await run_until_drained(service, bus, {"p0": 6})
    assert archive_rows(tmp_path / "archive") == Counter(
        {
            ("a", "avg", 1.0, us(t + 1), None): 1,
            ("a", "sum", 2.0, us(t + 70), None): 1,
            ("b", "sum", 4.0, us(t + 71), None): 1,
            ("c", "p99", 5.5, us(t + 75), None): 1,
        }
    )
    assert {d.reason for d in sink.dead_letters} == {"late", "invalid_json", "missing_value"}
    snap = service.metrics.snapshot()
    assert snap["archive_events_written"] == 4


async def test_grouped_tags_are_archived_as_json_text_and_corrections_count(
    tmp_path: Path,
) -> None:
    t = START + 60
    records = {
        "p0": [
            ev("a", 1, t + 1, tags={"host": "h1", "other": "x"}),
            ev("a", 2, t + 70, tags={}),  # closes the first window
            ev("a", 3, t + 2, tags={"host": "h1"}),  # late, within the allowed lateness
        ]
    }
    agg = AggregationConfig(interval_s=60.0, group_by=("host",), allowed_lateness_s=600.0)
    service, bus, sink = build(records, tmp_path / "state", tmp_path / "archive", agg)
    await run_until_drained(service, bus, {"p0": 3})
    assert archive_rows(tmp_path / "archive") == Counter(
        {
            ("a", "sum", 1.0, us(t + 1), '{"host":"h1"}'): 1,
            ("a", "sum", 2.0, us(t + 70), "{}"): 1,
            ("a", "sum", 3.0, us(t + 2), '{"host":"h1"}'): 1,
        }
    )
    assert not sink.dead_letters
    assert max(a.revision for a in sink.aggregates.values()) == 2  # the correction


async def test_restarts_keep_every_accepted_event_once(tmp_path: Path) -> None:
    """A graceful stop after each part of the input, then a restart on the same state:
    the archive holds each event once (a crash is the e2e kill -9 test)."""
    events = [ev(f"n{i % 3}", i, START + 60 + i * 7) for i in range(40)]
    state, archive = tmp_path / "state", tmp_path / "archive"
    agg = AggregationConfig(interval_s=60.0)
    for upto, size in ((13, 2), (29, 5), (40, 3)):
        service, bus, _ = build({"p0": events[:upto]}, state, archive, agg, batch_size=size)
        await run_until_drained(service, bus, {"p0": upto})
    want = Counter((f"n{i % 3}", "sum", float(i), us(START + 60 + i * 7), None) for i in range(40))
    assert archive_rows(archive) == want


class FlakyStore(DirectoryStore):
    """A directory whose writes fail while ``failing`` is set (a full disk, an outage)."""

    failing = True

    async def put(self, name: str, data: bytes) -> None:
        if self.failing:
            raise TransientError("archive write: disk full")
        await super().put(name, data)


async def test_a_failing_archive_holds_the_checkpoint_back_until_it_recovers(
    tmp_path: Path,
) -> None:
    records = {"p0": [ev("a", 1, START + 61), ev("a", 2, START + 62)]}
    service, bus, _ = build(records, tmp_path / "state", tmp_path / "archive", AggregationConfig())
    store = FlakyStore(str(tmp_path / "archive"))
    assert service.archive is not None
    service.archive._store = store
    clock = service.clock
    assert isinstance(clock, ManualClock)
    task = asyncio.create_task(service.run())
    try:
        async with asyncio.timeout(10):
            while "archive" not in service.sender.degraded:
                clock.advance(1.0)  # ticks: a checkpoint is due
                await asyncio.sleep(0.01)
            assert all(c.get("p0") in (None, "0") for c in bus.commits)  # nothing past them
            with pytest.raises(TransientError, match="writes failing"):
                await service.sender.readiness_check(service.archive)()
            store.failing = False
            while {"p0": "2"} not in bus.commits or "archive" in service.sender.degraded:
                clock.advance(1.0)  # the retry's backoff
                await asyncio.sleep(0.01)
    finally:
        service.request_stop()
        await asyncio.wait_for(task, 10)
    assert sum(archive_rows(tmp_path / "archive").values()) == 2
    assert service.metrics.snapshot()["sink_retries"].get("archive", 0) >= 1


async def test_every_kind_of_refusal_leaves_exactly_the_counted_events_in_the_archive(
    tmp_path: Path,
) -> None:
    """Per window, the archive holds as many events as the aggregate counts: dead
    letters of every kind (in single and array messages, on the fast and the reference
    decode paths) are left out, corrections are kept, equal events are not merged."""
    t = START + 60
    big = {"name": "big", "value": 1e308, "timestamp": t + 5}
    messages = [
        ev("a", 1, t + 1),
        ev("bad\x01", 1, t + 1),  # fast path: refused when it would open a key
        orjson.dumps([{"name": "a", "value": 2, "timestamp": t + 2}, {"name": "a\x02"}]),
        orjson.dumps({"name": "a", "value": 4, "timestamp": "2023-11-14T22:01:05Z"}),
        orjson.dumps(big),
        orjson.dumps([big, big, {**big, "value": 1.0}]),  # overflow twice, then fine
        orjson.dumps([{"name": "e", "value": i, "timestamp": t + 3} for i in range(5)]),
        orjson.dumps([{"name": "pad" * 200, "value": 1, "timestamp": t + 1}]),  # too large
        ev("a", 5, t + 70),  # closes [t, t + 60)
        orjson.dumps(
            [
                {"name": "a", "value": 6, "timestamp": t + 7},
                {"name": "a", "value": 7, "timestamp": t + 71},
            ]
        ),
        ev("a", 8, t + 185),
        orjson.dumps(
            [
                {"name": "a", "value": 9, "timestamp": t + 8},
                {"name": "a", "value": 10, "timestamp": t + 186},
            ]
        ),
        ev("a", 11, t + 186),  # equal events: both kept
        ev("a", 11, t + 186),
        ev("z", 0, t + 400),  # closes everything before it
        # 8 keys at most: z and c0..c6 open, c7 and c8 refused
        *(orjson.dumps([ev_of(f"c{i}", i, t + 401) for i in range(j, j + 3)]) for j in (0, 3, 6)),
    ]
    clock = ManualClock(START + 7200)
    metrics = MetricsCollector(clock)
    bus = MemoryBus({"p0": messages}, batch_size=4, clock=clock)
    sink = MemorySink()
    agg = AggregationConfig(interval_s=60.0, max_open_windows=8)
    service = Service(
        Config(aggregation=agg, bus=BusConfig(max_message_bytes=500, max_events_per_message=3)),
        bus=bus,
        sinks=[sink],
        store=FileCheckpointStore(str(tmp_path / "state"), "test"),
        metrics=metrics,
        clock=clock,
        serve_http=False,
        archive=ArchiveWriter(DirectoryStore(str(tmp_path / "archive")), metrics),
    )
    await run_until_drained(service, bus, {"p0": len(messages)})
    reasons = Counter(d.reason for d in sink.dead_letters)
    assert reasons == {
        "invalid_name": 2,
        "overflow": 2,
        "cardinality_limit": 2,
        "too_large": 2,
        "late": 2,
    }, reasons
    archived: Counter[tuple[str, str, float]] = Counter()
    for (name, func, _, micros, _), n in archive_rows(tmp_path / "archive").items():
        archived[(name, func, (micros // 60_000_000) * 60.0)] += n
    counted = {(a.name, a.agg_func, a.window_start): a.count for a in sink.aggregates.values()}
    still_open = {k[0]: archived.pop(k) for k in list(archived) if k[2] == t + 360}
    assert still_open == {"z": 1, **{f"c{i}": 1 for i in range(7)}}
    assert dict(archived) == counted
    assert counted[("a", "sum", t)] == 3  # 1, 2 and 4


def batch_of(partition: str, records: list[bytes], end: int) -> SourceBatch:
    return SourceBatch(partition, records, f"memory {partition}", str(end), START + 7200)


def test_slices_run_from_the_restored_position_to_each_checkpoint_and_end_on_release() -> None:
    clock = ManualClock(START + 7200)
    agg = EventAggregator(AggregationConfig(), MetricsCollector(clock), clock, archive=True)
    agg.restore([PartitionCheckpoint("p0", "5", None), PartitionCheckpoint("p1", None, None)])
    agg.process(batch_of("p0", [ev("a", 1, START + 61), ev("a", 2, START + 62)], 7))
    first = agg.archived(agg.snapshot()) or []
    assert [(s.partition, s.start, s.end, len(s.rows), s.fresh) for s in first] == [
        ("p0", "5", "7", 2, True),
        ("p1", None, None, 0, True),
    ]
    agg.process(batch_of("p0", [ev("a", 3, START + 63)], 8))
    last = agg.archived(agg.release(["p0"]), released=True) or []
    assert [(s.partition, s.start, s.end, len(s.rows), s.fresh) for s in last] == [
        ("p0", "7", "8", 1, False)
    ]
    assert agg.archived(agg.snapshot()) == [
        ArchiveSlice("p1", None, None, Rows(), False)
    ]  # p0 is gone


def test_a_discarded_partition_drops_its_rows_and_starts_again_where_it_is_restored() -> None:
    clock = ManualClock(START + 7200)
    agg = EventAggregator(AggregationConfig(), MetricsCollector(clock), clock, archive=True)
    agg.restore([PartitionCheckpoint("p0", "5", None)])
    agg.process(batch_of("p0", [ev("a", 1, START + 61)], 6))
    agg.discard(["p0"])  # a batch raised: read again from the checkpoint
    agg.restore([PartitionCheckpoint("p0", "5", None)])
    agg.process(batch_of("p0", [ev("a", 1, START + 61), ev("b", 2, START + 62)], 7))
    (s,) = agg.archived(agg.snapshot()) or []
    assert (s.start, s.end, s.rows.names, s.fresh) == ("5", "7", ["a", "b"], True)


def test_without_an_archive_the_aggregator_runs_the_plain_batch_run() -> None:
    clock = ManualClock(START + 7200)
    agg = EventAggregator(AggregationConfig(), MetricsCollector(clock), clock)
    agg.restore([PartitionCheckpoint("p0", None, None)])
    run = agg._start_run(agg._parts["p0"], batch_of("p0", [], 0), Outputs())
    assert type(run) is BatchRun
    assert agg.archived(agg.snapshot()) is None


async def test_check_reports_the_archive_on_a_line_of_its_own(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from service.commands import check_all
    from tests.e2e.workload import free_port

    closed = f"postgresql://u@127.0.0.1:{free_port()}/db"  # the output fails, quickly
    for root, word in ((tmp_path / "archive", "ok   "), (tmp_path / "file", "FAIL ")):
        env = {"STORAGE_TYPE": "postgres", "POSTGRES_DSN": closed, "ARCHIVE_URL": f"file://{root}"}
        (tmp_path / "file").write_bytes(b"")  # a file where the directory should be
        assert await check_all(load_config(env, dotenv=None)) == 1
        lines = capsys.readouterr().out.splitlines()
        assert next(ln for ln in lines if " archive " in ln).startswith(f"{word} archive file://")
