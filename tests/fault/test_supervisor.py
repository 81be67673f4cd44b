"""The supervisor of WORKERS=N with stand-in workers (``fake_worker.py``: real processes
that serve the worker endpoints on the socket they are handed, but need no broker):
restarts with backoff, the graceful stop and the kill at the deadline, and the one HTTP
surface built from the workers' answers. The real service's workers are in
``tests/e2e/test_workers.py``."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import sys
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from service.config import load_config
from service.core.clock import SystemClock
from service.core.retry import Backoff
from service.workers import Supervisor
from tests.fault.harness import process_gone

FAKE_WORKER = Path(__file__).with_name("fake_worker.py")
FAST = Backoff(initial_s=0.1, maximum_s=1.0, jitter=False)  # 0.1, 0.2, 0.4, 0.8, 1.0 s


def fake_command(index: int, http_fd: int, shutdown_timeout_s: float) -> list[str]:
    return [sys.executable, str(FAKE_WORKER), str(index), str(http_fd), str(shutdown_timeout_s)]


async def until(cond: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        result = cond()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        await asyncio.sleep(0.02)


async def get(sup: Supervisor, path: str) -> tuple[int, str]:
    assert sup.web is not None
    async with (
        aiohttp.ClientSession() as http,
        http.get(f"http://127.0.0.1:{sup.web.port}{path}") as r,
    ):
        return r.status, await r.text()


async def get_json(sup: Supervisor, path: str) -> tuple[int, Any]:
    code, text = await get(sup, path)
    return code, json.loads(text)


async def every_worker_answers(sup: Supervisor) -> bool:
    if sup.web is None or not all(s.alive for s in sup.slots):
        return False
    _, body = await get_json(sup, "/status")
    return all(w is not None for w in body["workers"].values())


@asynccontextmanager
async def supervising(
    workers: int = 2,
    mode: str = "ready",
    *,
    shutdown_timeout: float = 5.0,
    backoff: Backoff = FAST,
    wait_ready: bool = True,
) -> AsyncIterator[tuple[Supervisor, asyncio.Task[None]]]:
    env = {
        "WORKERS": str(workers),
        "VABUS_URL": "kafka://127.0.0.1:9/in",
        "HTTP_HOST": "127.0.0.1",
        "HTTP_PORT": "0",
        "SHUTDOWN_TIMEOUT": str(shutdown_timeout),
    }
    sup = Supervisor(
        load_config(env, dotenv=None),
        clock=SystemClock(),
        command=fake_command,
        backoff=backoff,
        environ={**os.environ, **env, "FAKE_WORKER_MODE": mode},
    )
    task = asyncio.create_task(sup.run())
    try:
        if wait_ready:
            await until(lambda: every_worker_answers(sup), 15, "every worker answering")
        yield sup, task
    finally:
        sup.request_stop()
        await asyncio.wait_for(task, shutdown_timeout + 10)


async def test_a_killed_worker_is_replaced_and_logged_while_the_others_go_on(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, "service.workers")
    async with supervising() as (sup, _):
        first, victim = sup.slots[0].pid, sup.slots[1].pid
        assert first is not None and victim is not None
        os.kill(victim, signal.SIGKILL)
        await until(lambda: sup.slots[1].restarts == 1 and sup.slots[1].alive, 10, "a restart")
        assert sup.slots[1].pid != victim and sup.slots[0].pid == first
        last = sup.slots[1].last_exit
        assert last is not None and last.code == -signal.SIGKILL and last.pid == victim
        await until(lambda: every_worker_answers(sup), 10, "the new worker answering")
    text = caplog.text
    assert f"worker 1 (pid {victim}) killed by SIGKILL" in text
    assert "restarting worker 1 (restart 1)" in text


async def test_a_worker_that_keeps_crashing_is_restarted_with_growing_delays(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, "service.workers")
    async with supervising(1, "crash", wait_ready=False) as (sup, _):
        await until(lambda: sup.slots[0].restarts >= 3, 15, "three restarts")
        st = sup.status()
    assert st["workers"]["0"]["last_exit"]["reason"] == "exit code 3"
    delays = [
        r.getMessage().split(" again in ")[1].split("s ")[0]
        for r in caplog.records
        if " again in " in r.getMessage()
    ]
    assert delays[:3] == ["0.1", "0.2", "0.4"], delays


async def test_stop_ends_every_worker_gracefully_and_leaves_no_process() -> None:
    async with supervising() as (sup, task):
        pids = [s.pid for s in sup.slots]
        started = time.monotonic()
        sup.request_stop()
        await asyncio.wait_for(task, 10)
        took = time.monotonic() - started
    assert all(pid is not None and process_gone(pid) for pid in pids)
    assert [s.last_exit.code if s.last_exit else None for s in sup.slots] == [0, 0]
    assert sup.phase == "stopped" and took < 5


async def test_each_worker_is_handed_a_deadline_before_the_supervisors_as_an_argument() -> None:
    """SHUTDOWN_TIMEOUT stays the operator's value in every process; a worker's own
    deadline, a second earlier, comes as its ``--shutdown-timeout``."""
    async with supervising(2, shutdown_timeout=5.0) as (sup, _):
        _, body = await get_json(sup, "/status")
    for worker in body["workers"].values():
        assert worker["shutdown_timeout_s"] == 4.0 and worker["SHUTDOWN_TIMEOUT"] == "5.0"


async def test_a_worker_that_ignores_sigterm_is_killed_at_the_shutdown_deadline(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, "service.workers")
    async with supervising(2, "ignore_term", shutdown_timeout=2.0) as (sup, task):
        pids = [s.pid for s in sup.slots]
        started = time.monotonic()
        sup.request_stop()
        await asyncio.wait_for(task, 10)
        took = time.monotonic() - started
    assert 1.7 < took < 2.0, took  # at the deadline less a reserve, within SHUTDOWN_TIMEOUT
    assert all(pid is not None and process_gone(pid) for pid in pids)
    assert all(s.last_exit and s.last_exit.code == -signal.SIGKILL for s in sup.slots)
    assert "still running at the shutdown deadline; killing them" in caplog.text


async def test_readyz_is_503_naming_the_worker_that_is_not_ready_and_why() -> None:
    async with supervising(3, "not_ready:1") as (sup, _):
        code, body = await get_json(sup, "/readyz")
    assert code == 503
    assert body["status"] == "not_ready" and body["failing"] == ["1"]
    assert "postgres: ConnectionRefusedError" in body["workers"]["1"]["reason"]
    assert body["workers"]["0"]["status"] == body["workers"]["2"]["status"] == "ready"


async def test_readyz_and_healthz_follow_the_workers_processes() -> None:
    slow = Backoff(kind="fixed", initial_s=30.0)  # a killed worker stays down
    async with supervising(2, backoff=slow) as (sup, _):
        assert (await get_json(sup, "/readyz"))[0] == 200
        assert (await get_json(sup, "/healthz"))[0] == 200
        pid = sup.slots[0].pid
        assert pid is not None
        os.kill(pid, signal.SIGKILL)
        await until(lambda: not sup.slots[0].alive, 10, "worker 0 to be gone")

        async def not_ready() -> Any:  # once the answer cached for a second is stale
            answer = await get_json(sup, "/readyz")
            return answer if answer[0] == 503 else None

        _, body = await until(not_ready, 10, "/readyz 503")
        assert body["failing"] == ["0"]
        assert body["workers"]["0"]["reason"] == "not running: killed by SIGKILL"
        health = await get_json(sup, "/healthz")
        assert health == (200, {"status": "ok", "workers_alive": ["1"]})
        pid = sup.slots[1].pid
        assert pid is not None
        os.kill(pid, signal.SIGKILL)
        await until(lambda: not sup.slots[1].alive, 10, "worker 1 to be gone")
        assert (await get_json(sup, "/healthz"))[0] == 503


async def test_metrics_hold_every_workers_samples_with_a_worker_label() -> None:
    async with supervising(2) as (sup, _):
        code, text = await get(sup, "/metrics")
    assert code == 200
    families = {f.name: f for f in text_string_to_metric_families(text)}
    received = families["vabus_aggregator_events_received"]
    assert {(s.labels["worker"], s.value) for s in received.samples} == {("0", 10), ("1", 11)}
    depth = families["vabus_aggregator_queue_depth"]
    assert {tuple(sorted(s.labels.items())) for s in depth.samples} == {
        (("subscriber", "sender"), ("worker", "0")),
        (("subscriber", "sender"), ("worker", "1")),
    }
    assert text.count("# TYPE vabus_aggregator_queue_depth gauge") == 1
    up = families["vabus_aggregator_worker_up"]
    assert {(s.labels["worker"], s.value) for s in up.samples} == {("0", 1), ("1", 1)}
    assert "vabus_aggregator_worker_restarts" in families
    assert families["vabus_aggregator_workers"].samples[0].value == 2


async def test_status_holds_each_workers_status_and_the_supervisors_view() -> None:
    async with supervising(2) as (sup, _):
        code, body = await get_json(sup, "/status")
        code_page, page = await get(sup, "/")
        pids = [s.pid for s in sup.slots]
    assert code == 200 and code_page == 200 and "<title>VaBus Aggregator</title>" in page
    assert body["workers"]["1"] == {
        "phase": "running",
        "index": 1,
        "events_received": 7,
        "shutdown_timeout_s": 4.0,
        "SHUTDOWN_TIMEOUT": "5.0",
    }
    view = body["supervisor"]
    assert view["pid"] == os.getpid() and view["workers_configured"] == 2
    assert [view["workers"][i]["pid"] for i in ("0", "1")] == pids
    assert view["workers"]["0"]["restarts"] == 0 and view["workers"]["0"]["uptime_seconds"] > 0
