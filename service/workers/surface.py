"""The one HTTP surface of WORKERS=N, on HTTP_HOST:HTTP_PORT, served by the supervisor.

Each worker serves its own endpoints on 127.0.0.1 (the port is in ``/status``); the
supervisor asks every running worker at once and answers:

- ``/healthz``: 200 while the supervisor runs and at least one worker process is alive
  (one dying worker is being replaced: no reason to restart the whole service), else 503;
- ``/readyz``: 200 only when every worker answers its own ``/readyz`` with 200; else 503
  naming each failing worker and why (not running, not answering, or its failing checks);
- ``/metrics``: every worker's samples labelled ``worker="<i>"``, plus the supervisor's
  families (``…_worker_up``, ``…_worker_restarts_total``, …);
- ``/status``: ``{"supervisor": <pids, restarts, uptime>, "workers": {"<i>": <its
  /status or null>}}``; ``/`` is the status page, which shows one worker at a time.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any, Final, Protocol

import aiohttp
import orjson
from aiohttp import web

from service.core.errors import describe_error
from service.core.lifecycle import AsyncResource
from service.metrics.collector import MetricsCollector
from service.ops.web import READINESS_TIMEOUT_S, Readiness, new_surface
from service.workers.exposition import exposition, merge_expositions, supervisor_families
from service.workers.slot import WorkerSlot, describe_exit

__all__ = ["Supervised", "WorkerClient", "build_surface_app"]

_ASK_TIMEOUT_S: Final = 2.0
# a worker's /readyz runs its own checks, each bounded by READINESS_TIMEOUT_S
_READY_TIMEOUT_S: Final = READINESS_TIMEOUT_S + 1.0


class Supervised(Protocol):
    """What the surface reads from the supervisor."""

    @property
    def running(self) -> bool: ...

    @property
    def slots(self) -> Sequence[WorkerSlot]: ...

    def monotonic(self) -> float: ...

    def status(self) -> dict[str, Any]: ...


Answer = tuple[int, bytes] | str
"""A worker's HTTP status and body, or why there is none."""


class WorkerClient(AsyncResource):
    """Asks every worker the same question at once, each bounded by a timeout; with
    ``auth_token`` (HTTP_AUTH_TOKEN, which the workers read too) as its bearer token."""

    def __init__(self, auth_token: str = "") -> None:
        self._session: aiohttp.ClientSession | None = None
        self._headers = {"Authorization": f"Bearer {auth_token}"} if auth_token else {}

    async def start(self) -> None:
        if self._session is None:
            self._session = aiohttp.ClientSession(headers=self._headers)

    async def stop(self) -> None:
        session, self._session = self._session, None
        if session is not None:
            await session.close()

    async def ask_all(
        self, slots: Sequence[WorkerSlot], path: str, timeout_s: float
    ) -> dict[str, Answer]:
        answers = await asyncio.gather(*(self._ask(s, path, timeout_s) for s in slots))
        return {str(s.index): a for s, a in zip(slots, answers, strict=True)}

    async def _ask(self, slot: WorkerSlot, path: str, timeout_s: float) -> Answer:
        port = slot.port
        if not slot.alive or port is None:
            last = slot.last_exit
            why = "" if last is None else f": {describe_exit(last.code)}"
            return f"not running{why}"
        if self._session is None:
            raise RuntimeError("WorkerClient is not started")
        deadline = asyncio.timeout(timeout_s)
        try:
            async with deadline, self._session.get(f"http://127.0.0.1:{port}{path}") as r:
                return r.status, await r.read()
        except TimeoutError:
            if deadline.expired():
                return f"no answer within {timeout_s:g} s"
            raise
        except aiohttp.ClientError as exc:
            return f"not answering ({describe_error(exc)})"


SUPERVISED_KEY: Final = web.AppKey[Supervised]("supervised")
CLIENT_KEY: Final = web.AppKey("worker_client", WorkerClient)


def build_surface_app(
    supervised: Supervised, client: WorkerClient, auth_token: str = ""
) -> web.Application:
    """The supervisor's surface; ``auth_token`` guards it as it does a worker's own
    (:mod:`service.ops.auth`), and ``client`` sends it to the workers."""
    # a probe flood asks each worker once a second at most (see service.ops.readiness)
    app = new_surface(
        auth_token,
        _ask_readiness,
        supervised.monotonic,
        healthz=_healthz,
        metrics=_metrics,
        status=_status,
    )
    app[SUPERVISED_KEY] = supervised
    app[CLIENT_KEY] = client
    return app


async def _healthz(request: web.Request) -> web.Response:
    sup = request.app[SUPERVISED_KEY]
    alive = [str(s.index) for s in sup.slots if s.alive]
    ok = sup.running and bool(alive)
    body = {"status": "ok" if ok else "failing", "workers_alive": alive}
    return web.json_response(body, status=200 if ok else 503)


async def _ask_readiness(app: web.Application) -> Readiness:
    sup = app[SUPERVISED_KEY]
    answers = await app[CLIENT_KEY].ask_all(sup.slots, "/readyz", _READY_TIMEOUT_S)
    workers = {worker: _readiness(answer) for worker, answer in answers.items()}
    failing = [w for w, r in workers.items() if r["status"] != "ready"]
    body = {"status": "not_ready" if failing else "ready", "failing": failing, "workers": workers}
    return 503 if failing else 200, body


def _readiness(answer: Answer) -> dict[str, Any]:
    if isinstance(answer, str):
        return {"status": "not_ready", "reason": answer}
    code, raw = answer
    body = _json(raw)
    checks = body.get("checks") if isinstance(body, dict) else None
    if code == 200:
        return {"status": "ready", "checks": checks}
    failed = [f"{k}: {v}" for k, v in (checks or {}).items() if v != "ok"]
    reason = "; ".join(failed) if failed else f"HTTP {code}"
    return {"status": "not_ready", "reason": reason, "checks": checks}


async def _metrics(request: web.Request) -> web.Response:
    sup = request.app[SUPERVISED_KEY]
    answers = await request.app[CLIENT_KEY].ask_all(sup.slots, "/metrics", _ASK_TIMEOUT_S)
    texts = {
        w: a[1].decode("utf-8", "replace")
        for w, a in answers.items()
        if not isinstance(a, str) and a[0] == 200
    }
    families, unparsable = merge_expositions(texts)
    scraped = set(texts) - set(unparsable)
    own = supervisor_families(sup.slots, scraped, sup.monotonic())
    return web.Response(
        body=exposition([*own, *families]),
        headers={"Content-Type": MetricsCollector.content_type},
    )


async def _status(request: web.Request) -> web.Response:
    sup = request.app[SUPERVISED_KEY]
    answers = await request.app[CLIENT_KEY].ask_all(sup.slots, "/status", _ASK_TIMEOUT_S)
    view = sup.status()
    workers: dict[str, Any] = {}
    for worker, answer in answers.items():
        body = None if isinstance(answer, str) or answer[0] != 200 else _json(answer[1])
        workers[worker] = body
        if body is None:
            view["workers"][worker]["status_error"] = (
                answer if isinstance(answer, str) else f"HTTP {answer[0]}"
            )
    return web.json_response({"supervisor": view, "workers": workers})


def _json(raw: bytes) -> Any:
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None
