"""``replay`` reading an archive in an S3 bucket (moto, in process): the same files, in
the same order, and the same aggregates as from a directory holding the same slices."""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from service.archive.rows import ArchiveSlice, Rows
from service.archive.stores import ArchiveStore, DirectoryStore, S3Store
from service.archive.writer import ArchiveWriter
from service.config import AggregationConfig
from service.core.clock import ManualClock
from service.core.events import Aggregate
from service.metrics.collector import MetricsCollector
from service.replay.archived import list_files
from service.replay.command import Summary, recomputed
from service.replay.progress import Progress
from service.replay.span import ReplaySpan
from tests.archived import S3_ENV, moto_s3

pytestmark = pytest.mark.integration

START = 1_699_999_200.0  # the start of an hour
HOUR = int(START // 3600)


@pytest.fixture
def s3(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Any, str]]:
    for k, v in S3_ENV.items():
        monkeypatch.setenv(k, v)
    with moto_s3() as server:
        # a bucket of its own: moto keeps its buckets for the whole test process
        server[0].create_bucket(Bucket="replay-archive")
        yield server


def rows_of(first: int, n: int) -> Rows:
    rows = Rows()
    for i in range(first, first + n):
        rows.add(f"n{i % 3}", "max" if i % 2 else "sum", float(i), START + 3000 + i * 20, None)
    return rows


async def fill(store: ArchiveStore) -> None:
    """Two partitions; p1's first attempt from 30 is killed after its files (which span
    two hours), then written again from 30 cut shorter, then on."""
    writer = ArchiveWriter(store, MetricsCollector(ManualClock()))
    await writer.write([ArchiveSlice("t:0", None, "40", rows_of(0, 40), True)])
    await writer.write([ArchiveSlice("t:1", "30", "60", rows_of(100, 30), True)])
    restarted = ArchiveWriter(store, MetricsCollector(ManualClock()))
    await restarted.write([ArchiveSlice("t:1", "30", "45", rows_of(100, 15), True)])
    await restarted.write([ArchiveSlice("t:1", "45", "60", rows_of(115, 15), False)])


async def replayed(store: ArchiveStore) -> tuple[list[list[str]], list[Aggregate]]:
    parts = await list_files(store, [HOUR, HOUR + 1])
    span = ReplaySpan(START, START + 7200)
    got = await recomputed(
        store,
        AggregationConfig(interval_s=60.0),
        span,
        0.0,
        Summary(),
        Progress(io.StringIO(), tty=False),
    )
    return [p.files for p in parts], got


async def test_a_bucket_reads_back_as_a_directory_does(s3: tuple[Any, str], tmp_path: Path) -> None:
    client, endpoint = s3
    bucket = S3Store("replay-archive", "vabus", endpoint)
    directory = DirectoryStore(str(tmp_path / "archive"))
    try:
        await fill(bucket)
        await fill(directory)
        client.put_object(Bucket="replay-archive", Key="vabus/hour=2023-11-14T22/.x.tmp", Body=b"")
        from_s3, from_dir = await replayed(bucket), await replayed(directory)
    finally:
        await bucket.close()
    files, aggregates = from_s3
    assert (files, aggregates) == from_dir
    # p0's slice spans two hours; p1: 30-45 and 45-60, the killed 30-60 gone
    assert files[1] == [
        "hour=2023-11-14T23/t_1@30-45.parquet",
        "hour=2023-11-14T23/t_1@45-60.parquet",
    ]
    assert len(files[0]) == 2
    assert sum(a.count for a in aggregates) == 40 + 30
