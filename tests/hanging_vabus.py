"""A VaBus HTTP server for tests that can stop answering (a hung source, contract
§12.8): shared by the integration and e2e tests of several sources."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from typing import Any

import orjson
from aiohttp import web

from tests.e2e.workload import free_port

Event = dict[str, Any]


class HangingVabus:
    """A VaBus HTTP server (protocol v1: long-poll ``GET /events`` with cursors) that
    stops answering once it has handed out ``hang_at`` events: every request then waits
    until :meth:`release`."""

    def __init__(self) -> None:
        self.events: list[bytes] = []
        self.handed = 0  # the largest cursor answered
        self.hang_at: int | None = None
        self.hung_since: float | None = None  # monotonic time it stopped answering
        self.answered_while_hung = 0
        self.hanging = asyncio.Event()
        self._released = asyncio.Event()
        self._released.set()
        self._added = asyncio.Event()

    def add(self, events: list[Event]) -> None:
        self.events.extend(orjson.dumps(e) for e in events)
        self._added.set()

    def hang(self) -> None:
        self.hung_since = time.monotonic()
        self._released.clear()
        self.hanging.set()

    def release(self) -> None:
        self.hang_at = None
        self._released.set()

    @property
    def hung(self) -> bool:
        return not self._released.is_set()

    async def get_events(self, request: web.Request) -> web.Response:
        cursor = int(request.query.get("cursor", "0"))
        limit = int(request.query["limit"])
        wait = float(request.query.get("wait", "0"))
        if self.hang_at is not None and cursor >= self.hang_at and not self.hung:
            self.hang()  # the request right after the last events it hands out
        await self._released.wait()
        deadline = time.monotonic() + wait
        while limit and cursor >= len(self.events) and time.monotonic() < deadline:
            self._added.clear()
            try:
                async with asyncio.timeout(deadline - time.monotonic()):
                    await self._added.wait()
            except TimeoutError:
                break
        await self._released.wait()  # a long poll under way when it hung answers not
        if self.hung:  # pragma: no cover - would make the test's claim false
            self.answered_while_hung += 1
        batch = self.events[cursor : cursor + limit]
        self.handed = max(self.handed, cursor + len(batch))
        body = (
            b'{"events":['
            + b",".join(batch)
            + b'],"cursor":"'
            + str(cursor + len(batch)).encode()
            + b'"}'
        )
        return web.Response(body=body, content_type="application/json")

    async def post_metrics(self, request: web.Request) -> web.Response:
        await request.read()
        return web.Response(status=204)


@contextlib.asynccontextmanager
async def serve_hanging_vabus() -> AsyncIterator[tuple[HangingVabus, str]]:
    """A :class:`HangingVabus` on 127.0.0.1 and its URL; released before it stops."""
    server = HangingVabus()
    app = web.Application()
    app.router.add_get("/events", server.get_events)
    app.router.add_post("/metrics", server.post_metrics)
    runner = web.AppRunner(app, shutdown_timeout=0.5)
    await runner.setup()
    port = free_port()
    site = web.TCPSite(runner, "127.0.0.1", port)
    await site.start()
    try:
        yield server, f"http://127.0.0.1:{port}"
    finally:
        server.release()
        await runner.cleanup()
