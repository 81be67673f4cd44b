"""The status page at ``GET /`` in a real browser (Debian's Chromium driven by Playwright),
checked the way a person reads it: its figures match ``/status`` and move while events
flow, and an output outage shows on the page.

``.ci/run`` installs Chromium when it is missing; elsewhere the test is skipped without
it (in CI, ``CI=true``, it fails instead). ``STATUS_PAGE_SCREENSHOT=path.png`` saves what
the browser showed (that is how ``docs/status-page.png`` is made).
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from service.dev.emulator import Emulator
from service.dev.load import LoadGenerator
from service.dev.postgres_server import EmbeddedPostgres
from tests.e2e.workload import ServiceProcess, free_port

pytestmark = [pytest.mark.e2e, pytest.mark.integration]

CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def chromium_path() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        if os.environ.get("CI") == "true":
            pytest.fail("chromium is not installed; .ci/run installs it with apt-get")
        pytest.skip("chromium is not installed (apt-get install chromium)")
    return path


async def status(port: int) -> dict[str, Any]:
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"http://127.0.0.1:{port}/status") as response,
    ):
        body: dict[str, Any] = await response.json()
        return body


async def poll(cond: Callable[[], Awaitable[Any]], timeout: float, what: str) -> Any:
    try:
        async with asyncio.timeout(timeout):
            while not (result := await cond()):
                await asyncio.sleep(0.2)
            return result
    except TimeoutError:
        raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}") from None


def number(text: str) -> float:
    assert re.fullmatch(r"-?[\d,]+(\.\d+)?", text), f"not a number on the page: {text!r}"
    return float(text.replace(",", ""))


async def test_status_page_shows_live_figures_and_an_output_outage(
    pg_restartable: EmbeddedPostgres, unique_name: str, tmp_path: Path
) -> None:
    from playwright.async_api import async_playwright

    executable = chromium_path()
    port = free_port()
    async with Emulator() as emulator:
        generator = LoadGenerator(emulator, rate=400, names=10, seed=3, fixed_per_name=True)
        feeding = asyncio.create_task(generator.run())
        proc = ServiceProcess(
            {
                "VABUS_URL": emulator.url,
                "VABUS_WAIT": "0.5",
                "STORAGE_TYPE": "postgres",
                "POSTGRES_DSN": pg_restartable.dsn,
                "POSTGRES_TABLE": f"agg_{unique_name}",
                "AGGREGATION_INTERVAL": "2",
                "HTTP_HOST": "127.0.0.1",
                "HTTP_PORT": str(port),
                "STATE_DIR": str(tmp_path / "state"),
            },
            tmp_path,
        )
        try:
            async with async_playwright() as pw:
                browser = await pw.chromium.launch(executable_path=executable, args=CHROMIUM_FLAGS)
                page = await browser.new_page(viewport={"width": 1400, "height": 1000})

                async def page_up() -> bool:
                    try:
                        await page.goto(f"http://127.0.0.1:{port}/", timeout=2000)
                    except Exception:
                        return False
                    return True

                await poll(page_up, 30, "the page to load")
                received = page.locator("#k-received")

                async def page_counts() -> bool:
                    text = await received.text_content() or ""
                    return text not in ("\u2013", "0")  # the page shows an en dash until known

                await poll(page_counts, 30, "events received on the page")
                # what the page shows lies between two /status reads around it
                before = (await status(port))["events_received"]
                await page.wait_for_function(
                    f"Number(document.getElementById('k-received').textContent"
                    f".replace(/,/g, '')) >= {before}"
                )
                shown = number(await received.text_content() or "")
                after = (await status(port))["events_received"]
                assert before <= shown <= after
                # and it moves while events flow
                await page.wait_for_function(
                    f"Number(document.getElementById('k-received').textContent"
                    f".replace(/,/g, '')) > {shown}"
                )
                rows = page.locator("#partitions tr")
                assert await rows.count() == 1
                assert "http" in (await rows.first.text_content() or "")
                sink = page.locator("#sinks tr", has_text="postgres")
                await page.wait_for_function(
                    "document.querySelector('#sinks').textContent.includes('healthy')"
                )
                if shot := os.environ.get("STATUS_PAGE_SCREENSHOT"):
                    await page.screenshot(path=shot, full_page=True)

                await pg_restartable.stop()
                await poll(
                    lambda: _shows(sink, ("retrying", "circuit open")), 40, "the outage on the page"
                )
                await pg_restartable.start()
                await poll(lambda: _shows(sink, ("healthy",)), 60, "the recovery on the page")
                await browser.close()
        finally:
            feeding.cancel()
            code = proc.terminate()
    assert code == 0, proc.log_text()[-3000:]


async def _shows(row: Any, words: tuple[str, ...]) -> bool:
    text = await row.text_content() or ""
    return any(w in text for w in words)


async def test_status_page_behind_http_auth_token_takes_it_once_and_sends_it(
    tmp_path: Path,
) -> None:
    from playwright.async_api import async_playwright

    from service.app import Service
    from service.checkpoints.file import FileCheckpointStore
    from service.config import load_config
    from service.core.clock import SystemClock
    from service.metrics.collector import MetricsCollector
    from tests.fakes.bus import MemoryBus
    from tests.fakes.sinks import MemorySink

    executable = chromium_path()
    token = "page-t0ken-5b1e9d2c7a"
    port = free_port()
    config = load_config(
        {"HTTP_HOST": "127.0.0.1", "HTTP_PORT": str(port), "HTTP_AUTH_TOKEN": token},
        dotenv=None,
    )
    clock = SystemClock()
    service = Service(
        config,
        bus=MemoryBus({"p0": []}),
        sinks=[MemorySink()],
        store=FileCheckpointStore(str(tmp_path), "t"),
        metrics=MetricsCollector(clock),
        clock=clock,
    )
    task = asyncio.create_task(service.run())
    try:
        await poll(lambda: _async(service.phase == "running"), 10, "the service running")
        base = f"http://127.0.0.1:{port}/"
        async with async_playwright() as pw:
            browser = await pw.chromium.launch(executable_path=executable, args=CHROMIUM_FLAGS)
            conn = "document.getElementById('conn').textContent"

            # Once in the fragment: the page keeps it for the tab and drops it from the URL.
            page = await browser.new_page()
            await page.goto(base + "#token=" + token)
            await page.wait_for_function(f"{conn}.startsWith('updated')")
            assert token not in page.url
            assert await page.locator("#phase").text_content() == "running"
            assert await page.locator("#login").is_hidden()
            await page.reload()  # the same tab still has it
            await page.wait_for_function(f"{conn}.startsWith('updated')")

            # Without it the page asks; a wrong one is refused; the right one opens it.
            page = await (await browser.new_context()).new_page()
            response = await page.goto(base)
            assert response is not None and response.status == 401
            await page.wait_for_function(f"{conn} === 'access token required'")
            assert await page.locator("#login").is_visible()
            await page.fill("#token", "not-the-token-at-all")
            await page.click("#login button")
            await page.wait_for_function(f"{conn} === 'token refused'")
            await page.fill("#token", token)
            await page.click("#login button")
            await page.wait_for_function(f"{conn}.startsWith('updated')")
            assert await page.locator("#login").is_hidden()
            await browser.close()
    finally:
        service.request_stop()
        await asyncio.wait_for(task, 30)


async def _async(value: bool) -> bool:
    return value
