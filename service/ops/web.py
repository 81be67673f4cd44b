"""The operator's HTTP surface: / (a live status page), /healthz, /readyz, /metrics,
/status.

The app only reads: it calls the readiness checks and the status callable it is given
and renders the metrics collector. It holds no reference to the pipeline itself.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Awaitable, Callable, Mapping
from functools import partial
from importlib.resources import files
from typing import Any, Final

from aiohttp import web

from service.core.clock import Clock
from service.core.lifecycle import AsyncResource
from service.metrics.collector import MetricsCollector
from service.ops.auth import bearer_auth
from service.ops.readiness import READINESS_CACHE_S, SharedAnswer

__all__ = [
    "METRICS_KEY",
    "READINESS_KEY",
    "READINESS_TIMEOUT_KEY",
    "STATUS_KEY",
    "Readiness",
    "ReadinessCheck",
    "WebServer",
    "build_web_app",
    "new_surface",
]

log = logging.getLogger(__name__)

ReadinessCheck = Callable[[], Awaitable[None]]
"""Returns when the dependency is reachable; raises (with a secret-free message) if not."""

READINESS_TIMEOUT_S: Final = 2.0
_MAX_REASON_CHARS: Final = 300

METRICS_KEY: Final = web.AppKey("metrics", MetricsCollector)
READINESS_KEY: Final = web.AppKey[Mapping[str, ReadinessCheck]]("readiness_checks")
READINESS_TIMEOUT_KEY: Final = web.AppKey("readiness_timeout_s", float)
STATUS_KEY: Final = web.AppKey[Callable[[], Mapping[str, Any]]]("status")
READINESS_DETAILS_KEY: Final = web.AppKey[Callable[[], Mapping[str, Any]]]("readiness_details")
PAGE_KEY: Final = web.AppKey("status_page", bytes)
Readiness = tuple[int, dict[str, Any]]
"""A /readyz answer: HTTP status and JSON body."""
READINESS_ANSWER_KEY: Final = web.AppKey[SharedAnswer[Readiness]]("readiness_answer")
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def build_web_app(
    metrics: MetricsCollector,
    readiness: Mapping[str, ReadinessCheck],
    status: Callable[[], Mapping[str, Any]],
    *,
    readiness_timeout_s: float = READINESS_TIMEOUT_S,
    readiness_details: Callable[[], Mapping[str, Any]] = dict,
    readiness_cache_s: float = READINESS_CACHE_S,
    clock: Clock | None = None,
    auth_token: str = "",
) -> web.Application:
    """The app serving the four endpoints.

    ``readiness`` names each dependency /readyz checks; all run concurrently, each
    bounded by ``readiness_timeout_s``; probes within ``readiness_cache_s`` (on
    ``clock``, default the metrics') share one answer. ``status`` must be cheap and
    JSON-able: it is merged over the metrics snapshot on every /status request.
    ``readiness_details`` adds JSON-able fields to every /readyz answer without deciding
    its status (a standby says so there, and is ready: healthy, able to take over). With
    ``auth_token``, every path but /healthz and /readyz needs it as a bearer token
    (:mod:`service.ops.auth`).
    """
    app = new_surface(
        auth_token,
        _readiness,
        (clock or metrics.clock).monotonic,
        readiness_cache_s,
        healthz=_healthz,
        metrics=_metrics,
        status=_status,
    )
    app[METRICS_KEY] = metrics
    app[READINESS_KEY] = dict(readiness)
    app[READINESS_TIMEOUT_KEY] = readiness_timeout_s
    app[STATUS_KEY] = status
    app[READINESS_DETAILS_KEY] = readiness_details
    return app


def new_surface(
    auth_token: str,
    readiness: Callable[[web.Application], Awaitable[Readiness]],
    monotonic: Callable[[], float],
    readiness_cache_s: float = READINESS_CACHE_S,
    *,
    healthz: Handler,
    metrics: Handler,
    status: Handler,
) -> web.Application:
    """The endpoints a worker and the WORKERS=N supervisor both serve: ``/`` (the status
    page), ``/healthz``, ``/readyz``, ``/metrics`` and ``/status``.

    ``/readyz`` answers ``readiness(app)``, computed once for the probes that arrive
    within ``readiness_cache_s`` (on ``monotonic``). With ``auth_token``, the app is
    behind :func:`~service.ops.auth.bearer_auth` (whose 401 for ``/`` is the status page,
    so a browser can ask for the token). The caller puts what its handlers read in the
    app before it serves.
    """
    if auth_token:
        app = web.Application(middlewares=[bearer_auth(auth_token, lambda r: r.app[PAGE_KEY])])
    else:
        app = web.Application()
    answer = SharedAnswer(partial(readiness, app), monotonic, readiness_cache_s)
    app[READINESS_ANSWER_KEY] = answer
    app.on_cleanup.append(lambda _: answer.close())
    # One self-contained file (no external resources, works offline) that polls
    # ``status`` (relative, so it works behind a path prefix).
    app[PAGE_KEY] = files("service.ops").joinpath("status_page.html").read_bytes()
    app.router.add_get("/", _page)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", _readyz)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/status", status)
    return app


async def _page(request: web.Request) -> web.Response:
    return web.Response(
        body=request.app[PAGE_KEY],
        content_type="text/html",
        charset="utf-8",
        headers={"Cache-Control": "no-cache"},
    )


async def _healthz(request: web.Request) -> web.Response:
    # Answering at all proves the event loop is alive; that is the whole check.
    return web.json_response({"status": "ok"})


async def _readyz(request: web.Request) -> web.Response:
    status, body = await request.app[READINESS_ANSWER_KEY].get()
    return web.json_response(body, status=status)


async def _readiness(app: web.Application) -> Readiness:
    checks = app[READINESS_KEY]
    names = list(checks)
    timeout_s = app[READINESS_TIMEOUT_KEY]
    failures = await asyncio.gather(*(_run_check(checks[n], timeout_s) for n in names))
    results = {n: (f or "ok") for n, f in zip(names, failures, strict=True)}
    try:
        details = dict(app[READINESS_DETAILS_KEY]())
    except Exception as exc:  # the answer is shared: it must not raise
        log.warning("readiness details failed: %s", exc)
        details = {}
    if any(failures):
        return 503, {"status": "not_ready", "checks": results, **details}
    return 200, {"status": "ready", "checks": results, **details}


async def _run_check(check: ReadinessCheck, timeout_s: float) -> str | None:
    """``None`` when the check passed, else a short reason fit for the response."""
    deadline = asyncio.timeout(timeout_s)
    try:
        async with deadline:
            await check()
    except Exception as exc:
        if isinstance(exc, TimeoutError) and deadline.expired():
            return f"no answer within {timeout_s:g} s"
        reason = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        return reason[:_MAX_REASON_CHARS]
    return None


async def _metrics(request: web.Request) -> web.Response:
    metrics = request.app[METRICS_KEY]
    # content_type= would reject the charset parameter Prometheus puts in its type
    return web.Response(body=metrics.exposition(), headers={"Content-Type": metrics.content_type})


async def _status(request: web.Request) -> web.Response:
    body = request.app[METRICS_KEY].snapshot()
    body.update(request.app[STATUS_KEY]())
    return web.json_response(body)


class WebServer(AsyncResource):
    """Serves ``app`` on ``host:port`` (port 0 picks a free one; see :attr:`port`), or
    on ``sock``, an already bound socket (a worker's, from its supervisor), instead.

    ``stop()`` gives in-flight requests ``shutdown_timeout_s`` to finish, so that it
    fits inside the service's shutdown deadline.
    """

    def __init__(
        self,
        host: str,
        port: int,
        app: web.Application,
        *,
        shutdown_timeout_s: float = 2.0,
        sock: socket.socket | None = None,
    ) -> None:
        self.host = host if sock is None else str(sock.getsockname()[0])
        self._requested_port = port
        self._sock = sock
        self._app = app
        self._shutdown_timeout_s = shutdown_timeout_s
        self._runner: web.AppRunner | None = None
        self._port: int | None = None

    @property
    def port(self) -> int:
        """The bound port. Only valid between ``start()`` and ``stop()``."""
        if self._port is None:
            raise RuntimeError("WebServer is not running")
        return self._port

    async def start(self) -> None:
        if self._runner is not None:
            return
        # Scrapes and probes every few seconds would drown the log: no access log.
        runner = web.AppRunner(
            self._app, access_log=None, shutdown_timeout=self._shutdown_timeout_s
        )
        await runner.setup()
        try:
            site: web.BaseSite
            if self._sock is not None:
                site = web.SockSite(runner, self._sock)
            else:
                site = web.TCPSite(runner, self.host, self._requested_port)
            await site.start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        self._port = _bound_port(runner)
        log.info("HTTP server listening on %s:%d", self.host, self._port)

    async def stop(self) -> None:
        runner, self._runner, self._port = self._runner, None, None
        if runner is not None:
            await runner.cleanup()


def _bound_port(runner: web.AppRunner) -> int:
    for address in runner.addresses:
        # (host, port) for IPv4, (host, port, flow, scope) for IPv6
        if isinstance(address, tuple) and len(address) >= 2:
            return int(address[1])
    raise RuntimeError("the HTTP server bound no TCP address")
