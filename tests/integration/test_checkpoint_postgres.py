"""PostgresCheckpointStore against a real PostgreSQL: round trip, merge, atomic saves."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest

from service.checkpoints.base import PartitionCheckpoint
from service.checkpoints.postgres import PostgresCheckpointStore
from service.core.errors import PermanentError

pytestmark = pytest.mark.integration


def cp(partition: str, position: str | None, state: bytes | None) -> PartitionCheckpoint:
    return PartitionCheckpoint(partition=partition, position=position, state=state)


@pytest.fixture
async def pool(postgres_dsn: str) -> AsyncIterator[Any]:
    p = await asyncpg.create_pool(postgres_dsn, min_size=1, max_size=2)
    yield p
    await p.close()


@pytest.fixture
async def table(pool: Any, unique_name: str) -> AsyncIterator[str]:
    """A fresh checkpoint table name for this test, dropped afterwards."""
    name = f"{unique_name}_cp"
    yield name
    await pool.execute(f"DROP TABLE IF EXISTS {name}")


async def test_saved_checkpoints_load_back_in_a_new_store(postgres_dsn: str, table: str) -> None:
    async with PostgresCheckpointStore(postgres_dsn, "kafka:events:g", table=table) as store:
        assert await store.load(["0", "1"]) == {}
        await store.save([cp("0", "17", b"\x00\x01state"), cp("1", None, None)])

    async with PostgresCheckpointStore(postgres_dsn, "kafka:events:g", table=table) as store:
        loaded = await store.load(["0", "1", "2"])
    assert loaded == {"0": cp("0", "17", b"\x00\x01state"), "1": cp("1", None, None)}


async def test_save_replaces_given_partitions_and_keeps_the_others(pool: Any, table: str) -> None:
    async with PostgresCheckpointStore(pool, "ns", table=table) as store:
        await store.save([cp("a", "1", b"a1"), cp("b", "1", b"b1")])
        await store.save([cp("a", "2", b"a2"), cp("a", "3", b"a3")])

        assert await store.load(["a", "b"]) == {"a": cp("a", "3", b"a3"), "b": cp("b", "1", b"b1")}
    assert await pool.fetchval(f"SELECT count(*) FROM {table}") == 2


async def test_namespaces_do_not_see_each_other(pool: Any, table: str) -> None:
    async with (
        PostgresCheckpointStore(pool, "one", table=table) as one,
        PostgresCheckpointStore(pool, "two", table=table) as two,
    ):
        await one.save([cp("0", "1", b"one")])
        assert await two.load(["0"]) == {}
        assert await one.load(["0"]) == {"0": cp("0", "1", b"one")}


async def test_a_failed_save_changes_no_partition(pool: Any, table: str) -> None:
    async with PostgresCheckpointStore(pool, "ns", table=table) as store:
        await store.save([cp("a", "1", b"old"), cp("b", "1", b"old")])
        # PostgreSQL text refuses NUL, so the second row fails the whole statement.
        with pytest.raises(PermanentError, match="22021"):
            await store.save([cp("a", "2", b"new"), cp("b", "2\x00", b"new")])

        old = {"a": cp("a", "1", b"old"), "b": cp("b", "1", b"old")}
        assert await store.load(["a", "b"]) == old


async def test_a_row_of_an_unknown_format_is_refused(pool: Any, table: str) -> None:
    async with PostgresCheckpointStore(pool, "ns", table=table) as store:
        await store.save([cp("a", "1", b"x")])
        await pool.execute(f"UPDATE {table} SET format = 99")

        with pytest.raises(PermanentError, match="format 99"):
            await store.load(["a"])


async def test_a_borrowed_pool_stays_open_after_stop(pool: Any, table: str) -> None:
    store = PostgresCheckpointStore(pool, "ns", table=table)
    await store.start()
    await store.stop()
    await store.stop()

    assert await pool.fetchval("SELECT 1") == 1
