"""The VaBus emulator: an aiohttp server speaking VaBus HTTP protocol v1 (``--rate``: with
synthetic load from :mod:`service.dev.load`).

Endpoints under ``{base}``:

- ``GET /events?limit=N&wait=S[&cursor=C]`` long-polls a retained, bounded log and
  answers ``{"events": [...], "cursor": "<opaque>"}``. With a cursor it returns the
  events after it (an older cursor replays; one older than retention starts at the
  oldest event kept; one from another emulator process replays everything kept).
  Without a cursor it is queue-like: the next events not yet handed out to any
  cursor-less reader.
- ``POST /events``: one event or a JSON array of them, stored as given (elements are
  not validated: that is the aggregator's job). A body that is not JSON gets ``400``.
- ``POST /metrics`` (a JSON array of objects) and ``GET /metrics`` (the kept ones).
- ``GET /stats``: counters as JSON.

With a token configured every request needs ``Authorization: Bearer <token>`` (else 401).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hmac
import json
import logging
import math
import secrets
import signal
from collections import deque
from collections.abc import Awaitable, Callable, Iterable
from typing import Any, Final, TypeVar

import orjson
from aiohttp import web

from service.bus.json_text import split_json_array
from service.core.lifecycle import AsyncResource
from service.dev.event_log import EventLog
from service.dev.load import LoadGenerator

__all__ = ["Emulator", "add_arguments", "main"]

log = logging.getLogger(__name__)

MAX_LIMIT: Final = 100_000  # events per GET answer, whatever the client asks
MAX_WAIT_S: Final = 60.0
_JSON: Final = "application/json"

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
N = TypeVar("N", int, float)


class _BadRequest(Exception):
    pass


class Emulator(AsyncResource):
    """A VaBus v1 server over an in-memory :class:`EventLog`.

    The log and counters live in this object, not in the HTTP server: ``stop()`` then
    ``start()`` again (same port or not) serves the same events and honours old cursors,
    which is what bus-restart tests need.
    """

    def __init__(
        self,
        *,
        token: str = "",
        base: str = "",
        max_events: int = 1_000_000,
        max_metrics: int = 10_000,
    ) -> None:
        self._token = token
        self._base_path = "/" + base.strip("/") if base.strip("/") else ""
        self._log = EventLog(max_events)
        self._epoch = secrets.token_hex(4)  # cursors of another process are recognised
        self._queue_offset = 0  # next offset for cursor-less readers
        self._appended = asyncio.Event()
        self._closing = False
        self._metrics: deque[Any] = deque(maxlen=max_metrics)
        self._metrics_received = 0
        self._handed_out = 0
        self._waiting = 0  # long-polls waiting for events right now
        self._runner: web.AppRunner | None = None
        self._host = ""
        self._port = 0

    # -- lifecycle ------------------------------------------------------------------
    async def start(self, host: str = "127.0.0.1", port: int = 0) -> None:
        """Serve on ``host:port`` (0 picks a free port). Idempotent."""
        if self._runner is not None:
            return
        self._closing = False
        runner = web.AppRunner(self._make_app(), shutdown_timeout=2.0, access_log=None)
        await runner.setup()
        try:
            await web.TCPSite(runner, host, port).start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        self._host, self._port = host, int(runner.addresses[0][1])
        log.info("VaBus emulator listening on %s", self.url)

    async def stop(self) -> None:
        """Stop serving; waiting long-polls answer at once. Keeps the log. Idempotent."""
        runner, self._runner = self._runner, None
        if runner is None:
            return
        self._closing = True
        self._wake_waiters()
        await runner.cleanup()

    @property
    def url(self) -> str:
        """``http://host:port[/base]``, the value for ``VABUS_URL``."""
        if self._runner is None:
            raise RuntimeError("the emulator is not started")
        return f"http://{self._host}:{self._port}{self._base_path}"

    @property
    def port(self) -> int:
        return self._port

    # -- producer side --------------------------------------------------------------
    def append(self, events: Iterable[Any]) -> str:
        """Store events; ``bytes`` items are taken as one JSON text each, anything else
        is serialised with orjson. Wakes waiting long-polls. Returns the end cursor."""
        items = [e if isinstance(e, bytes) else orjson.dumps(e) for e in events]
        if items:
            self._log.extend(items)
            self._wake_waiters()
        return self._cursor(self._log.end)

    def stats(self) -> dict[str, Any]:
        return {
            "events_stored": self._log.end,
            "events_retained": len(self._log),
            "events_handed_out": self._handed_out,
            "metrics_received": self._metrics_received,
            "long_polls_waiting": self._waiting,
            "oldest_cursor": self._cursor(self._log.oldest),
            "end_cursor": self._cursor(self._log.end),
        }

    @property
    def metrics(self) -> list[Any]:
        """Metric objects received by ``POST /metrics`` (the newest ``max_metrics``)."""
        return list(self._metrics)

    # -- internals ------------------------------------------------------------------
    def _wake_waiters(self) -> None:
        # One event per generation: waiters hold the old one, which stays set.
        self._appended.set()
        self._appended = asyncio.Event()

    def _cursor(self, offset: int) -> str:
        return f"{self._epoch}-{offset}"

    def _offset_of(self, cursor: str) -> int:
        epoch, sep, number = cursor.partition("-")
        if not sep or not number.isdigit():
            raise _BadRequest(f"cursor {cursor[:80]!r} is not one this server handed out")
        if epoch != self._epoch:
            return self._log.oldest  # another emulator process: replay what is kept
        return min(int(number), self._log.end)

    def _make_app(self) -> web.Application:
        app = web.Application(middlewares=[self._auth_middleware], client_max_size=64 << 20)
        base = self._base_path
        app.router.add_get(f"{base}/events", self._get_events)
        app.router.add_post(f"{base}/events", self._post_events)
        app.router.add_get(f"{base}/metrics", self._get_metrics)
        app.router.add_post(f"{base}/metrics", self._post_metrics)
        app.router.add_get(f"{base}/stats", self._get_stats)
        return app

    @web.middleware
    async def _auth_middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        if self._token:
            given = request.headers.get("Authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {self._token}".encode()):
                return _error(401, "missing or wrong bearer token (Authorization: Bearer <token>)")
        try:
            return await handler(request)
        except _BadRequest as exc:
            return _error(400, str(exc))

    async def _get_events(self, request: web.Request) -> web.Response:
        limit = min(_query_number(request, "limit", 1000, int), MAX_LIMIT)
        wait = min(_query_number(request, "wait", 0.0, float), MAX_WAIT_S)
        cursor = request.query.get("cursor")
        start = self._offset_of(cursor) if cursor else None
        deadline = asyncio.get_running_loop().time() + wait
        while True:
            generation = self._appended
            offset = self._queue_offset if start is None else start
            events = self._log.read(offset, limit)
            remaining = deadline - asyncio.get_running_loop().time()
            if events or limit == 0 or remaining <= 0 or self._closing:
                break
            self._waiting += 1
            try:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(remaining):
                        await generation.wait()
            finally:
                self._waiting -= 1
        after = max(offset, self._log.oldest) + len(events)
        if start is None:
            self._queue_offset = after
        self._handed_out += len(events)
        body = b'{"events":[' + b",".join(events) + b'],"cursor":"'
        body += self._cursor(after).encode() + b'"}'
        return web.Response(body=body, content_type=_JSON)

    async def _post_events(self, request: web.Request) -> web.Response:
        items = _split_events(await request.read())
        cursor = self.append(items)
        return _json(200, {"accepted": len(items), "cursor": cursor})

    async def _post_metrics(self, request: web.Request) -> web.Response:
        try:
            received = orjson.loads(await request.read())
        except orjson.JSONDecodeError as exc:
            raise _BadRequest(f"body is not valid JSON: {exc}") from None
        if not isinstance(received, list) or not all(isinstance(m, dict) for m in received):
            raise _BadRequest('body must be a JSON array of {"name", "value", "timestamp"}')
        self._metrics.extend(received)
        self._metrics_received += len(received)
        return _json(200, {"accepted": len(received)})

    async def _get_metrics(self, request: web.Request) -> web.Response:
        limit = _query_number(request, "limit", len(self._metrics), int)
        kept = list(self._metrics)
        return _json(200, kept[len(kept) - limit :] if limit else [])

    async def _get_stats(self, request: web.Request) -> web.Response:
        return _json(200, self.stats())


