"""HTTP_AUTH_TOKEN: /, /status and /metrics need the bearer token, on a worker's own
surface and on the WORKERS=N supervisor's; /healthz and /readyz stay open for probes."""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from typing import Any, cast

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from service.core.clock import ManualClock
from service.metrics.collector import MetricsCollector
from service.ops.web import WebServer, build_web_app
from service.workers.slot import WorkerSlot
from service.workers.surface import WorkerClient, build_surface_app

TOKEN = "t0ken-7f3a9c51d2e8a6b0c4"
PROTECTED = ("/", "/status", "/metrics")
OPEN = ("/healthz", "/readyz")


def status() -> Mapping[str, Any]:
    return {"phase": "running"}


async def ready() -> None:
    return None


def worker_app(token: str = TOKEN) -> web.Application:
    return build_web_app(MetricsCollector(ManualClock()), {"bus": ready}, status, auth_token=token)


@asynccontextmanager
async def client(app: web.Application) -> AsyncIterator[TestClient[web.Request, web.Application]]:
    async with TestClient(TestServer(app)) as c:
        yield c


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@pytest.mark.parametrize("path", PROTECTED)
@pytest.mark.parametrize(
    "headers",
    [
        {},
        bearer("wrong-token-of-some-length"),
        bearer(TOKEN[:-1]),
        bearer(TOKEN + "x"),
        {"Authorization": TOKEN},
        {"Authorization": f"Basic {TOKEN}"},
        bearer(""),
    ],
    ids=["none", "wrong", "prefix", "longer", "no-scheme", "basic", "empty"],
)
async def test_protected_paths_answer_401_with_a_bearer_challenge(
    path: str, headers: dict[str, str]
) -> None:
    async with client(worker_app()) as c:
        resp = await c.get(path, headers=headers)
        assert resp.status == 401
        assert resp.headers["WWW-Authenticate"].startswith("Bearer")
        body = await resp.text()
    assert TOKEN not in body
    if path != "/":  # the page is static: its data comes from /status
        assert "events_received" not in body and "vabus_aggregator_" not in body


@pytest.mark.parametrize("path", PROTECTED)
async def test_protected_paths_answer_with_the_token(path: str) -> None:
    async with client(worker_app()) as c:
        for scheme in ("Bearer", "bearer"):
            resp = await c.get(path, headers={"Authorization": f"{scheme} {TOKEN}"})
            assert resp.status == 200, path


@pytest.mark.parametrize("path", OPEN)
async def test_probes_stay_open_without_a_token(path: str) -> None:
    async with client(worker_app()) as c:
        resp = await c.get(path)
        assert resp.status == 200
        assert TOKEN not in await resp.text()


async def test_the_page_401_is_the_page_itself_so_a_browser_can_ask_for_the_token() -> None:
    async with client(worker_app()) as c:
        denied = await c.get("/")
        page = await denied.text()
        allowed = await (await c.get("/", headers=bearer(TOKEN))).text()
    assert denied.status == 401 and denied.content_type == "text/html"
    assert page == allowed
    assert 'id="login"' in page and "#token=" in page and "Authorization" in page


async def test_without_a_token_everything_is_open() -> None:
    async with client(worker_app(token="")) as c:
        for path in PROTECTED + OPEN:
            assert (await c.get(path)).status == 200, path


class _Process:
    """What a slot reads of a running worker process."""

    pid = 4242
    returncode = None


class _Supervised:
    def __init__(self, slots: Sequence[WorkerSlot]) -> None:
        self._slots = slots

    @property
    def running(self) -> bool:
        return True

    @property
    def slots(self) -> Sequence[WorkerSlot]:
        return self._slots

    def monotonic(self) -> float:
        return 0.0

    def status(self) -> dict[str, Any]:
        return {"workers": {str(s.index): {} for s in self._slots}}


async def test_the_workers_surface_needs_the_token_and_sends_it_to_the_workers() -> None:
    # Workers read the same HTTP_AUTH_TOKEN: the supervisor must send it to reach them.
    async with WebServer("127.0.0.1", 0, worker_app()) as worker:
        slot = WorkerSlot(0)
        slot.started(cast(Any, _Process()), worker.port, 0.0, 0.0)
        async with WorkerClient(TOKEN) as workers:
            surface = build_surface_app(_Supervised([slot]), workers, TOKEN)
            async with client(surface) as c:
                for path in PROTECTED:
                    resp = await c.get(path)
                    assert resp.status == 401, path
                    assert resp.headers["WWW-Authenticate"].startswith("Bearer")
                for path in OPEN:
                    assert (await c.get(path)).status == 200, path
                resp = await c.get("/status", headers=bearer(TOKEN))
                assert resp.status == 200
                assert (await resp.json())["workers"]["0"]["phase"] == "running"
                resp = await c.get("/metrics", headers=bearer(TOKEN))
                text = await resp.text()
                assert resp.status == 200 and 'worker_scrape_success{worker="0"} 1.0' in text


async def test_a_worker_client_without_the_token_is_refused_by_a_guarded_worker() -> None:
    async with WebServer("127.0.0.1", 0, worker_app()) as worker, aiohttp.ClientSession() as http:
        url = f"http://127.0.0.1:{worker.port}/status"
        async with http.get(url) as resp:
            assert resp.status == 401
