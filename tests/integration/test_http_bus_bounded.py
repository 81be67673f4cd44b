"""HttpBus against a hostile VaBus: a real aiohttp server on a free loopback port that
answers, while told to, with an endless body, a 2 GB ``Content-Length``, a gzip bomb,
ten times the events asked for or a bad cursor. Each time the bus stays alive, its
memory stays bounded (the peak RSS of this process, measured), nothing is taken from
the bad answers, and once the server behaves again every event arrives exactly once.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import zlib
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiohttp import web

from service.bus.base import BusItem, SourceBatch
from service.bus.http import HttpBus
from service.checkpoints.base import PartitionCheckpoint
from service.config import BusConfig
from service.core.clock import SystemClock
from service.core.errors import TransientError
from service.core.retry import Backoff
from service.metrics.collector import MetricsCollector

CAP = 1024 * 1024  # VABUS_MAX_RESPONSE_BYTES in these tests
LIMIT = 100
RSS_SLACK = 100 * 1024 * 1024  # growth allowed beyond the cap
SAFETY = 400 * 1024 * 1024  # a bad answer stops here, so a failing run cannot eat the machine
BOMB = 1024**3  # bytes of whitespace inside the gzip bomb
FILLER = b'{"name":"n","value":1,"timestamp":1700000000},' * 1024


def _event(i: int) -> dict[str, Any]:
    return {"name": "n", "value": i, "timestamp": 1_700_000_000 + i}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1])
    raise AssertionError(f"{field} not in /proc/self/status")


class PeakRss:
    """The growth of this process's peak resident set over a block (Linux: writing 5
    to ``clear_refs`` resets ``VmHWM`` to the current RSS)."""

    def __enter__(self) -> PeakRss:
        Path("/proc/self/clear_refs").write_text("5")
        self.base = _status_kib("VmRSS") * 1024
        return self

    def __exit__(self, *exc: object) -> None:
        self.growth = _status_kib("VmHWM") * 1024 - self.base


def _gzip_bomb() -> bytes:
    """A gzip body of a valid envelope holding 1 GiB of whitespace (about 1 MB)."""
    z = zlib.compressobj(9, zlib.DEFLATED, 31)
    parts = [z.compress(b'{"events":[')]
    spaces = b" " * (1024 * 1024)
    parts += [z.compress(spaces) for _ in range(BOMB // len(spaces))]
    parts.append(z.compress(b'],"cursor":"bomb"}') + z.flush())
    return b"".join(parts)


class HostileVaBus:
    """Protocol v1 over ``stream`` with integer cursors; ``mode`` makes it misbehave."""

    def __init__(self, events: int, bomb: bytes = b"") -> None:
        self.stream = [_event(i) for i in range(events)]
        self.mode: str | None = None
        self.limits: list[int] = []  # the limit of every request, in order
        self.bad_answers = 0
        self._bomb = bomb
        self._cursors = iter(["bad\x00cursor", "x" * 2000, 12345, "tab\there"] * 10_000)
        self.url = ""

    async def handle(self, request: web.Request) -> web.StreamResponse:
        limit = int(request.query["limit"])
        self.limits.append(limit)
        start = int(request.query.get("cursor", "0"))  # a bad cursor sent back: HTTP 500
        mode = self.mode
        if mode is not None:
            self.bad_answers += 1
        if mode == "endless":
            return await self._stream(request, chunked=True)
        if mode == "content_length":
            return await self._stream(request, chunked=False)
        if mode == "gzip_bomb":
            response = web.StreamResponse(headers={"Content-Encoding": "gzip"})
            response.enable_chunked_encoding()  # no Content-Length to refuse it by
            await response.prepare(request)
            with contextlib.suppress(ConnectionError):
                for i in range(0, len(self._bomb), 64 * 1024):
                    await response.write(self._bomb[i : i + 64 * 1024])
                await response.write_eof()
            return response
        if mode == "too_many":
            events = self.stream[start : start + 10 * max(limit, 1)]
            return self._envelope(events, start + len(events))
        events = self.stream[start : start + limit]
        if mode == "bad_cursor":
            return self._envelope(events, next(self._cursors))
        return self._envelope(events, str(start + len(events)))

    @staticmethod
    def _envelope(events: list[Any], cursor: Any) -> web.Response:
        body = orjson.dumps({"events": events, "cursor": cursor})
        return web.Response(body=body, content_type="application/json")

    async def _stream(self, request: web.Request, *, chunked: bool) -> web.StreamResponse:
        """``{"events":[`` and events for ever (up to :data:`SAFETY`), chunked or under a
        2 GB ``Content-Length`` that is never honoured; the last one then stalls until
        the mode changes."""
        response = web.StreamResponse()
        if chunked:
            response.enable_chunked_encoding()
        else:
            response.content_length = 2 * 1024**3
        await response.prepare(request)
        mode = self.mode
        sent = 0
        with contextlib.suppress(ConnectionError):
            await response.write(b'{"events":[')
            while sent < SAFETY:
                await response.write(FILLER)
                sent += len(FILLER)
            while not chunked and self.mode == mode:
                await asyncio.sleep(0.05)
            if chunked:
                await response.write_eof()
        return response


@contextlib.asynccontextmanager
async def serving(server: HostileVaBus) -> AsyncIterator[HostileVaBus]:
    app = web.Application()
    app.router.add_get("/events", server.handle)
    runner = web.AppRunner(app, shutdown_timeout=1.0)
    await runner.setup()
    port = _free_port()
    site = web.TCPSite(runner, "127.0.0.1", port)
    await site.start()
    server.url = f"http://127.0.0.1:{port}"
    try:
        yield server
    finally:
        server.mode = "closing"
        await runner.cleanup()


class Recorder:
    def __init__(self) -> None:
        self.batches: list[SourceBatch] = []

    async def emit(self, item: BusItem) -> None:
        if isinstance(item, SourceBatch):
            self.batches.append(item)

    @property
    def values(self) -> list[Any]:
        return [r["value"] for b in self.batches for r in b.records]


async def restore_nothing(partitions: Any) -> dict[str, PartitionCheckpoint]:
    return {}


def _bus(url: str, metrics: MetricsCollector) -> HttpBus:
    config = BusConfig(
        url=url,
        kind="http",
        http_base_url=url,
        http_batch_limit=LIMIT,
        http_wait_s=0.2,
        http_timeout_s=30.0,  # a hung answer must be refused by its size, not a timeout
        max_response_bytes=CAP,
    )
    backoff = Backoff(kind="fixed", initial_s=0.05, jitter=False)
    return HttpBus(config, metrics, SystemClock(), backoff=backoff)


async def wait_until(condition: Callable[[], bool], timeout: float = 30.0) -> None:
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.01)


@pytest.fixture(scope="module")
def gzip_bomb() -> bytes:
    return _gzip_bomb()


@pytest.mark.parametrize(
    ("mode", "kind"),
    [
        ("endless", "response_too_large"),
        ("content_length", "response_too_large"),
        ("gzip_bomb", "response_too_large"),
        ("too_many", "too_many_events"),
        ("bad_cursor", "invalid_cursor"),
    ],
)
async def test_a_hostile_answer_is_refused_with_bounded_memory_and_events_stay_exact(
    mode: str, kind: str, gzip_bomb: bytes
) -> None:
    server = HostileVaBus(3000, bomb=gzip_bomb)
    metrics = MetricsCollector()
    recorder = Recorder()
    async with serving(server):
        bus = _bus(server.url, metrics)
        await bus.start()
        visible = server.stream
        server.stream = visible[:500]
        task = asyncio.create_task(bus.run(recorder.emit, restore_nothing))
        try:
            await wait_until(lambda: len(recorder.values) == 500)
            taken = len(recorder.values)
            with PeakRss() as rss:
                server.mode = mode
                server.stream = visible
                # refused several times, and the last refusal left the bus failing
                await wait_until(
                    lambda: (
                        metrics.bus_protocol_errors[("http", kind)] >= 3
                        and metrics.bus_errors[("http", False)] >= 2
                    )
                )
            assert rss.growth < CAP + RSS_SLACK, f"peak RSS grew {rss.growth / 2**20:.0f} MiB"
            assert not task.done(), "the bus must stay alive"
            assert len(recorder.values) == taken, "nothing is taken from a refused answer"
            with pytest.raises(TransientError, match=kind):
                await bus.check()
            server.mode = None
            await wait_until(lambda: len(recorder.values) >= 3000)
            assert recorder.values == list(range(3000))
            assert all(len(b.records) <= LIMIT for b in recorder.batches)
            await bus.check()  # ready again
        finally:
            bus.stop_intake()
            async with asyncio.timeout(10):
                await task
            await bus.stop()


async def test_too_large_answers_are_asked_again_with_half_the_limit_until_they_fit() -> None:
    server = HostileVaBus(0)
    pad = "p" * 30_000  # 100 events: about 3 MB, 50: 1.5 MB, 25: 0.75 MB
    server.stream = [{**_event(i), "pad": pad} for i in range(1000)]
    metrics = MetricsCollector()
    recorder = Recorder()
    async with serving(server):
        bus = _bus(server.url, metrics)
        await bus.start()
        task = asyncio.create_task(bus.run(recorder.emit, restore_nothing))
        try:
            await wait_until(lambda: len(recorder.values) >= 1000)
            assert recorder.values == list(range(1000))
            assert metrics.bus_protocol_errors[("http", "response_too_large")] >= 2
            assert max(len(b.records) for b in recorder.batches) <= 25
            assert LIMIT in server.limits and min(server.limits[1:]) >= 25
        finally:
            bus.stop_intake()
            async with asyncio.timeout(10):
                await task
            await bus.stop()


async def test_a_single_event_above_the_cap_is_retried_and_reported_until_it_fits() -> None:
    server = HostileVaBus(300)
    server.stream[150] = {**_event(150), "pad": "p" * (2 * CAP)}
    metrics = MetricsCollector()
    recorder = Recorder()
    async with serving(server):
        bus = _bus(server.url, metrics)
        await bus.start()
        task = asyncio.create_task(bus.run(recorder.emit, restore_nothing))
        try:
            await wait_until(
                lambda: metrics.bus_protocol_errors[("http", "response_too_large")] >= 12
            )
            assert recorder.values == list(range(150))  # everything before it, nothing after
            with pytest.raises(TransientError, match="response_too_large"):
                await bus.check()
            server.stream[150] = _event(150)  # the operator fixes the server
            await wait_until(lambda: len(recorder.values) >= 300)
            assert recorder.values == list(range(300))
        finally:
            bus.stop_intake()
            async with asyncio.timeout(10):
                await task
            await bus.stop()
