"""Upgrading the v1.2 aggregates table in place (tags in the key, revision, sketch):
by ``migrate``, and what start-up does with a table it may not upgrade."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from service.config import PostgresConfig, Secret
from service.core.clock import SystemClock
from service.core.errors import PermanentError
from service.core.events import Aggregate
from service.metrics.collector import MetricsCollector
from service.postgres.errors import pg_error_kind
from service.postgres.schema import ensure_checkpoint_table, migrate
from service.sinks.postgres import PostgresSink

pytestmark = pytest.mark.integration

T0 = 1_700_000_040.0
V12_DDL = Path(__file__).parents[1] / "fixtures" / "v1_2_schema.sql"


def utc(ts: float) -> datetime:
    return datetime.fromtimestamp(ts, tz=UTC)


def v12_statements(table: str, dlq: str) -> list[str]:
    text = V12_DDL.read_text().replace("v12_aggregates", table).replace("v12_dead_letters", dlq)
    sql = "\n".join(line for line in text.splitlines() if not line.startswith("-- "))
    return [s for s in sql.split("\n;\n") if s.strip()]


@pytest.fixture
async def v12_tables(conn: Any, unique_name: str) -> AsyncIterator[tuple[str, str]]:
    """The tables as v1.2 made them, holding rows of v1.2: two aggregates and two dead
    letters (one with a dedup key)."""
    table, dlq = f"{unique_name}_agg", f"{unique_name}_dlq"
    statements = v12_statements(table, dlq)
    assert len(statements) == 9
    for stmt in statements:
        await conn.execute(stmt)
    await conn.execute(
        f"""INSERT INTO {table} (name, agg_func, window_start, window_end, value, count,
                                 emitted_at)
            VALUES ('cpu', 'sum', $1, $2, 7.5, 3, $3), ('cpu', 'p99', $1, $2, 0.9, 3, $3)""",
        utc(T0),
        utc(T0 + 60),
        utc(T0 + 61),
    )
    await conn.execute(
        f"""INSERT INTO {dlq} (raw, reason, detail, source, received_at, dedup_key)
            VALUES ('{{bad', 'invalid_json', 'x', 'kafka in/0 offset=1', $1, 'k1'),
                   ('{{}}', 'missing_name', 'y', 'demo', $1, NULL)""",
        utc(T0),
    )
    yield table, dlq
    await conn.execute(f"DROP TABLE IF EXISTS {table}, {dlq}")


def config(dsn: str, table: str, dlq: str) -> PostgresConfig:
    return PostgresConfig(
        dsn=Secret(dsn), table=table, dead_letter_table=dlq, pool_min_size=1, pool_max_size=1
    )


def agg(
    func: str = "sum",
    value: float = 1.0,
    count: int = 1,
    tags: dict[str, str] | None = None,
    revision: int = 1,
) -> Aggregate:
    return Aggregate(
        name="cpu",
        agg_func=func,
        value=value,
        count=count,
        window_start=T0,
        window_end=T0 + 60,
        emitted_at=T0 + 62,
        tags=tags,
        revision=revision,
    )


async def aggregate_rows(conn: Any, table: str) -> list[tuple[Any, ...]]:
    return sorted(
        tuple(r)
        for r in await conn.fetch(
            f"SELECT agg_func, tags::text, value, count, revision, sketch FROM {table}"
        )
    )


async def dead_letter_rows(conn: Any, dlq: str) -> list[tuple[Any, ...]]:
    return [tuple(r) for r in await conn.fetch(f"SELECT * FROM {dlq} ORDER BY id")]


async def primary_key(conn: Any, table: str) -> str:
    return str(
        await conn.fetchval(
            "SELECT pg_get_constraintdef(oid) FROM pg_constraint "
            "WHERE conrelid = $1::regclass AND contype = 'p'",
            table,
        )
    )


async def test_migrate_upgrades_a_v12_table_in_place_keeping_every_row(
    postgres_dsn: str, conn: Any, v12_tables: tuple[str, str]
) -> None:
    table, dlq = v12_tables
    letters = await dead_letter_rows(conn, dlq)
    dlq_columns = await conn.fetch(
        "SELECT column_name, data_type FROM information_schema.columns "
        "WHERE table_name = $1 ORDER BY column_name",
        dlq,
    )

    await migrate(postgres_dsn, table, dlq)
    await migrate(postgres_dsn, table, dlq)  # and again: nothing left to do

    assert await primary_key(conn, table) == (
        "PRIMARY KEY (name, agg_func, window_start, window_end, tags)"
    )
    assert await aggregate_rows(conn, table) == [
        ("p99", "{}", 0.9, 3, 1, None),
        ("sum", "{}", 7.5, 3, 1, None),
    ]
    # the dead letters are untouched, but for dlq replay's two columns (docs/dlq.md),
    # NULL: never replayed
    assert await dead_letter_rows(conn, dlq) == [(*row, None, None) for row in letters]
    replay_columns = [("replay_outcome", "text"), ("replayed_at", "timestamp with time zone")]
    assert [
        tuple(c)
        for c in await conn.fetch(
            "SELECT column_name, data_type FROM information_schema.columns "
            "WHERE table_name = $1 ORDER BY column_name",
            dlq,
        )
    ] == sorted([*map(tuple, dlq_columns), *replay_columns])


async def test_after_migrate_tagged_series_sit_beside_the_old_rows_and_corrections_replace(
    postgres_dsn: str, conn: Any, v12_tables: tuple[str, str]
) -> None:
    table, dlq = v12_tables
    await migrate(postgres_dsn, table, dlq)

    async with PostgresSink(
        config(postgres_dsn, table, dlq), MetricsCollector(), SystemClock()
    ) as sink:
        await sink.write([agg(value=2.0, count=1, tags={"host": "a"})], [])
        await sink.write([agg(value=3.0, count=1, tags={"host": "b"})], [])
        # the untagged v1.2 row is the series without tags: a correction replaces it
        await sink.write([agg(value=9.0, count=4, revision=2)], [])
        await sink.write([agg("p99", value=0.1, count=1, tags={})], [])  # a stale revision 1

    assert await aggregate_rows(conn, table) == [
        ("p99", "{}", 0.9, 3, 1, None),
        ("sum", '{"host": "a"}', 2.0, 1, 1, None),
        ("sum", '{"host": "b"}', 3.0, 1, 1, None),
        ("sum", "{}", 9.0, 4, 2, None),
    ]


async def test_start_up_upgrades_a_v12_table_it_owns(
    postgres_dsn: str, conn: Any, v12_tables: tuple[str, str]
) -> None:
    """As before v1.3, start-up runs the migration under the advisory lock."""
    table, dlq = v12_tables
    async with PostgresSink(
        config(postgres_dsn, table, dlq), MetricsCollector(), SystemClock()
    ) as sink:
        await sink.write([agg(tags={"host": "a"})], [])

    assert len(await aggregate_rows(conn, table)) == 3


async def test_a_user_that_may_not_upgrade_a_v12_table_is_told_to_run_migrate(
    postgres_dsn: str, conn: Any, v12_tables: tuple[str, str], unique_name: str
) -> None:
    table, dlq = v12_tables
    await ensure_checkpoint_table(conn)  # the other tables exist: only this one is old
    role = f"{unique_name}_writer"
    await conn.execute(f"CREATE ROLE {role} LOGIN")
    try:
        await conn.execute(f"GRANT SELECT, INSERT, UPDATE ON {table}, {dlq} TO {role}")
        writer_dsn = postgres_dsn.replace("postgres@", f"{role}@", 1)
        sink = PostgresSink(config(writer_dsn, table, dlq), MetricsCollector(), SystemClock())

        with pytest.raises(
            PermanentError, match=r"revision, sketch, tags.*vabus-aggregator migrate"
        ):
            await sink.start()

        await migrate(postgres_dsn, table, dlq)
        async with sink:
            await sink.write([agg(tags={"host": "a"})], [])
        assert len(await aggregate_rows(conn, table)) == 3
    finally:
        await conn.execute(f"DROP OWNED BY {role}")
        await conn.execute(f"DROP ROLE {role}")


# The v1.2 sink's upsert (git show 08fbe4e:service/sinks/postgres.py), verbatim.
V12_UPSERT = """
            INSERT INTO {table} AS t
                (name, agg_func, window_start, window_end, value, count, emitted_at, updated_at)
            SELECT n, f, to_timestamp(ws), to_timestamp(we), v, c, to_timestamp(ea), now()
            FROM unnest($1::text[], $2::text[], $3::float8[], $4::float8[], $5::float8[],
                        $6::int8[], $7::float8[]) AS u(n, f, ws, we, v, c, ea)
            ON CONFLICT (name, agg_func, window_start, window_end) DO UPDATE SET
                value = EXCLUDED.value,
                count = EXCLUDED.count,
                emitted_at = EXCLUDED.emitted_at,
                updated_at = now()
            WHERE (t.count, t.emitted_at) < (EXCLUDED.count, EXCLUDED.emitted_at)"""


async def test_a_v12_instance_still_running_is_refused_by_the_upgraded_table_not_misled(
    postgres_dsn: str, conn: Any, v12_tables: tuple[str, str]
) -> None:
    """During a rolling upgrade a v1.2 writer gets a permanent error (its output holds
    and its successor replays) instead of overwriting a series it cannot tell apart."""
    table, dlq = v12_tables
    await migrate(postgres_dsn, table, dlq)

    with pytest.raises(asyncpg.InvalidColumnReferenceError) as refused:
        await conn.execute(
            V12_UPSERT.format(table=f'"{table}"'),
            ["cpu"],
            ["sum"],
            [T0],
            [T0 + 60],
            [1.0],
            [9],
            [T0 + 70],
        )
    assert refused.value.sqlstate == "42P10"
    assert pg_error_kind(refused.value) == "schema"
