"""PostgresLease against a real PostgreSQL: one leader per namespace, a takeover within
the stated bound when the leader's connection closes, a leader that notices its session
ending (a server restart) and competes again."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import asyncpg
import pytest

from service.core.clock import SystemClock
from service.dev.postgres_server import EmbeddedPostgres
from service.lease.postgres import CHECK_S, POLL_S, PostgresLease

pytestmark = pytest.mark.integration

TAKEOVER_BOUND_S = POLL_S + 1.0  # a poll interval, plus slack for a shared machine
LOSS_BOUND_S = CHECK_S + 1.0


@pytest.fixture
async def leases(postgres_dsn: str, unique_name: str) -> AsyncIterator[list[PostgresLease]]:
    made = [PostgresLease(postgres_dsn, f"http:{unique_name}", SystemClock()) for _ in range(2)]
    yield made
    for lease in made:
        await lease.stop()


async def one_leader(
    leases: list[PostgresLease],
) -> tuple[PostgresLease, PostgresLease, asyncio.Task[None]]:
    """Both compete; returns (leader, standby, the standby's pending acquire)."""
    tasks = [asyncio.create_task(lease.acquire()) for lease in leases]
    done, pending = await asyncio.wait(tasks, timeout=10, return_when=asyncio.FIRST_COMPLETED)
    assert len(done) == 1, "no leader (or two) within 10 s"
    await asyncio.sleep(3 * POLL_S)  # the other keeps polling all along
    assert len(pending) == 1 and not next(iter(pending)).done(), "two leaders"
    leader = leases[tasks.index(next(iter(done)))]
    standby = leases[1 - leases.index(leader)]
    assert (leader.role, standby.role) == ("leader", "standby")
    return leader, standby, next(iter(pending))


async def test_exactly_one_leader_and_the_standby_takes_over_when_its_connection_closes(
    leases: list[PostgresLease],
) -> None:
    leader, standby, pending = await one_leader(leases)
    holder = standby.describe()["holder"]
    assert holder is not None and holder["name"] == leader.application_name

    started = time.monotonic()
    leader._conn.terminate()  # the socket closes without a goodbye, as on kill -9
    await asyncio.wait_for(pending, TAKEOVER_BOUND_S + 5)
    took = time.monotonic() - started
    print(f"\n[lease] takeover {took:.2f} s after the leader's connection closed")
    assert took <= TAKEOVER_BOUND_S
    assert standby.role == "leader"


async def test_stop_releases_the_lease_for_the_standby(leases: list[PostgresLease]) -> None:
    leader, standby, pending = await one_leader(leases)
    started = time.monotonic()
    await leader.stop()
    await asyncio.wait_for(pending, TAKEOVER_BOUND_S + 5)
    assert time.monotonic() - started <= TAKEOVER_BOUND_S
    assert (leader.role, standby.role) == ("standby", "leader")


async def test_the_leader_notices_its_session_ending_and_can_compete_again(
    leases: list[PostgresLease], postgres_dsn: str
) -> None:
    leader, standby, pending = await one_leader(leases)
    watch = asyncio.create_task(leader.wait_lost())
    await asyncio.sleep(0.1)
    assert not watch.done()
    # By the leader's own server pid: both leases live in this process under one
    # application_name, and fetchval() would end only the first session it matches.
    server_pid = leader._conn.get_server_pid()
    admin = await asyncpg.connect(postgres_dsn)
    try:  # what a server restart does to every session
        terminated = await admin.fetchval("SELECT pg_terminate_backend($1)", server_pid)
    finally:
        await admin.close()
    assert terminated
    started = time.monotonic()
    reason = await asyncio.wait_for(watch, LOSS_BOUND_S + 5)
    assert time.monotonic() - started <= LOSS_BOUND_S
    assert "connection" in reason and leader.role == "standby" and leader.losses == 1
    await asyncio.wait_for(pending, TAKEOVER_BOUND_S + 5)  # the standby took it meanwhile
    again = asyncio.create_task(leader.acquire())
    await asyncio.sleep(2 * POLL_S)
    assert not again.done(), "the old leader must not get it back while it is held"
    await standby.stop()
    await asyncio.wait_for(again, TAKEOVER_BOUND_S + 5)
    assert leader.describe()["role"] == "leader"


async def test_namespaces_do_not_share_a_lease(postgres_dsn: str, unique_name: str) -> None:
    one = PostgresLease(postgres_dsn, f"http:{unique_name}-1", SystemClock())
    two = PostgresLease(postgres_dsn, f"http:{unique_name}-2", SystemClock())
    try:
        await asyncio.wait_for(asyncio.gather(one.acquire(), two.acquire()), 10)
        assert one.role == two.role == "leader"
    finally:
        await one.stop()
        await two.stop()


async def test_a_restart_of_postgresql_loses_the_lease_and_it_is_taken_again(
    pg_restartable: EmbeddedPostgres, unique_name: str
) -> None:
    lease = PostgresLease(pg_restartable.dsn, f"http:{unique_name}", SystemClock())
    try:
        await asyncio.wait_for(lease.acquire(), 10)
        watch = asyncio.create_task(lease.wait_lost())
        await pg_restartable.stop()
        reason = await asyncio.wait_for(watch, LOSS_BOUND_S + 5)
        assert lease.role == "standby", reason
        again = asyncio.create_task(lease.acquire())  # retries while the server is down
        await asyncio.sleep(2 * POLL_S)
        assert not again.done() and lease.describe()["error"]
        await pg_restartable.start()
        await asyncio.wait_for(again, TAKEOVER_BOUND_S + 10)
        assert lease.describe()["role"] == "leader" and lease.describe()["error"] is None
    finally:
        await lease.stop()
