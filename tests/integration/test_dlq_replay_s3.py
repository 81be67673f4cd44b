"""``dlq replay`` with the archive in an S3 bucket (moto, in process) and PostgreSQL:
the redriven events' files go to the bucket beside the service's, and the windows come
out as with a directory; a second run adds nothing."""

from __future__ import annotations

import asyncio
import io
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from service.app import Service
from service.archive.stores import S3Store
from service.archive.writer import ArchiveWriter
from service.checkpoints.file import FileCheckpointStore
from service.config import AggregationConfig, Config, PostgresConfig, Secret
from service.config.archive import ArchiveConfig
from service.core.clock import ManualClock
from service.dlq.command import dlq_replay
from service.metrics.collector import MetricsCollector
from service.sinks.postgres import PostgresSink
from tests.archived import S3_ENV, moto_s3, s3_rows
from tests.fakes.bus import MemoryBus
from tests.integration.test_dlq_replay_postgres import (
    SMALL,
    START,
    Feed,
    assert_exact,
    raised,
    windows,
)

pytestmark = pytest.mark.integration

BUCKET = "dlq-archive"


@pytest.fixture
def s3(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Any, str]]:
    for k, v in S3_ENV.items():
        monkeypatch.setenv(k, v)
    with moto_s3() as server:
        server[0].create_bucket(Bucket=BUCKET)
        yield server


@pytest.fixture
async def running(
    s3: tuple[Any, str], postgres_dsn: str, unique_name: str, tmp_path: Path
) -> AsyncIterator[tuple[Config, ManualClock, Feed, Any]]:
    client, endpoint = s3
    config = Config(
        bus=SMALL,
        aggregation=AggregationConfig(interval_s=60.0),
        outputs=("postgres",),
        postgres=PostgresConfig(
            dsn=Secret(postgres_dsn),
            table=f"{unique_name}_agg",
            dead_letter_table=f"{unique_name}_dlq",
            pool_max_size=2,
        ),
        archive=ArchiveConfig(
            kind="s3",
            url=f"s3://{BUCKET}/{unique_name}",
            bucket=BUCKET,
            path=unique_name,
            endpoint_url=endpoint,
        ),
    )
    feed = Feed()
    clock = ManualClock(START + 5 * 3600)
    metrics = MetricsCollector(clock)
    bus = MemoryBus(feed.records, batch_size=25, clock=clock)
    service = Service(
        config,
        bus=bus,
        sinks=[PostgresSink(config.postgres, metrics, clock)],
        store=FileCheckpointStore(str(tmp_path / "state"), "test"),
        metrics=metrics,
        clock=clock,
        serve_http=False,
        archive=ArchiveWriter(S3Store(BUCKET, unique_name, endpoint), metrics),
    )
    total = {p: len(r) for p, r in feed.records.items()}
    task = asyncio.create_task(service.run())
    try:
        async with asyncio.timeout(90):
            while any(bus.positions.get(p) != n for p, n in total.items()) or (
                sum(s3_rows(client, BUCKET, unique_name).values()) < len(feed.first) + 2
            ):
                assert not task.done(), task.exception()
                clock.advance(1.0)
                await asyncio.sleep(0.05)
        yield config, clock, feed, client
    finally:
        service.request_stop()
        await asyncio.wait_for(task, 30)


async def test_redriven_events_go_to_the_bucket_and_count_once(
    running: tuple[Config, ManualClock, Feed, Any], postgres_dsn: str
) -> None:
    config, clock, feed, client = running
    summary = await dlq_replay(raised(config), "too_large", None, clock=clock, err=io.StringIO())
    assert summary.events == len(feed.redriven) and summary.written
    assert_exact(await windows(postgres_dsn, config.postgres.table), feed, config)
    rows = s3_rows(client, BUCKET, f"{config.archive.path}/")
    assert sum(rows.values()) == len(feed.first) + 2 + len(feed.redriven)
    again = await dlq_replay(raised(config), "too_large", None, clock=clock, err=io.StringIO())
    assert again.selected == 0 and not again.written
    assert sum(s3_rows(client, BUCKET, f"{config.archive.path}/").values()) == sum(rows.values())
