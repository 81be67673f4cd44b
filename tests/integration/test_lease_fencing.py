"""Fencing against a real PostgreSQL: an HTTP-bus leader whose lease session ended
cannot commit a checkpoint or output rows after the instance that took the lease over.

Two services are wired as production wires them (``build_service``: lease, PostgreSQL
sink and checkpoint store); their buses never run, the test drives the sender directly.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import asyncpg
import pytest

from service.app import Service, build_service
from service.bus.http import PARTITION
from service.checkpoints.base import PartitionCheckpoint
from service.config import load_config
from service.core.confirmation import Confirmation
from service.core.errors import PermanentError
from service.core.events import Aggregate
from service.pipeline.flow import Checkpoint, Outputs
from service.pipeline.hub import Delivery

pytestmark = pytest.mark.integration


@pytest.fixture
async def services(postgres_dsn: str, unique_name: str) -> AsyncIterator[list[Service]]:
    config = load_config(
        {
            "VABUS_URL": f"http://127.0.0.1:9/{unique_name}",  # never fetched
            "STORAGE_TYPE": "postgres",
            "POSTGRES_DSN": postgres_dsn,
            "POSTGRES_TABLE": unique_name,
        },
        dotenv=None,
    )
    made = [build_service(config) for _ in range(2)]
    for svc in made:
        for sink in svc.sinks:
            await sink.start()
        await svc.store.start()
    yield made
    for svc in made:
        assert svc.lease is not None
        await svc.lease.stop()
        await svc.store.stop()
        for sink in svc.sinks:
            await sink.stop()
    conn = await asyncpg.connect(postgres_dsn)
    try:
        await conn.execute(f"DROP TABLE IF EXISTS {unique_name}")
    finally:
        await conn.close()


def _aggregate(name: str) -> Aggregate:
    return Aggregate(name, "count", 1.0, 1, 60.0, 120.0, 130.0)


async def _checkpoint(svc: Service, position: str, name: str) -> Checkpoint:
    """Through the sender, as the pipeline does: one aggregate, then its checkpoint."""
    cp = Checkpoint(
        [PartitionCheckpoint(PARTITION, position, b"state-" + position.encode())],
        Confirmation(),
    )
    await svc.sender.handle(Delivery([Outputs([_aggregate(name)]), cp]))
    return cp


async def _stored(dsn: str, namespace: str, table: str) -> tuple[str, list[str]]:
    conn = await asyncpg.connect(dsn)
    try:
        position = await conn.fetchval(
            "SELECT position FROM vabus_checkpoints WHERE namespace = $1 AND partition = $2",
            namespace,
            PARTITION,
        )
        names = await conn.fetch(f"SELECT name FROM {table} ORDER BY name")
    finally:
        await conn.close()
    return position, [r["name"] for r in names]


async def test_a_leader_whose_session_ended_cannot_commit_after_its_successor(
    services: list[Service], postgres_dsn: str, unique_name: str
) -> None:
    a, b = services
    assert a.lease is not None and b.lease is not None
    lease_a, lease_b = a.lease, b.lease
    namespace = lease_a.namespace
    await asyncio.wait_for(lease_a.acquire(), 10)
    taking_over = asyncio.create_task(lease_b.acquire())
    await _checkpoint(a, "a1", "from_a1")

    # End the leader's lease session by its own server pid (as a server restart or a
    # network cut would); its pooled write connections live on.
    pid = lease_a.describe()["holder"]["pid"]
    admin = await asyncpg.connect(postgres_dsn)
    try:
        assert await admin.fetchval("SELECT pg_terminate_backend($1)", pid)
    finally:
        await admin.close()
    await asyncio.wait_for(taking_over, 10)
    restored = await b.store.load([PARTITION])
    assert restored[PARTITION].position == "a1"
    await _checkpoint(b, "b1", "from_b1")

    # The old leader, not yet aware, checkpoints what it read meanwhile.
    late = await asyncio.wait_for(_checkpoint(a, "a2", "from_a2"), 10)

    position, names = await _stored(postgres_dsn, namespace, unique_name)
    assert position == "b1", "the old leader's checkpoint landed after its successor's"
    assert names == ["from_a1", "from_b1"], "the old leader's rows landed after the takeover"
    failure = late.done.failure if late.done is not None else None
    assert isinstance(failure, PermanentError) and "fenced" in str(failure)
    # ... and it treats that as losing the lease: it stands by at once.
    reason = await asyncio.wait_for(lease_a.wait_lost(), 5)
    assert "fenced" in reason
    assert (lease_a.role, lease_b.role) == ("standby", "leader")


async def test_writer_sessions_ask_the_server_to_drop_them_soon_when_their_host_vanishes(
    services: list[Service],
) -> None:
    """A write's row lock on the lease lives as long as its session: a successor's
    acquisition must not wait hours for the operating system's keepalive."""
    svc = services[0]
    pools = [svc.sinks[0].pool, svc.store._pool]  # type: ignore[attr-defined]
    for pool in pools:
        async with pool.acquire() as conn:
            assert await conn.fetchval("SHOW tcp_keepalives_idle") == "5"
            assert await conn.fetchval("SHOW tcp_keepalives_count") == "3"
