"""DataSender with the real PostgreSQL sink and checkpoint store in one database: the
rows written just before a checkpoint and the checkpoint commit together."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any, cast

import pytest

from service.checkpoints.base import PartitionCheckpoint
from service.checkpoints.postgres import PostgresCheckpointStore
from service.config import PostgresConfig, load_config
from service.core.clock import SystemClock
from service.core.confirmation import Confirmation
from service.core.errors import PermanentError
from service.core.events import Aggregate
from service.metrics.collector import MetricsCollector
from service.pipeline.flow import Checkpoint, Outputs
from service.pipeline.hub import Delivery
from service.pipeline.sender import DataSender, SharedTransaction
from service.sinks.postgres import PostgresSink
from service.wiring import build_outputs
from tests.fakes.sinks import MemorySink

pytestmark = pytest.mark.integration

T0 = 1_700_000_040.0


def agg(name: str, count: int = 1) -> Aggregate:
    return Aggregate(name, "sum", float(count), count, T0, T0 + 60, T0 + 61)


async def test_rows_and_checkpoint_commit_in_one_transaction_after_the_other_outputs(
    postgres_dsn: str, unique_name: str, conn: Any, pg_outputs: PostgresConfig
) -> None:
    cfg = pg_outputs
    cp_table = f"{unique_name}_cp"
    metrics = MetricsCollector()
    commits: list[Mapping[str, str]] = []

    async def commit(positions: Mapping[str, str]) -> None:
        commits.append(dict(positions))

    memory = MemorySink("kafka-like")
    try:
        async with (
            PostgresSink(cfg, metrics, SystemClock()) as pg,
            PostgresCheckpointStore(postgres_dsn, unique_name, table=cp_table) as store,
            memory,
        ):
            shared = SharedTransaction(pg, store)
            sender = DataSender(
                [memory, pg], store, commit, metrics, SystemClock(), shared_transaction=shared
            )
            assert sender.checkpoint_partner == "postgres"

            # The other output holds the PostgreSQL commit back until it has the rows.
            memory.pause()
            done = Confirmation()
            cp = Checkpoint([PartitionCheckpoint("p0", "3", b"s1")], done)
            task = asyncio.create_task(
                sender.handle(Delivery([Outputs([agg("a"), agg("b"), agg("c")], []), cp]))
            )
            await memory.wait_until(lambda m: m.writes_started == 1)  # held by pause()
            assert await conn.fetchval(f"SELECT count(*) FROM {cp_table}") == 0
            memory.resume()
            await asyncio.wait_for(task, 10)
            assert done.confirmed and commits == [{"p0": "3"}]
            assert await conn.fetchval(f"SELECT count(*) FROM {cfg.table}") == 3
            assert await store.load(["p0"]) == {"p0": PartitionCheckpoint("p0", "3", b"s1")}

            # A checkpoint that cannot be stored takes the rows of its transaction with it.
            await conn.execute(f"DROP TABLE {cp_table}")
            with pytest.raises(PermanentError):
                await sender.handle(
                    Delivery(
                        [Outputs([agg("d")], []), Checkpoint([PartitionCheckpoint("p0", "4", b"")])]
                    )
                )
            names = await conn.fetch(f"SELECT name FROM {cfg.table} ORDER BY name")
            assert [r["name"] for r in names] == ["a", "b", "c"]
            assert commits == [{"p0": "3"}]
    finally:
        await conn.execute(f"DROP TABLE IF EXISTS {cfg.table}, {cfg.dead_letter_table}, {cp_table}")


def test_the_wiring_pairs_the_postgres_sink_with_its_checkpoint_store() -> None:
    config = load_config(
        {"STORAGE_TYPE": "kafka,postgres", "POSTGRES_DSN": "postgresql://u@h/db"}, dotenv=None
    )
    outputs = build_outputs(config, MetricsCollector(), SystemClock())
    assert outputs.shared_transaction is not None
    assert outputs.shared_transaction.sink is outputs.sinks[-1]
    assert outputs.shared_transaction.store is cast(object, outputs.store)
    kafka_only = build_outputs(load_config({}, dotenv=None), MetricsCollector(), SystemClock())
    assert kafka_only.shared_transaction is None


async def _no_commit(positions: Mapping[str, str]) -> None:
    return None
