"""PostgreSQL dead letters are stored once, like the Kafka dead-letter topic: a replay
(after kill -9, a takeover, a redelivery) writes the same dead letters again, and the
table keeps one row for each."""

from __future__ import annotations

from collections import Counter
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest

from service.config import PostgresConfig, Secret
from service.core.clock import SystemClock
from service.core.events import DeadLetter
from service.metrics.collector import MetricsCollector
from service.postgres.schema import migrate
from service.sinks.postgres import PostgresSink

pytestmark = pytest.mark.integration

T0 = 1_700_000_040.0
# One Kafka message holding the same bad element twice, another with one, and an HTTP
# batch asked for with a cursor: four dead letters, each with its position.
BATCH = [
    DeadLetter('{"name": "x"}', "missing_field", "value", "kafka in/0 offset=7", T0),
    DeadLetter('{"name": "x"}', "missing_field", "value", "kafka in/0 offset=7", T0),
    DeadLetter("not json", "invalid_json", "line 1", "kafka in/1 offset=3", T0),
    DeadLetter('{"value": 1}', "missing_field", "name", "http cursor=c42", T0),
]


def config(dsn: str, prefix: str) -> PostgresConfig:
    return PostgresConfig(
        dsn=Secret(dsn),
        table=f"{prefix}_agg",
        dead_letter_table=f"{prefix}_dlq",
        pool_min_size=1,
        pool_max_size=2,
    )


@pytest.fixture
async def conn(postgres_dsn: str, unique_name: str) -> AsyncIterator[Any]:
    c = await asyncpg.connect(postgres_dsn)
    yield c
    await c.execute(f"DROP TABLE IF EXISTS {unique_name}_agg, {unique_name}_dlq")
    await c.close()


async def stored(conn: Any, table: str) -> Counter[tuple[str, str]]:
    rows = await conn.fetch(f"SELECT source, reason FROM {table}")
    return Counter((r["source"], r["reason"]) for r in rows)


EXPECTED = Counter(
    {
        ("kafka in/0 offset=7", "missing_field"): 2,
        ("kafka in/1 offset=3", "invalid_json"): 1,
        ("http cursor=c42", "missing_field"): 1,
    }
)


async def test_a_replayed_batch_stores_each_dead_letter_once(
    postgres_dsn: str, unique_name: str, conn: Any
) -> None:
    cfg = config(postgres_dsn, unique_name)
    async with PostgresSink(cfg, MetricsCollector(), SystemClock()) as sink:
        await sink.write([], BATCH)
        # the replay stamps a new receipt time, and may come cut into other writes
        replay = [DeadLetter(d.raw, d.reason, d.detail, d.source, T0 + 90) for d in BATCH]
        await sink.write([], replay)
        await sink.write([], replay[2:])
    assert await stored(conn, cfg.dead_letter_table) == EXPECTED


async def test_dead_letters_without_a_position_are_stored_each_time(
    postgres_dsn: str, unique_name: str, conn: Any
) -> None:
    """Identical text from a source that names no position may be a new input."""
    cfg = config(postgres_dsn, unique_name)
    letter = DeadLetter("{}", "invalid_value", "refused", "sink:postgres:agg", T0)
    async with PostgresSink(cfg, MetricsCollector(), SystemClock()) as sink:
        await sink.write([], [letter])
        await sink.write([], [letter])
    assert await stored(conn, cfg.dead_letter_table) == {("sink:postgres:agg", "invalid_value"): 2}


async def test_the_migration_upgrades_a_dead_letter_table_of_the_old_schema_in_place(
    postgres_dsn: str, unique_name: str, conn: Any
) -> None:
    cfg = config(postgres_dsn, unique_name)
    # the table as releases before the key made it, holding rows already
    await conn.execute(
        f"""CREATE TABLE {cfg.dead_letter_table} (
            id          bigserial   PRIMARY KEY,
            raw         text        NOT NULL,
            reason      text        NOT NULL,
            detail      text        NOT NULL DEFAULT '',
            source      text        NOT NULL DEFAULT '',
            received_at timestamptz NOT NULL,
            stored_at   timestamptz NOT NULL DEFAULT now()
        )"""
    )
    for _ in range(2):
        await conn.execute(
            f"INSERT INTO {cfg.dead_letter_table} (raw, reason, source, received_at) "
            "VALUES ('old', 'invalid_json', 'kafka in/0 offset=1', now())"
        )
    await migrate(postgres_dsn, cfg.table, cfg.dead_letter_table)
    await migrate(postgres_dsn, cfg.table, cfg.dead_letter_table)  # idempotent
    async with PostgresSink(cfg, MetricsCollector(), SystemClock()) as sink:
        await sink.write([], BATCH)
        await sink.write([], BATCH)
    assert await stored(conn, cfg.dead_letter_table) == EXPECTED + Counter(
        {("kafka in/0 offset=1", "invalid_json"): 2}  # old rows kept as they were
    )


async def test_two_inputs_sharing_the_table_keep_their_own_dead_letters(
    postgres_dsn: str, unique_name: str, conn: Any
) -> None:
    """Two HTTP buses may hand out the same cursors: the key names the input too."""
    cfg = config(postgres_dsn, unique_name)
    for scope in ("http:http://bus-a", "http:http://bus-b"):
        async with PostgresSink(cfg, MetricsCollector(), SystemClock(), dedup_scope=scope) as sink:
            await sink.write([], BATCH)
            await sink.write([], BATCH)
    assert await stored(conn, cfg.dead_letter_table) == EXPECTED + EXPECTED