def _split_events(body: bytes) -> list[bytes]:
    """One stored item per event: the elements of an array, or the whole body.

    orjson first; it refuses numbers outside a double (``1e999``, 400-digit integers)
    that are still JSON, so those bodies go through the standard library and are kept
    as their exact text, for the aggregator to reject as ``invalid_value``.
    """
    try:
        parsed = orjson.loads(body)
    except orjson.JSONDecodeError:
        pass
    else:
        if isinstance(parsed, list):
            return [orjson.dumps(e) for e in parsed]
        return [body.strip()]
    try:
        text = body.decode("utf-8")
        parsed = json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise _BadRequest(f"body is not valid JSON: {exc}") from None
    if isinstance(parsed, list):
        elements, _ = split_json_array(text, len(text) - len(text.lstrip()))
        return [e.encode() for e in elements]
    return [text.strip().encode()]


def _query_number(request: web.Request, key: str, default: N, kind: Callable[[str], N]) -> N:
    raw = request.query.get(key)
    if raw is None:
        return default
    try:
        value = kind(raw)
    except ValueError:
        raise _BadRequest(f"query parameter {key}={raw[:40]!r} is not a number") from None
    if not math.isfinite(value) or value < 0:
        raise _BadRequest(f"query parameter {key}={raw[:40]!r} must be >= 0")
    return value


