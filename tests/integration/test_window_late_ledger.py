"""vabus_window_late against a real PostgreSQL: applied (corrections) and dead-lettered
late events per window, written with each checkpoint, and ``migrate`` adding the
``late_applied`` column to a table of a release before 1.3."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest

from service.checkpoints.base import PartitionCheckpoint
from service.checkpoints.postgres import PostgresCheckpointStore
from service.postgres.schema import migrate_connection

pytestmark = pytest.mark.integration

W = 1_700_000_000.0


@pytest.fixture
async def pool(postgres_dsn: str) -> AsyncIterator[Any]:
    p = await asyncpg.create_pool(postgres_dsn, min_size=1, max_size=2)
    yield p
    await p.close()


def cp(ledger: dict[str, Any]) -> PartitionCheckpoint:
    return PartitionCheckpoint("0", "1", b"{}", ledger=ledger)


async def rows(pool: Any, namespace: str) -> list[tuple[str, str, int, int]]:
    found = await pool.fetch(
        "SELECT name, agg_func, late, late_applied FROM vabus_window_late "
        "WHERE namespace = $1 ORDER BY name",
        namespace,
    )
    return [(r["name"], r["agg_func"], r["late"], r["late_applied"]) for r in found]


async def test_applied_and_dead_lettered_late_events_are_written_per_window(
    pool: Any, unique_name: str
) -> None:
    async with PostgresCheckpointStore(pool, unique_name, table=f"{unique_name}_cp") as store:
        await store.save(
            [
                cp(
                    {
                        "late_windows": [["a", "sum", W, 2], ["b", "max", W, 1]],
                        "late_applied": [["a", "sum", W, 5], ["c", "min", W, 3]],
                    }
                )
            ]
        )
        assert await rows(pool, unique_name) == [
            ("a", "sum", 2, 5),
            ("b", "max", 1, 0),
            ("c", "min", 0, 3),
        ]
        # a count no longer held in memory (written, final) keeps its stored value
        await store.save([cp({"late_windows": [], "late_applied": [["a", "sum", W, 6]]})])
        assert (await rows(pool, unique_name))[0] == ("a", "sum", 2, 6)
    await pool.execute(f"DROP TABLE IF EXISTS {unique_name}_cp")


async def test_migrate_adds_late_applied_to_a_table_of_the_previous_release(
    postgres_dsn: str, unique_name: str
) -> None:
    schema = unique_name
    admin = await asyncpg.connect(postgres_dsn)
    await admin.execute(f"CREATE SCHEMA {schema}")
    try:
        conn = await asyncpg.connect(postgres_dsn, server_settings={"search_path": schema})
        try:
            await conn.execute(
                """CREATE TABLE vabus_window_late (
                    namespace text NOT NULL, partition text NOT NULL, name text NOT NULL,
                    agg_func text NOT NULL, window_start timestamptz NOT NULL,
                    late bigint NOT NULL, updated_at timestamptz NOT NULL DEFAULT now(),
                    PRIMARY KEY (namespace, partition, name, agg_func, window_start))"""
            )
            await conn.execute(
                "INSERT INTO vabus_window_late VALUES ('ns', '0', 'a', 'sum', now(), 4)"
            )
            await migrate_connection(conn, "aggs", "dead")
            await migrate_connection(conn, "aggs", "dead")  # idempotent
            row = await conn.fetchrow("SELECT late, late_applied FROM vabus_window_late")
            assert (row["late"], row["late_applied"]) == (4, 0)
        finally:
            await conn.close()
    finally:
        await admin.execute(f"DROP SCHEMA {schema} CASCADE")
        await admin.close()
