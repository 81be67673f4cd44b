"""The archive step with the PostgreSQL sink and checkpoint store in one transaction:
the checkpoint (and the rows committed with it) waits until the archive holds the
events it covers, however long the archive fails."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from pathlib import Path

import pytest

from service.archive.rows import ArchiveSlice, Rows
from service.archive.stores import DirectoryStore
from service.archive.writer import ArchiveWriter
from service.checkpoints.base import PartitionCheckpoint
from service.checkpoints.postgres import PostgresCheckpointStore
from service.config import PostgresConfig
from service.core.clock import SystemClock
from service.core.confirmation import Confirmation
from service.core.errors import TransientError
from service.core.events import Aggregate
from service.core.retry import Backoff
from service.metrics.collector import MetricsCollector
from service.pipeline.flow import Checkpoint, Outputs
from service.pipeline.hub import Delivery
from service.pipeline.sender import DataSender, SharedTransaction
from service.sinks.postgres import PostgresSink
from tests.archived import archive_rows

pytestmark = pytest.mark.integration

T0 = 1_700_000_040.0


class FlakyStore(DirectoryStore):
    failing = True

    async def put(self, name: str, data: bytes) -> None:
        if self.failing:
            raise TransientError("archive write: bucket unreachable")
        await super().put(name, data)


async def test_the_shared_transaction_commits_only_after_the_archive_holds_the_events(
    postgres_dsn: str, unique_name: str, tmp_path: Path, pg_outputs: PostgresConfig
) -> None:
    cfg = pg_outputs
    metrics = MetricsCollector()
    commits: list[Mapping[str, str]] = []

    async def commit(positions: Mapping[str, str]) -> None:
        commits.append(dict(positions))

    store = FlakyStore(str(tmp_path / "archive"))
    archive = ArchiveWriter(store, metrics)
    rows = Rows()
    rows.add("a", "sum", 1.0, T0 + 1, None)
    rows.add("a", "sum", 2.0, T0 + 2, None)
    async with (
        PostgresSink(cfg, metrics, SystemClock()) as pg,
        PostgresCheckpointStore(postgres_dsn, unique_name, table=f"{unique_name}_cp") as cps,
    ):
        sender = DataSender(
            [pg],
            cps,
            commit,
            metrics,
            SystemClock(),
            backoff=Backoff(initial_s=0.01, maximum_s=0.05, jitter=False),
            breaker_threshold=1000,
            shared_transaction=SharedTransaction(pg, cps),
            archive=archive,
        )
        aggregate = Aggregate("a", "sum", 3.0, 2, T0, T0 + 60, T0 + 61)
        done = Confirmation()
        cp = Checkpoint(
            [PartitionCheckpoint("p0", "2", b"s")],
            done,
            [ArchiveSlice("p0", None, "2", rows, True)],
        )
        task = asyncio.create_task(sender.handle(Delivery([Outputs([aggregate], []), cp])))
        async with asyncio.timeout(10):
            while metrics.snapshot()["sink_retries"].get("archive", 0) < 3:
                await asyncio.sleep(0.01)
        assert "archive" in sender.degraded
        assert await cps.load(["p0"]) == {} and commits == []  # nothing committed yet
        store.failing = False
        await asyncio.wait_for(task, 10)
        assert done.confirmed and commits == [{"p0": "2"}]
        assert (await cps.load(["p0"]))["p0"].position == "2"
        assert sum(archive_rows(tmp_path / "archive").values()) == 2
        assert "archive" not in sender.degraded
