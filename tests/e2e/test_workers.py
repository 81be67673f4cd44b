"""WORKERS=2: the real service as two worker processes under one supervisor, against the
real broker and PostgreSQL. A Kafka input of 4 partitions is fed live at a steady rate;
one worker is killed -9 mid-stream and replaced, and the aggregates stored in PostgreSQL
must still equal an independent computation exactly. Then SIGTERM to the main process
stops everything within SHUTDOWN_TIMEOUT; and a kill -9 of the main process takes the
workers with it."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import time
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.e2e.test_e2e_http import stored_rows
from tests.e2e.test_status_page import CHROMIUM_FLAGS
from tests.e2e.workload import assert_matches
from tests.fault.harness import (
    PARTITIONS,
    Incarnation,
    build_stream,
    create_topic,
    feed_kafka,
    process_gone,
    seed_from_env,
    service_env,
    wait_for,
)

pytestmark = [pytest.mark.integration, pytest.mark.e2e]

EVENTS = 50_000
RATE = 2500.0  # messages/s: about 20 s of feed
SHUTDOWN_TIMEOUT_S = 20.0


async def get(port: int, path: str) -> tuple[int, str]:
    async with (
        aiohttp.ClientSession() as http,
        http.get(f"http://127.0.0.1:{port}{path}", timeout=aiohttp.ClientTimeout(total=5)) as r,
    ):
        return r.status, await r.text()


def env_for(kafka_bootstrap: str, name: str, tmp_path: Path, postgres_dsn: str) -> dict[str, str]:
    return service_env(
        bus_url=f"kafka://{kafka_bootstrap}/in-{name}?group=g-{name}&metrics_topic=m-{name}",
        storage="kafka,postgres",
        kafka_bootstrap=kafka_bootstrap,
        topic=f"agg-{name}",
        state_dir=tmp_path / "state",
        postgres_dsn=postgres_dsn,
        table=f"agg_{name}",
        extra={"WORKERS": "2", "SHUTDOWN_TIMEOUT": str(SHUTDOWN_TIMEOUT_S)},
    )


def worker_pids(st: dict[str, Any]) -> dict[str, int | None]:
    return {i: w["pid"] for i, w in st["supervisor"]["workers"].items()}


async def partitions_split(inc: Incarnation) -> dict[str, Any] | None:
    """/status once both workers answer and share the 4 partitions between them."""
    st = await inc.status()
    if st is None or any(w is None for w in st["workers"].values()):
        return None
    held = [set(w["partitions"]) for w in st["workers"].values()]
    every = set().union(*held)
    if all(held) and len(every) == PARTITIONS == sum(map(len, held)):
        return st
    return None


async def check_status_page(port: int, status: dict[str, Any]) -> None:
    """The page at / lists both workers and shows the one chosen in its selector
    (skipped without Chromium, except in CI)."""
    executable = shutil.which("chromium") or shutil.which("chromium-browser")
    if executable is None:
        assert os.environ.get("CI") != "true", "chromium is not installed"
        print("\n[workers] no chromium: status page not checked")
        return
    from playwright.async_api import async_playwright

    async with async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=executable, args=CHROMIUM_FLAGS)
        page = await browser.new_page()
        errors: list[str] = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        await page.goto(f"http://127.0.0.1:{port}/")
        await page.wait_for_function("document.querySelectorAll('#workers tr').length === 2")
        await page.wait_for_function(
            "document.getElementById('conn').textContent.startsWith('updated')"
        )
        assert "running" in (await page.locator("#workers tr").nth(1).text_content() or "")
        for worker in ("0", "1"):
            await page.select_option("#worker", worker)
            shown = f"{status['workers'][worker]['events_received']:,}"
            await page.wait_for_function(
                f"document.getElementById('k-received').textContent === {shown!r}"
            )
        await browser.close()
    assert not errors, errors


@pytest.mark.timeout(300)
async def test_two_workers_survive_a_kill9_of_one_with_exact_results_and_stop_on_sigterm(
    kafka_bootstrap: str, postgres_dsn: str, unique_name: str, tmp_path: Path
) -> None:
    stream = build_stream(seed_from_env(303), EVENTS)
    await create_topic(kafka_bootstrap, f"in-{unique_name}")
    env = env_for(kafka_bootstrap, unique_name, tmp_path, postgres_dsn)
    inc = Incarnation(env, tmp_path, 0)
    feeder = asyncio.create_task(
        feed_kafka(kafka_bootstrap, f"in-{unique_name}", stream, rate=RATE)
    )
    try:
        st = await wait_for(
            lambda: partitions_split(inc), 60, "two workers, 4 partitions", inc.proc
        )

        async def ready() -> bool:
            return (await get(inc.port, "/readyz"))[0] == 200

        await wait_for(ready, 30, "/readyz 200", inc.proc)
        code, text = await get(inc.port, "/metrics")
        assert code == 200
        families = {f.name: f for f in text_string_to_metric_families(text)}
        received = families["vabus_aggregator_events_received"].samples
        assert {s.labels["worker"] for s in received} == {"0", "1"}
        assert families["vabus_aggregator_worker_up"].samples[0].value == 1

        async def worker1_checkpointed() -> dict[str, Any] | None:
            # killed mid-work, with state already committed: the partitions it held
            # move on from its checkpoint, and what came after is replayed
            now = await inc.status()
            w1 = None if now is None else now["workers"]["1"]
            return now if w1 is not None and w1["checkpoints"] >= 2 else None

        st = await wait_for(worker1_checkpointed, 30, "worker 1 checkpointing", inc.proc)
        assert not feeder.done(), "the feed ended before the kill: raise EVENTS"
        survivor, victim = worker_pids(st)["0"], worker_pids(st)["1"]
        assert survivor is not None and victim is not None
        os.kill(victim, signal.SIGKILL)

        async def replaced() -> dict[str, Any] | None:
            now = await inc.status()
            if now is None:
                return None
            w1 = now["supervisor"]["workers"]["1"]
            return now if w1["restarts"] == 1 and w1["alive"] and w1["pid"] != victim else None

        st = await wait_for(replaced, 30, "worker 1 replaced", inc.proc)
        assert worker_pids(st)["0"] == survivor, "the other worker must go on"
        assert process_gone(victim)
        await wait_for(lambda: partitions_split(inc), 60, "the partitions shared again", inc.proc)
        await asyncio.wait_for(feeder, 120)
    finally:
        feeder.cancel()

    async def exact() -> bool:
        try:
            assert_matches(
                await stored_rows(postgres_dsn, f"agg_{unique_name}"), stream.expected, ""
            )
        except AssertionError:
            return False
        return True

    await wait_for(exact, 120, "the exact aggregates in PostgreSQL", inc.proc)
    assert_matches(
        await stored_rows(postgres_dsn, f"agg_{unique_name}"), stream.expected, "PostgreSQL"
    )
    code, text = await get(inc.port, "/metrics")
    restarts = {
        s.labels["worker"]: s.value
        for f in text_string_to_metric_families(text)
        if f.name == "vabus_aggregator_worker_restarts"
        for s in f.samples
    }
    assert restarts == {"0": 0.0, "1": 1.0}

    final = await inc.status()
    assert final is not None
    await check_status_page(inc.port, final)
    pids = [p for p in worker_pids(final).values() if p is not None]
    assert len(pids) == 2
    started = time.monotonic()
    rc = inc.terminate(timeout=SHUTDOWN_TIMEOUT_S + 10)
    took = time.monotonic() - started
    log = inc.proc.log_text()
    assert rc == 0, log[-3000:]
    assert took < SHUTDOWN_TIMEOUT_S, f"stopped after {took:.1f} s"
    assert all(process_gone(p) for p in pids), "a worker outlived the main process"
    assert "restarting worker 1 (restart 1)" in log
    print(f"\n[workers] kill -9 of worker 1 replaced; SIGTERM -> exit 0 in {took:.1f} s")


@pytest.mark.timeout(120)
async def test_the_workers_stop_on_their_own_when_the_main_process_is_killed(
    kafka_bootstrap: str, postgres_dsn: str, unique_name: str, tmp_path: Path
) -> None:
    await create_topic(kafka_bootstrap, f"in-{unique_name}")
    inc = Incarnation(env_for(kafka_bootstrap, unique_name, tmp_path, postgres_dsn), tmp_path, 0)
    try:
        st = await wait_for(
            lambda: partitions_split(inc), 60, "two workers, 4 partitions", inc.proc
        )
        pids = [p for p in worker_pids(st).values() if p is not None]
        assert len(pids) == 2
    finally:
        inc.kill9()

    async def all_gone() -> bool:
        return all(process_gone(p) for p in pids)

    started = time.monotonic()
    await wait_for(all_gone, SHUTDOWN_TIMEOUT_S + 10, "the workers to exit on their own")
    took = time.monotonic() - started
    assert inc.proc.log_text().count("the supervisor is gone: shutting down gracefully") == 2
    print(f"\n[workers] main process killed -9: both workers gone after {took:.1f} s")


@pytest.mark.timeout(120)
async def test_with_http_auth_token_the_supervisor_reaches_its_guarded_workers(
    kafka_bootstrap: str, postgres_dsn: str, unique_name: str, tmp_path: Path
) -> None:
    # The workers read the same HTTP_AUTH_TOKEN: their own /status and /metrics are
    # guarded, so the supervisor's surface must send it to them.
    token = "workers-t0ken-8c2d4e6f"
    await create_topic(kafka_bootstrap, f"in-{unique_name}")
    env = {
        **env_for(kafka_bootstrap, unique_name, tmp_path, postgres_dsn),
        "HTTP_AUTH_TOKEN": token,
    }
    inc = Incarnation(env, tmp_path, 0)
    bearer = {"Authorization": f"Bearer {token}"}

    async def fetch(path: str, headers: dict[str, str]) -> tuple[int, str]:
        async with (
            aiohttp.ClientSession(headers=headers) as http,
            http.get(f"http://127.0.0.1:{inc.port}{path}") as r,
        ):
            return r.status, await r.text()

    async def both_workers_answer() -> dict[str, Any] | None:
        try:
            code, text = await fetch("/status", bearer)
        except aiohttp.ClientError:
            return None
        body = orjson.loads(text) if code == 200 else None
        workers = None if body is None else body["workers"]
        return body if workers and all(w is not None for w in workers.values()) else None

    try:
        body = await wait_for(both_workers_answer, 60, "both workers' /status", inc.proc)
        assert set(body["workers"]) == {"0", "1"}
        for path in ("/", "/status", "/metrics"):
            assert (await fetch(path, {}))[0] == 401, path
        assert (await fetch("/healthz", {}))[0] == 200
        code, text = await fetch("/metrics", bearer)
        scraped = {
            s.labels["worker"]: s.value
            for f in text_string_to_metric_families(text)
            if f.name == "vabus_aggregator_worker_scrape_success"
            for s in f.samples
        }
        assert code == 200 and scraped == {"0": 1.0, "1": 1.0}
        assert token not in text and token not in orjson.dumps(body).decode()
        assert token not in inc.proc.log_text()
    finally:
        assert inc.terminate(timeout=SHUTDOWN_TIMEOUT_S + 10) == 0
