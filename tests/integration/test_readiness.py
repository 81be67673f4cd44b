"""/readyz follows the real dependencies: 503 naming PostgreSQL while it is down."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from service.app import Service
from service.bus.memory import MemoryBus
from service.checkpoints.file import FileCheckpointStore
from service.clock import SystemClock
from service.config import Config, HttpServerConfig, PostgresConfig, Secret
from service.dev.devstack import EmbeddedPostgres
from service.ops.metrics import MetricsCollector
from service.sinks.postgres import PostgresSink
from tests.e2e.workload import free_port

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
        sinks=[PostgresSink(pg, metrics)],
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
