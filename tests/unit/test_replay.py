"""``vabus-aggregator replay``: the range, the comparison and the revision, reading the
archive back (superseded attempts left out) and recomputing exactly what the service
computed from the same events."""

from __future__ import annotations

import io
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import orjson
import pytest

from service.aggregation.aggregator import EventAggregator
from service.archive.layout import data_name, intent_name
from service.archive.parquet import by_hour
from service.archive.rows import Rows
from service.archive.stores import DirectoryStore
from service.archive.writer import ArchiveWriter
from service.bus.base import SourceBatch
from service.checkpoints.base import PartitionCheckpoint
from service.cli import main
from service.config import AggregationConfig
from service.core.clock import ManualClock
from service.core.errors import ConfigError
from service.core.events import Aggregate
from service.metrics.collector import MetricsCollector
from service.replay.archived import ArchiveAmbiguous, list_files
from service.replay.command import Summary, recomputed
from service.replay.compare import Held, decide, same_value
from service.replay.progress import Progress
from service.replay.span import ReplaySpan, parse_span

START = 1_699_999_200.0  # 2023-11-14T22:00Z, the start of an hour
HOUR = int(START // 3600)


# -- the range ----------------------------------------------------------------------------
def test_instants_are_iso_8601_with_an_offset_or_unix_seconds() -> None:
    span = parse_span("2023-11-14T22:00:00Z", "1700006400", "cpu.*")
    assert (span.start, span.end) == (START, START + 7200)
    assert parse_span("2023-11-14T23:00:00+01:00", "1699999260.5").start == START
    assert span.wants("cpu.user") and not span.wants("mem.cpu")
    assert parse_span("0", "1").wants("anything")


@pytest.mark.parametrize(
    ("since", "until", "names", "says"),
    [
        ("2023-11-14T22:00:00", "1700006400", None, "the time has no offset"),
        ("yesterday", "1700006400", None, "--from='yesterday': expected ISO-8601 with an offset"),
        ("1700006400", "1700006400", None, "is not before --to"),
        ("1700006400", "1e400", None, "--to='1e400': expected"),
        ("-5", "10", None, "--from='-5': out of range"),
        ("0", "10", " ", "--names is empty"),
    ],
)  # fmt: skip
def test_a_bad_range_is_refused_naming_the_option(
    since: str, until: str, names: str | None, says: str
) -> None:
    with pytest.raises(ConfigError) as info:
        parse_span(since, until, names)
    assert says in str(info.value)


def test_both_bad_instants_are_reported_at_once() -> None:
    with pytest.raises(ConfigError) as info:
        parse_span("soon", "later")
    assert [p.split("=")[0] for p in info.value.problems] == ["--from", "--to"]


def test_the_command_exits_2_on_a_bad_range_or_without_an_archive(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    for var in ("ARCHIVE_URL", "STORAGE_TYPE", "POSTGRES_DSN", "ROUTES_FILE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.chdir(Path(__file__).parent)  # no .env here
    # the root logger stays pytest's
    monkeypatch.setattr("service.cli.setup_logging", lambda *a, **k: None)
    assert main(["replay", "--from", "10:00", "--to", "1700006400"]) == 2
    assert "--from='10:00'" in capsys.readouterr().err
    assert main(["replay", "--from", "0", "--to", "1700006400"]) == 2
    assert "ARCHIVE_URL is not set" in capsys.readouterr().err


# -- comparison and revision --------------------------------------------------------------
def agg(func: str, value: float, count: int, revision: int = 1) -> Aggregate:
    return Aggregate("a", func, value, count, START, START + 60, START + 61, None, revision)


def test_order_dependent_sums_compare_within_a_tiny_tolerance_the_rest_exactly() -> None:
    assert same_value("sum", 0.1 + 0.2 + 0.3, 0.3 + 0.2 + 0.1)  # differ in the last bit
    assert same_value("stddev", 1.0, 1.0 + 1e-12)
    assert not same_value("sum", 1.0, 1.0 + 1e-6)
    assert not same_value("max", 1.0, 1.0 + 2.3e-16)
    assert not same_value("p99", 2.0, 2.0000000001)


def test_a_differing_window_gets_the_next_revision_an_equal_one_nothing() -> None:
    fresh = agg("sum", 10.0, 4)
    assert decide(fresh, Held(10.0, 4, 3)) is None
    assert decide(fresh, Held(10.0 + 1e-14, 4, 3)) is None
    changed = decide(fresh, Held(7.0, 3, 3))
    assert changed is not None and (changed.revision, changed.value, changed.count) == (4, 10.0, 4)
    assert decide(fresh, Held(10.0, 5, 1)) == agg("sum", 10.0, 4, 2)  # an event doubled
    assert decide(fresh, None) == fresh  # never written: revision 1


def test_the_revision_follows_from_what_the_output_holds_so_a_rerun_writes_nothing() -> None:
    held = Held(7.0, 3, 1)
    first = decide(agg("sum", 10.0, 4), held)
    assert first is not None
    written = Held(first.value, first.count, first.revision)  # what the upsert stored
    assert decide(agg("sum", 10.0, 4), written) is None
    # a crash before the write: the rerun computes the very same record again
    assert decide(agg("sum", 10.0, 4), held) == first


# -- reading the archive ------------------------------------------------------------------
def rows(*events: tuple[str, float, float]) -> Rows:
    r = Rows()
    for name, value, ts in events:
        r.add(name, "sum", value, ts, None)
    return r


def put(root: Path, partition: str, start: str | None, end: str, r: Rows) -> list[str]:
    names = []
    for hour, data in by_hour(r, partition).items():
        name = data_name(hour, partition, start, end)
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        names.append(name)
    return names


def intent(root: Path, partition: str, start: str, end: str, files: Sequence[str]) -> None:
    path = root / intent_name(partition)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(orjson.dumps({"start": start, "end": end, "files": list(files)}))


async def test_files_come_per_partition_in_offset_order_and_a_superseded_attempt_never_counts(
    tmp_path: Path,
) -> None:
    root = tmp_path / "archive"
    put(root, "t:0", "100", "9", rows(("a", 1.0, START + 1)))  # offsets sort as numbers
    put(root, "t:0", "9", "100", rows(("a", 2.0, START + 2)))
    put(root, "t:1", None, "5", rows(("a", 4.0, START + 3)))
    # a killed attempt from 5 to 8 over two hours, then the retry from 5 to 7: the
    # intent names the retry; the kill left 5-8's files behind (its deletion was cut)
    put(root, "t:1", "5", "8", rows(("a", 8.0, START + 4), ("a", 16.0, START + 3605)))
    retry = put(root, "t:1", "5", "7", rows(("a", 8.0, START + 4)))
    intent(root, "t:1", "5", "7", retry)
    parts = await list_files(DirectoryStore(str(root)), [HOUR, HOUR + 1])
    assert [(p.partition, p.files) for p in parts] == [
        ("t_0", ["hour=2023-11-14T22/t_0@9-100.parquet", "hour=2023-11-14T22/t_0@100-9.parquet"]),
        ("t_1", ["hour=2023-11-14T22/t_1@origin-5.parquet", "hour=2023-11-14T22/t_1@5-7.parquet"]),
    ]  # fmt: skip
    (root / intent_name("t:1")).unlink()
    with pytest.raises(ArchiveAmbiguous, match="t_1 has two attempts from position 5"):
        await list_files(DirectoryStore(str(root)), [HOUR, HOUR + 1])


async def test_hours_outside_the_range_are_not_read(tmp_path: Path) -> None:
    root = tmp_path / "archive"
    put(root, "p", "0", "2", rows(("a", 1.0, START + 10), ("a", 1.0, START + 3 * 3600)))
    parts = await list_files(DirectoryStore(str(root)), [HOUR])
    assert [p.files for p in parts] == [["hour=2023-11-14T22/p@0-2.parquet"]]


def test_progress_is_a_bar_on_a_terminal_and_a_line_per_hour_otherwise() -> None:
    files = ["hour=2023-11-14T22/p@0-1.parquet", "hour=2023-11-14T22/q@0-1.parquet"]
    plain = io.StringIO()
    progress = Progress(plain, tty=False)
    progress.expect([HOUR, HOUR + 1], files)
    for f in files:
        progress.done(f)
    progress.finish()
    assert plain.getvalue().splitlines() == [
        "replay: 2023-11-14T23 no files",
        "replay: 2023-11-14T22 read",
    ]
    bar = io.StringIO()
    progress = Progress(bar, tty=True)
    progress.expect([HOUR], files)
    for f in files:
        progress.done(f)
    progress.finish()
    assert bar.getvalue().endswith(f"\rreplay [{'#' * 30}] 2/2 files\n")


# -- recomputing: what the service computed from the same events --------------------------
def record(name: str, value: float, ts: float, **extra: Any) -> bytes:
    return orjson.dumps({"name": name, "value": value, "timestamp": ts, **extra})


async def service_and_replay(
    tmp_path: Path, cfg: AggregationConfig, feeds: dict[str, list[bytes]], span: ReplaySpan
) -> tuple[list[Aggregate], list[Aggregate]]:
    """Feed the real aggregator (archive on), archive what it accepted through the
    real writer, close every window of the span; then recompute the span from the
    archive. Both lists sorted by identity."""
    clock = ManualClock(START + 10 * 3600)
    metrics = MetricsCollector(clock)
    aggregator = EventAggregator(cfg, metrics, clock, archive=True)
    aggregator.restore([PartitionCheckpoint(p, None, None) for p in feeds])
    writer = ArchiveWriter(DirectoryStore(str(tmp_path / "archive")), metrics)
    emitted: list[Aggregate] = []
    cut = 7  # records per batch, each batch's slice checkpointed and archived
    for p, records in feeds.items():
        for i in range(0, len(records), cut):
            end = i + cut
            batch = SourceBatch(p, records[i:end], f"memory {p}", str(end), clock.monotonic())
            emitted += aggregator.process(batch).aggregates
            await writer.write(aggregator.archived(aggregator.snapshot([p])) or [])
    ahead = span.end + 4 * 3600  # every partition's event time far past the span
    for p in feeds:
        batch = SourceBatch(p, [record("zz.close", 0.0, ahead)], f"memory {p}", "end", 0.0)
        emitted += aggregator.process(batch).aggregates
    wanted = [
        a for a in emitted if span.start <= a.window_start < span.end and a.name != "zz.close"
    ]
    replayed = await recomputed(
        DirectoryStore(str(tmp_path / "archive")),
        cfg,
        span,
        clock.now(),
        Summary(),
        Progress(io.StringIO(), tty=False),
    )
    return sorted(wanted, key=ident), sorted(replayed, key=ident)


def ident(a: Aggregate) -> tuple[Any, ...]:
    return (a.name, sorted((a.tags or {}).items()), a.agg_func, a.window_start, a.window_end)


def assert_same(service: list[Aggregate], replayed: list[Aggregate]) -> None:
    assert [ident(a) for a in replayed] == [ident(a) for a in service]
    for s, r in zip(service, replayed, strict=True):
        assert (r.count, r.tags, r.revision) == (s.count, s.tags, 1), ident(s)
        assert same_value(s.agg_func, s.value, r.value), (ident(s), s.value, r.value)
        assert r.sketch == s.sketch, ident(s)


def feed(
    seed: int, parts: int, funcs: Sequence[str | None], **extra: Any
) -> dict[str, list[bytes]]:
    rnd = random.Random(seed)
    feeds: dict[str, list[bytes]] = {}
    for p in range(parts):
        t = START
        out = feeds[f"t:{p}"] = []
        while t < START + 2 * 3600:
            t += rnd.uniform(0.0, 20.0)
            func = rnd.choice(funcs)
            fields = {**extra, "agg_func": func} if func else extra
            out.append(record(f"n{rnd.randrange(3)}", rnd.uniform(-1e3, 1e3), t, **fields))
    return feeds


@pytest.mark.parametrize("seed", [1, 2])
async def test_tumbling_windows_over_partitions_come_out_as_the_service_emitted_them(
    tmp_path: Path, seed: int
) -> None:
    funcs = [None, "avg", "min", "max", "count", "first", "last", "stddev", "p50", "p99"]
    span = ReplaySpan(START + 600, START + 3600 + 1200)
    service, replayed = await service_and_replay(
        tmp_path, AggregationConfig(interval_s=60.0), feed(seed, 3, funcs), span
    )
    assert len(service) > 300
    assert_same(service, replayed)


async def test_rollups_and_group_by_come_out_as_the_service_emitted_them(tmp_path: Path) -> None:
    cfg = AggregationConfig(interval_s=60.0, rollups_s=(300.0, 3600.0), group_by=("host",))
    feeds = feed(3, 2, [None, "max", "p90"], tags={"host": "h1", "dc": "x"})
    feeds["t:2"] = [record("n0", 1.5, START + 30 + i, tags={"host": "h2"}) for i in range(50)]
    span = ReplaySpan(START, START + 2 * 3600)
    service, replayed = await service_and_replay(tmp_path, cfg, feeds, span)
    assert {a.window_end - a.window_start for a in service} == {60.0, 300.0, 3600.0}
    assert {"h1", "h2"} <= {(a.tags or {}).get("host") for a in service}
    assert_same(service, replayed)


async def test_hopping_windows_and_a_names_glob_come_out_as_the_service_emitted_them(
    tmp_path: Path,
) -> None:
    cfg = AggregationConfig(interval_s=60.0, hop_s=15.0)
    span = ReplaySpan(START + 300, START + 1800, "n[01]")
    service, replayed = await service_and_replay(tmp_path, cfg, feed(4, 2, [None, "avg"]), span)
    service = [a for a in service if a.name in ("n0", "n1")]
    assert {a.window_start % 60 for a in service} == {0.0, 15.0, 30.0, 45.0}
    assert_same(service, replayed)


def test_the_summary_says_what_was_read_compared_skipped_and_written() -> None:
    s = Summary(files=3, events=10, windows=4, unchanged=1, changed=1, new=1, skipped_open=1)
    assert s.lines()[-1] == "written: nothing"
    s.written["postgres:aggregated_events"] += 2
    s.held_only = 5
    assert s.lines() == [
        "replay: 3 archive file(s), 10 event(s)",
        "windows read 4: changed 1, new 1, unchanged 1, skipped (still open or correctable) 1",
        "held by the outputs without any archived event: 5 (left as they are: docs/replay.md)",
        "written to postgres:aggregated_events: 2",
    ]
