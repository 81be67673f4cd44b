"""PostgresCheckpointStore owners against a real PostgreSQL: a store that lost a
partition to another one (a consumer-group member whose session expired while it kept
reading) cannot save that partition's checkpoint after the new owner restored it."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest

from service.checkpoints.base import PartitionCheckpoint
from service.checkpoints.postgres import PostgresCheckpointStore
from service.core.errors import PermanentError

pytestmark = pytest.mark.integration

NAMESPACE = "kafka:events:group"


def cp(partition: str, position: str) -> PartitionCheckpoint:
    return PartitionCheckpoint(partition, position, position.encode())


@pytest.fixture
async def pool(postgres_dsn: str) -> AsyncIterator[Any]:
    p = await asyncpg.create_pool(postgres_dsn, min_size=1, max_size=4)
    yield p
    await p.close()


@pytest.fixture
async def stores(pool: Any, unique_name: str) -> AsyncIterator[list[PostgresCheckpointStore]]:
    table = f"{unique_name}_cp"
    made = [PostgresCheckpointStore(pool, NAMESPACE, table=table) for _ in range(2)]
    for store in made:
        await store.start()
    yield made
    for store in made:
        await store.stop()
    await pool.execute(f"DROP TABLE IF EXISTS {table}")


async def _claim_blocked(pool: Any, within_s: float = 5.0) -> bool:
    """Whether a session waits on a row lock of the owners table, within ``within_s``."""
    deadline = asyncio.get_running_loop().time() + within_s
    while asyncio.get_running_loop().time() < deadline:
        waiting = await pool.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
            "AND query LIKE '%INSERT INTO vabus_partition_owners%'"
        )
        if waiting:
            return True
        await asyncio.sleep(0.05)
    return False


async def test_the_old_owner_cannot_save_after_the_new_owner_restored(
    stores: list[PostgresCheckpointStore],
) -> None:
    old, new = stores
    await old.load(["0", "1"])
    await old.save([cp("0", "10"), cp("1", "10")])

    assert (await new.load(["0"]))["0"].position == "10"  # partition 0 moves
    await new.save([cp("0", "20")])
    with pytest.raises(PermanentError, match="fenced"):
        await old.save([cp("0", "15")])  # the old owner, not yet aware
    await old.save([cp("1", "15")])  # what it still owns, it saves

    assert {p: c.position for p, c in (await new.load(["0", "1"])).items()} == {
        "0": "20",
        "1": "15",
    }


async def test_a_restore_waits_for_a_save_under_way_and_reads_it(
    stores: list[PostgresCheckpointStore], pool: Any
) -> None:
    old, new = stores
    await old.load(["0"])
    async with pool.acquire() as conn, conn.transaction():
        await old.save_in(conn, [cp("0", "30")])  # checked, not committed yet
        restoring = asyncio.create_task(new.load(["0"]))
        assert await _claim_blocked(pool), "the claim did not wait for the save under way"
        assert not restoring.done()
    assert (await asyncio.wait_for(restoring, 5))["0"].position == "30"
