"""/readyz follows the real dependencies: 503 naming PostgreSQL while it is down."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from service.app import Service
from service.checkpoints.file import FileCheckpointStore, file_stem
from service.config import Config, HttpServerConfig, PostgresConfig, Secret, load_config
from service.core.clock import ManualClock, SystemClock
from service.dev.postgres_server import EmbeddedPostgres
from service.metrics.collector import MetricsCollector
from service.ops.web import build_web_app
from service.postgres.schema import CHECKPOINT_TABLE, migrate
from service.sinks.postgres import PostgresSink
from service.wiring import build_outputs
from tests.e2e.workload import free_port
from tests.fakes.bus import MemoryBus
from tests.fakes.sinks import MemorySink

pytestmark = pytest.mark.integration


async def readyz(port: int) -> tuple[int, Any]:
    async with (
        aiohttp.ClientSession() as http,
        http.get(f"http://127.0.0.1:{port}/readyz") as r,
    ):
        return r.status, await r.json()


async def wait_for_status(port: int, status: int) -> Any:
    async with asyncio.timeout(30):
        while True:
            try:
                code, body = await readyz(port)
            except aiohttp.ClientConnectionError:  # the server is still starting
                code, body = 0, None
            if code == status:
                return body
            await asyncio.sleep(0.1)


async def test_readyz_turns_503_while_postgres_is_down_and_200_after(
    pg_restartable: EmbeddedPostgres, unique_name: str, tmp_path: Path
) -> None:
    clock = SystemClock()
    metrics = MetricsCollector(clock)
    port = free_port()
    pg = PostgresConfig(dsn=Secret(pg_restartable.dsn), table=f"agg_{unique_name}")
    config = Config(outputs=("postgres",), postgres=pg, http=HttpServerConfig("127.0.0.1", port))
    service = Service(
        config,
        bus=MemoryBus({"p0": []}),
        sinks=[PostgresSink(pg, metrics, clock)],
        store=FileCheckpointStore(str(tmp_path), "t"),
        metrics=metrics,
        clock=clock,
    )
    task = asyncio.create_task(service.run())
    try:
        body = await wait_for_status(port, 200)
        assert body["checks"]["postgres"] == "ok"
        await pg_restartable.stop()
        body = await wait_for_status(port, 503)
        assert body["checks"]["postgres"] != "ok"
        assert body["checks"]["bus"] == "ok"
        await pg_restartable.start()
        await wait_for_status(port, 200)
    finally:
        service.request_stop()
        await asyncio.wait_for(task, 30)


async def drain(service: Service, task: asyncio.Task[None], clock: ManualClock) -> None:
    """Stop the service, moving its clock on while the drain waits out a backoff."""
    service.request_stop()
    async with asyncio.timeout(20):
        while not task.done():
            parked = asyncio.ensure_future(clock.sleeping())
            await asyncio.wait({task, parked}, timeout=0.05)
            parked.cancel()
            clock.advance(1.0)
    await task


async def test_readyz_names_checkpoints_that_cannot_be_saved_and_recovers(
    tmp_path: Path,
) -> None:
    # Tests run as root, which ignores file modes: a directory where the temporary file
    # goes makes every save fail (IsADirectoryError), as a read-only or foreign-owned
    # state directory does under an arbitrary user id.
    failing_s = 20.0
    config = load_config(
        {
            "HTTP_HOST": "127.0.0.1",
            "HTTP_PORT": "0",
            "READINESS_OUTPUT_FAILING_TIMEOUT": str(failing_s),
        },
        dotenv=None,
    )
    clock = ManualClock()
    store = FileCheckpointStore(str(tmp_path), "t")
    blocker = tmp_path / f".{file_stem('t')}.checkpoint.tmp"
    blocker.mkdir()
    service = Service(
        config,
        bus=MemoryBus({"p0": []}, clock=clock),
        sinks=[MemorySink()],
        store=store,
        metrics=MetricsCollector(clock),
        clock=clock,
    )
    task = asyncio.create_task(service.run())
    try:
        async with asyncio.timeout(10):
            while service.web is None or service.phase != "running":
                await asyncio.sleep(0.01)
        port = service.web.port
        started = clock.monotonic()  # the first checkpoint (of the assignment) fails now
        # Poll, moving the service's clock one second per probe: 503 must come within
        # READINESS_OUTPUT_FAILING_TIMEOUT (plus one probe step and the 1 s cache).
        while (code_body := await readyz(port))[0] != 503:
            assert clock.monotonic() - started <= failing_s + 2, "still ready"
            clock.advance(1.0)
        body = code_body[1]
        assert clock.monotonic() - started >= failing_s, "503 before the timeout"
        assert "IsADirectoryError" in body["checks"]["checkpoints"], body
        assert "STATE_DIR" in body["checks"]["checkpoints"], body
        assert body["checks"]["memory"] == "ok" and body["checks"]["bus"] == "ok"

        blocker.rmdir()  # the cause removed: the next attempt saves
        recovered = clock.monotonic()
        while (code_body := await readyz(port))[0] != 200:
            # the hub's restart backoff (at most 30 s) and the breaker's cool-down (15 s)
            assert clock.monotonic() - recovered <= 60, code_body
            clock.advance(1.0)
            await asyncio.sleep(0.01)
        assert store.path.exists()
    finally:
        if blocker.is_dir():
            blocker.rmdir()
        await drain(service, task, clock)


@dataclass(frozen=True)
class Role:
    """A login role of this test with SELECT, INSERT, UPDATE on every table (the service's
    own, made by ``migrate`` as the superuser) and the superuser connection that grants."""

    name: str
    dsn: str
    admin: Any  # asyncpg connection as the superuser
    table: str
    dead_letters: str


@pytest.fixture
async def role(postgres_dsn: str, unique_name: str) -> AsyncIterator[Role]:
    table, dead_letters, name = f"agg_{unique_name}", f"dl_{unique_name}", f"r_{unique_name}"
    await migrate(postgres_dsn, table, dead_letters)
    admin = await asyncpg.connect(postgres_dsn)
    await admin.execute(f"CREATE ROLE {name} LOGIN")
    await admin.execute(f"GRANT USAGE ON SCHEMA public TO {name}")
    await admin.execute(f"GRANT SELECT, INSERT, UPDATE ON ALL TABLES IN SCHEMA public TO {name}")
    await admin.execute(f"GRANT USAGE ON ALL SEQUENCES IN SCHEMA public TO {name}")
    assert postgres_dsn.startswith("postgresql://postgres@")
    dsn = postgres_dsn.replace("postgres@", f"{name}@", 1)
    try:
        yield Role(name, dsn, admin, table, dead_letters)
    finally:
        await admin.execute(f"DROP TABLE IF EXISTS {table}, {dead_letters}")
        await admin.execute(f"DROP OWNED BY {name}")
        await admin.execute(f"DROP ROLE {name}")
        await admin.close()


async def test_readyz_names_a_postgres_output_whose_role_lost_insert_and_recovers(
    role: Role, tmp_path: Path
) -> None:
    clock = SystemClock()
    metrics = MetricsCollector(clock)
    port = free_port()
    pg = PostgresConfig(dsn=Secret(role.dsn), table=role.table, dead_letter_table=role.dead_letters)
    config = Config(outputs=("postgres",), postgres=pg, http=HttpServerConfig("127.0.0.1", port))
    bus = MemoryBus({"p0": []})
    service = Service(
        config,
        bus=bus,
        sinks=[PostgresSink(pg, metrics, clock)],
        store=FileCheckpointStore(str(tmp_path), "t"),
        metrics=metrics,
        clock=clock,
    )
    tables = f"{role.table}, {role.dead_letters}"
    task = asyncio.create_task(service.run())
    try:
        await wait_for_status(port, 200)
        await role.admin.execute(f"REVOKE INSERT, UPDATE ON {tables} FROM {role.name}")
        bus.add("p0", [b"{not json"])  # a dead letter: a write the role may no longer do
        body = await wait_for_status(port, 503)
        assert "42501" in body["checks"]["postgres"], body
        assert body["checks"]["bus"] == "ok"

        await role.admin.execute(f"GRANT INSERT, UPDATE ON {tables} TO {role.name}")
        await wait_for_status(port, 200)
        assert await role.admin.fetchval(f"SELECT count(*) FROM {role.dead_letters}") == 1
    finally:
        service.request_stop()
        await asyncio.wait_for(task, 30)


async def test_readyz_names_checkpoints_saved_in_postgres_when_the_role_may_not_write_them(
    role: Role,
) -> None:
    # PostgreSQL as the output: checkpoints commit in its write transactions (the
    # wiring's SharedTransaction); a role that may not write vabus_checkpoints fails them.
    port = free_port()
    pg = PostgresConfig(dsn=Secret(role.dsn), table=role.table, dead_letter_table=role.dead_letters)
    config = Config(outputs=("postgres",), postgres=pg, http=HttpServerConfig("127.0.0.1", port))
    clock = SystemClock()
    metrics = MetricsCollector(clock)
    outputs = build_outputs(config, metrics, clock)
    assert outputs.shared_transaction is not None
    bus = MemoryBus({"p0": []})
    service = Service(
        config,
        bus=bus,
        sinks=outputs.sinks,
        store=outputs.store,
        metrics=metrics,
        clock=clock,
        shared_transaction=outputs.shared_transaction,
    )
    task = asyncio.create_task(service.run())
    try:
        await wait_for_status(port, 200)
        await role.admin.execute(f"REVOKE INSERT, UPDATE ON {CHECKPOINT_TABLE} FROM {role.name}")
        event = {"name": "a", "value": 1, "timestamp": time.time()}
        bus.add("p0", [orjson.dumps(event)])  # changes state: a checkpoint is due
        body = await wait_for_status(port, 503)
        assert "42501" in body["checks"]["checkpoints"], body
        assert "in output postgres's transaction" in body["checks"]["checkpoints"]

        await role.admin.execute(f"GRANT INSERT, UPDATE ON {CHECKPOINT_TABLE} TO {role.name}")
        await wait_for_status(port, 200)
    finally:
        service.request_stop()
        await asyncio.wait_for(task, 30)


async def test_a_probe_flood_runs_one_postgres_check_and_takes_one_connection(
    postgres_dsn: str, unique_name: str
) -> None:
    probes = 100
    arrived = asyncio.Event()
    seen = 0

    @web.middleware
    async def counting(request: web.Request, handler: Any) -> web.StreamResponse:
        nonlocal seen
        seen += 1
        if seen == probes:
            arrived.set()  # every probe is in flight: no timing involved
        response: web.StreamResponse = await handler(request)
        return response

    metrics = MetricsCollector(ManualClock())  # the answer's age stands still
    pg = PostgresConfig(
        dsn=Secret(postgres_dsn), table=f"agg_{unique_name}", pool_min_size=1, pool_max_size=4
    )
    sink = PostgresSink(pg, metrics, SystemClock())
    await sink.start()
    checks = 0

    async def check() -> None:  # the sink's own check, counted, held until all are in
        nonlocal checks
        checks += 1
        await arrived.wait()
        await sink.check()

    app = build_web_app(metrics, {"postgres": check}, dict, readiness_timeout_s=60)
    app.middlewares.append(counting)
    try:
        async with (
            TestServer(app) as server,
            aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as http,
        ):

            async def probe() -> int:
                async with http.get(server.make_url("/readyz")) as r:
                    return r.status

            codes = await asyncio.gather(*(probe() for _ in range(probes)))
        assert codes == [200] * probes
        assert checks == 1
        assert sink.pool.get_size() == 1  # the pool never grew past its one connection
    finally:
        await sink.stop()
