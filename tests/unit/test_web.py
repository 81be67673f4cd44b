from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from prometheus_client.parser import text_string_to_metric_families

from service.core.clock import ManualClock
from service.core.errors import TransientError
from service.metrics.collector import MetricsCollector
from service.ops.web import ReadinessCheck, WebServer, build_web_app


async def passes() -> None:
    return None


async def refuses() -> None:
    raise TransientError("postgres at 127.0.0.1:5432 refused the connection")


async def fails_without_message() -> None:
    raise ConnectionResetError


async def hangs() -> None:
    await asyncio.Event().wait()


def no_status() -> Mapping[str, Any]:
    return {}


@asynccontextmanager
async def client_for(
    metrics: MetricsCollector | None = None,
    readiness: Mapping[str, ReadinessCheck] | None = None,
    status: Any = no_status,
    readiness_timeout_s: float = 2.0,
) -> AsyncIterator[TestClient[web.Request, web.Application]]:
    app = build_web_app(
        metrics or MetricsCollector(ManualClock()),
        readiness or {},
        status,
        readiness_timeout_s=readiness_timeout_s,
    )
    async with TestClient(TestServer(app)) as client:
        yield client


async def test_healthz_answers_ok_while_the_loop_runs() -> None:
    async with client_for() as client:
        resp = await client.get("/healthz")
        assert resp.status == 200
        assert await resp.json() == {"status": "ok"}


async def test_readyz_is_ready_when_every_check_passes() -> None:
    async with client_for(readiness={"bus": passes, "postgres": passes}) as client:
        resp = await client.get("/readyz")
        assert resp.status == 200
        assert await resp.json() == {"status": "ready", "checks": {"bus": "ok", "postgres": "ok"}}


async def test_readyz_answers_503_naming_each_failing_dependency() -> None:
    checks = {"bus": passes, "postgres": refuses, "kafka": fails_without_message}
    async with client_for(readiness=checks) as client:
        resp = await client.get("/readyz")
        assert resp.status == 503
        assert await resp.json() == {
            "status": "not_ready",
            "checks": {
                "bus": "ok",
                "postgres": "TransientError: postgres at 127.0.0.1:5432 refused the connection",
                "kafka": "ConnectionResetError",
            },
        }


async def test_readyz_runs_checks_concurrently_and_reports_a_hung_one_as_timed_out() -> None:
    checks = {"a": hangs, "b": hangs, "c": hangs, "d": passes}
    async with client_for(readiness=checks, readiness_timeout_s=0.5) as client:
        # In sequence the three hung checks would need 1.5 s; concurrently, 0.5 s.
        async with asyncio.timeout(1.2):
            resp = await client.get("/readyz")
        body = await resp.json()
    assert resp.status == 503
    timed_out = "no answer within 0.5 s"
    assert body["checks"] == {"a": timed_out, "b": timed_out, "c": timed_out, "d": "ok"}


async def test_metrics_endpoint_serves_parsable_prometheus_text() -> None:
    metrics = MetricsCollector(ManualClock())
    metrics.on_messages_received("http", messages=2, events=5)
    async with client_for(metrics=metrics) as client:
        resp = await client.get("/metrics")
        assert resp.status == 200
        assert resp.headers["Content-Type"] == metrics.content_type
        text = await resp.text()
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }
    assert samples[("vabus_aggregator_events_received_total", ())] == 5
    assert samples[("vabus_aggregator_messages_received_total", (("transport", "http"),))] == 2


async def test_status_merges_the_status_callable_over_the_metrics_snapshot() -> None:
    metrics = MetricsCollector(ManualClock())
    metrics.set_open_windows(3)

    def status() -> Mapping[str, Any]:
        return {"state": "running", "bus": "kafka"}

    async with client_for(metrics=metrics, status=status) as client:
        resp = await client.get("/status")
        assert resp.status == 200
        body = await resp.json()
    assert body["state"] == "running"
    assert body["bus"] == "kafka"
    assert body["open_windows"] == 3
    assert body["emit_to_durable_seconds"] == {"count": 0, "p50": None, "p95": None, "p99": None}


async def test_web_server_serves_on_a_free_port_and_stops_idempotently() -> None:
    app = build_web_app(MetricsCollector(ManualClock()), {}, no_status)
    server = WebServer("127.0.0.1", 0, app)
    async with server:
        await server.start()  # a second start is a no-op
        assert server.port > 0
        async with aiohttp.ClientSession() as session:
            url = f"http://127.0.0.1:{server.port}/healthz"
            async with session.get(url) as resp:
                assert resp.status == 200
    await server.stop()
    with pytest.raises(RuntimeError):
        _ = server.port


def arrivals(path: str, count: int) -> tuple[Any, asyncio.Event]:
    """A middleware that sets the event once ``count`` requests for ``path`` came in: a
    barrier that proves they were all in flight at once, without timing anything."""
    arrived = asyncio.Event()
    seen = 0

    @web.middleware
    async def counting(request: web.Request, handler: Any) -> web.StreamResponse:
        nonlocal seen
        if request.path == path:
            seen += 1
            if seen == count:
                arrived.set()
        response: web.StreamResponse = await handler(request)
        return response

    return counting, arrived


async def test_concurrent_probes_share_one_readiness_check() -> None:
    probes = 50
    counting, arrived = arrivals("/readyz", probes)
    calls = 0

    async def check() -> None:
        nonlocal calls
        calls += 1
        await arrived.wait()  # held until every probe is in
        raise TransientError("postgres down")

    clock = ManualClock()
    app = build_web_app(
        MetricsCollector(clock), {"postgres": check}, no_status, readiness_timeout_s=30
    )
    app.middlewares.append(counting)
    async with (
        TestServer(app) as server,
        aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as http,
    ):

        async def probe() -> tuple[int, Any]:
            async with http.get(server.make_url("/readyz")) as r:
                return r.status, await r.json()

        answers = await asyncio.gather(*(probe() for _ in range(probes)))
    assert calls == 1
    assert {code for code, _ in answers} == {503}
    assert all(body["checks"]["postgres"].endswith("postgres down") for _, body in answers)


async def test_a_readiness_answer_is_reused_for_a_second_then_checked_again() -> None:
    clock = ManualClock()
    calls = 0
    failing = False

    async def check() -> None:
        nonlocal calls
        calls += 1
        if failing:
            raise TransientError("kafka down")

    app = build_web_app(MetricsCollector(clock), {"kafka": check}, no_status)
    async with TestClient(TestServer(app)) as client:
        assert (await client.get("/readyz")).status == 200
        failing = True
        clock.advance(0.9)
        assert (await client.get("/readyz")).status == 200  # the answer of 0.9 s ago
        assert calls == 1
        clock.advance(0.1)
        assert (await client.get("/readyz")).status == 503
        assert calls == 2