def _json(status: int, obj: Any) -> web.Response:
    return web.Response(status=status, body=orjson.dumps(obj), content_type=_JSON)


def _error(status: int, message: str) -> web.Response:
    return _json(status, {"error": message})


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``vabus-aggregator emulator`` options."""
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8081, help="0 picks a free port")
    parser.add_argument("--base", default="", help="path prefix, e.g. /vabus")
    parser.add_argument("--token", default="", help="require Authorization: Bearer <token>")
    parser.add_argument("--rate", type=float, default=0.0, help="events/s to generate; 0 = none")
    parser.add_argument("--names", type=int, default=50, help="distinct event names")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--agg-func", default=None, help="one agg_func for every event")
    parser.add_argument("--invalid-fraction", type=float, default=0.0)
    parser.add_argument("--late-fraction", type=float, default=0.0)
    parser.add_argument("--max-events", type=int, default=1_000_000, help="events retained")


async def main(args: argparse.Namespace, *, handle_signals: bool = True) -> int:
    """Run the emulator (and the load generator when ``--rate`` > 0) until SIGINT/SIGTERM
    or cancellation. Options missing from ``args`` take :func:`add_arguments` defaults."""
    defaults = argparse.ArgumentParser()
    add_arguments(defaults)
    opts = defaults.parse_args([])
    opts.__dict__.update({k: v for k, v in vars(args).items() if v is not None})
    emulator = Emulator(token=opts.token, base=opts.base, max_events=opts.max_events)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    if handle_signals:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
    await emulator.start(opts.host, opts.port)
    try:
        async with asyncio.TaskGroup() as tasks:
            print(f"VaBus emulator at {emulator.url}", flush=True)
            generating = None
            if opts.rate > 0:
                generator = LoadGenerator(
                    emulator,
                    rate=opts.rate,
                    names=opts.names,
                    seed=opts.seed,
                    agg_func=opts.agg_func,
                    invalid_fraction=opts.invalid_fraction,
                    late_fraction=opts.late_fraction,
                )
                generating = tasks.create_task(generator.run())
            await stop.wait()
            if generating is not None:
                generating.cancel()
    finally:
        await emulator.stop()
        if handle_signals:
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(sig)
    return 0
