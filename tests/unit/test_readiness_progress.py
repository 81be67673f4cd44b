"""/readyz watches progress: a partition sitting on unread data without delivering turns
it 503 naming that partition, and 200 again once it moves; an output fails readiness
only after failing for READINESS_OUTPUT_FAILING_TIMEOUT."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import aiohttp
import orjson

from service.app import Service
from service.checkpoints.file import FileCheckpointStore
from service.config import load_config
from service.core.clock import ManualClock
from service.metrics.collector import MetricsCollector
from service.ops.readiness import READINESS_CACHE_S
from tests.fakes.bus import MemoryBus
from tests.fakes.sinks import MemorySink

START = 1_699_999_980.0


def ev(name: str, ts: float) -> bytes:
    return orjson.dumps({"name": name, "value": 1, "timestamp": ts})


async def readyz(port: int) -> tuple[int, dict[str, Any]]:
    async with (
        aiohttp.ClientSession() as http,
        http.get(f"http://127.0.0.1:{port}/readyz") as response,
    ):
        return response.status, await response.json()


async def until(cond: Any, what: str) -> None:
    async with asyncio.timeout(10):
        while not await cond():
            await asyncio.sleep(0.01)


async def test_a_stalled_partition_with_unread_data_makes_readyz_503_naming_it(
    tmp_path: Path,
) -> None:
    config = load_config(
        {
            "AGGREGATION_INTERVAL": "60",
            "HTTP_HOST": "127.0.0.1",
            "HTTP_PORT": "0",
            "READINESS_STALL_TIMEOUT": "30",
            "READINESS_OUTPUT_FAILING_TIMEOUT": "20",
        },
        dotenv=None,
    )
    clock = ManualClock(START + 100)
    bus = MemoryBus({"p0": [ev("a", START + 1)], "p1": [ev("b", START + 1)]}, clock=clock)
    sink = MemorySink()
    service = Service(
        config,
        bus=bus,
        sinks=[sink],
        store=FileCheckpointStore(str(tmp_path), "t"),
        metrics=MetricsCollector(clock),
        clock=clock,
    )
    task = asyncio.create_task(service.run())
    try:
        await until(lambda: _async(len(service.aggregator.partitions()) == 2), "both assigned")
        assert service.web is not None
        port = service.web.port

        async def status_is(code: int) -> bool:
            if (await readyz(port))[0] == code:
                return True
            clock.advance(READINESS_CACHE_S)  # past the answer this probe may have reused
            return False

        await until(lambda: status_is(200), "ready")
        bus.hold("p1")
        bus.add("p1", [ev("b", START + 2), ev("b", START + 3)])
        bus.report("p1")  # the bus knows p1 has unread data, but delivers none of it

        async def p1_reported() -> bool:
            return bool(service.aggregator.partitions()["p1"]["lag"] == 2)

        await until(p1_reported, "the report on p1")
        clock.advance(29)
        p0_before = service.aggregator.partitions()["p0"]["position"]
        bus.add("p0", [ev("a", START + 2)])  # p0 keeps moving

        async def p0_delivered() -> bool:
            return bool(service.aggregator.partitions()["p0"]["position"] != p0_before)

        await until(p0_delivered, "p0's new event taken")  # else p0 would look stalled too
        assert (await readyz(port))[0] == 200
        clock.advance(2)
        code, body = await readyz(port)
        assert code == 503
        assert "p1" in body["checks"]["partitions"] and "p0" not in body["checks"]["partitions"]
        bus.release("p1")
        await until(lambda: status_is(200), "ready again once p1 delivers")

        sink.fail_next(10_000)  # an output that keeps failing
        bus.add("p0", [b"{not json"])  # a dead letter: something to write

        async def failing() -> bool:
            return bool(service.sender.degraded)

        await until(failing, "the output failing")
        clock.advance(READINESS_CACHE_S)
        assert (await readyz(port))[0] == 200  # not yet for READINESS_OUTPUT_FAILING_TIMEOUT
        clock.advance(21)
        code, body = await readyz(port)
        assert code == 503 and "memory" in body["checks"]
    finally:
        service.request_stop()
        sink.fail_next(0)
        async with asyncio.timeout(10):  # the drain waits out the sender's backoff
            while not task.done():
                await clock.sleeping()
                clock.advance(1.0)
                await asyncio.wait({task}, timeout=0.01)
        await task


async def _async(value: bool) -> bool:
    return value
