"""HttpBus against a real Emulator on a free loopback port (no external server needed)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

import pytest
from aiohttp import web

from service.bus.base import BusItem, PartitionsAssigned, Restore, SourceBatch
from service.bus.http import HttpBus
from service.bus.json_text import split_json_array
from service.checkpoints.base import PartitionCheckpoint
from service.config import BusConfig, Secret
from service.core.clock import SystemClock
from service.core.errors import TransientError
from service.core.events import Metric
from service.core.retry import Backoff
from service.dev.emulator import Emulator
from service.metrics.collector import MetricsCollector

FAST_RETRY = Backoff(kind="fixed", initial_s=0.02, jitter=False)


class RecordingMetrics(MetricsCollector):
    """The real collector, also keeping the order of the bus hooks' calls."""

    def __init__(self) -> None:
        super().__init__()
        self.error_calls: list[bool] = []
        self.received_calls: list[tuple[int, int]] = []

    def on_bus_error(self, transport: str, retriable: bool) -> None:
        assert transport == "http"
        super().on_bus_error(transport, retriable)
        self.error_calls.append(retriable)

    def on_messages_received(self, transport: str, messages: int, events: int) -> None:
        assert transport == "http"
        super().on_messages_received(transport, messages, events)
        self.received_calls.append((messages, events))


class Recorder:
    """An ``emit`` that keeps everything and lets a test wait for a condition."""

    def __init__(self) -> None:
        self.items: list[BusItem] = []
        self.gate: asyncio.Event | None = None  # when given, batches block until it is set
        self._changed = asyncio.Event()

    async def emit(self, item: BusItem) -> None:
        self.items.append(item)
        self._changed.set()
        if self.gate is not None and isinstance(item, SourceBatch):
            await self.gate.wait()

    @property
    def batches(self) -> list[SourceBatch]:
        return [i for i in self.items if isinstance(i, SourceBatch)]

    @property
    def records(self) -> list[Any]:
        return [r for b in self.batches for r in b.records]

    async def wait_for(self, condition: Callable[[], bool], timeout: float = 10.0) -> None:
        async with asyncio.timeout(timeout):
            while not condition():
                self._changed.clear()
                await self._changed.wait()


def restore_from(*stored: PartitionCheckpoint) -> Restore:
    async def restore(partitions: Sequence[str]) -> dict[str, PartitionCheckpoint]:
        return {c.partition: c for c in stored if c.partition in partitions}

    return restore


def http_bus(url: str, metrics: MetricsCollector | None = None, **config: Any) -> HttpBus:
    settings: dict[str, Any] = {"http_batch_limit": 100, "http_wait_s": 1.0, "http_timeout_s": 5.0}
    settings.update(config)
    bus_config = BusConfig(url=url, kind="http", http_base_url=url, **settings)
    return HttpBus(bus_config, metrics or MetricsCollector(), SystemClock(), backoff=FAST_RETRY)


@contextlib.asynccontextmanager
async def running(
    bus: HttpBus, recorder: Recorder, restore: Restore | None = None
) -> AsyncIterator[asyncio.Task[None]]:
    await bus.start()
    task = asyncio.create_task(bus.run(recorder.emit, restore or restore_from()))
    try:
        yield task
    finally:
        bus.stop_intake()
        if recorder.gate is not None:
            recorder.gate.set()
        async with asyncio.timeout(10):  # run() must return soon after stop_intake()
            await task
        await bus.stop()


async def wait_until(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.005)


def numbered(start: int, stop: int) -> list[dict[str, Any]]:
    return [{"name": "n", "value": i, "timestamp": 1_700_000_000 + i} for i in range(start, stop)]


@pytest.fixture
async def emulator() -> AsyncIterator[Emulator]:
    async with Emulator() as emu:
        yield emu


async def test_events_arrive_in_order_in_batches_with_cursor_positions(emulator: Emulator) -> None:
    emulator.append(numbered(0, 250))
    recorder, metrics = Recorder(), RecordingMetrics()
    async with running(http_bus(emulator.url, metrics), recorder):
        await recorder.wait_for(lambda: len(recorder.records) == 250)
    first = recorder.items[0]
    assert isinstance(first, PartitionsAssigned)
    assert first.checkpoints == [PartitionCheckpoint("http", None, None)]
    assert [e["value"] for e in recorder.records] == list(range(250))
    batches = recorder.batches
    assert [len(b.records) for b in batches[:3]] == [100, 100, 50]
    assert [b.caught_up for b in batches[:3]] == [False, False, True]
    # with nothing stored, the start cursor is learnt first (a cursor-less read is queue-like)
    assert batches[0].source == f"http cursor={emulator.stats()['oldest_cursor']}"
    assert emulator.stats()["events_handed_out"] == 250
    assert batches[1].source == f"http cursor={batches[0].next_position}"
    assert batches[2].next_position == emulator.stats()["end_cursor"]
    assert metrics.received_calls[:3] == [(100, 100), (100, 100), (50, 50)]


async def test_next_request_is_in_flight_while_a_batch_is_emitted(emulator: Emulator) -> None:
    emulator.append(numbered(0, 200))
    recorder = Recorder()
    recorder.gate = asyncio.Event()
    async with running(http_bus(emulator.url), recorder):
        await recorder.wait_for(lambda: len(recorder.batches) == 1)
        # the first emit is still blocked, yet the second batch has been fetched
        await wait_until(lambda: emulator.stats()["events_handed_out"] == 200)
        recorder.gate.set()
        await recorder.wait_for(lambda: len(recorder.records) == 200)
    assert [e["value"] for e in recorder.records] == list(range(200))


async def test_run_continues_from_the_restored_cursor(emulator: Emulator) -> None:
    emulator.append(numbered(0, 4))
    stored = PartitionCheckpoint("http", emulator.append([]), b"windows")
    emulator.append(numbered(4, 10))
    recorder = Recorder()
    async with running(http_bus(emulator.url), recorder, restore_from(stored)):
        await recorder.wait_for(lambda: len(recorder.records) == 6)
    assert recorder.items[0] == PartitionsAssigned([stored])
    assert [e["value"] for e in recorder.records] == [4, 5, 6, 7, 8, 9]


async def test_fetching_retries_while_the_server_is_down_and_loses_nothing(
    emulator: Emulator,
) -> None:
    emulator.append(numbered(0, 5))
    recorder, metrics = Recorder(), RecordingMetrics()
    async with running(http_bus(emulator.url, metrics), recorder):
        await recorder.wait_for(lambda: len(recorder.records) == 5)
        port = emulator.port
        await emulator.stop()
        await wait_until(lambda: len(metrics.error_calls) >= 2)
        emulator.append(numbered(5, 10))
        await emulator.start(port=port)
        await recorder.wait_for(lambda: len(recorder.records) == 10)
    assert [e["value"] for e in recorder.records] == list(range(10))
    assert all(metrics.error_calls)  # refused connections are retriable


async def test_bearer_token_is_sent_when_configured() -> None:
    recorder = Recorder()
    async with Emulator(token="s3cret") as emu:
        emu.append(numbered(0, 3))
        async with running(http_bus(emu.url, token=Secret("s3cret")), recorder):
            await recorder.wait_for(lambda: len(recorder.records) == 3)


async def test_a_rejected_token_is_logged_and_backed_off_as_not_retriable(
    caplog: pytest.LogCaptureFixture,
) -> None:
    recorder, metrics = Recorder(), RecordingMetrics()
    async with Emulator(token="s3cret") as emu:
        emu.append(numbered(0, 3))
        async with running(http_bus(emu.url, metrics, token=Secret("not-the-token")), recorder):
            await wait_until(lambda: len(metrics.error_calls) >= 2)
    assert recorder.records == []
    assert metrics.error_calls[:2] == [False, False]
    assert "HTTP 401" in caplog.text
    assert "failed (HTTP 401: " in caplog.text and ", attempt 2, next try in " in caplog.text
    assert "not-the-token" not in caplog.text and "s3cret" not in caplog.text


async def test_stop_intake_ends_a_waiting_long_poll(emulator: Emulator) -> None:
    recorder = Recorder()
    bus = http_bus(emulator.url, http_wait_s=30.0)
    async with running(bus, recorder):
        await wait_until(lambda: emulator.stats()["long_polls_waiting"] == 1)
    # running() has already required run() to return within 10 s of stop_intake()


async def test_metrics_are_posted_to_the_bus(emulator: Emulator) -> None:
    bus = http_bus(emulator.url)
    async with bus:
        await bus.send_metrics([Metric("events_received_total", 42.0, 1_700_000_000.0)])
    assert emulator.metrics == [
        {"name": "events_received_total", "value": 42.0, "timestamp": 1_700_000_000.0}
    ]


async def test_metrics_are_dropped_with_a_warning_when_the_bus_is_down(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async with Emulator() as emu:
        url = emu.url
    metrics = RecordingMetrics()
    bus = http_bus(url, metrics)
    async with bus, asyncio.timeout(5):
        await bus.send_metrics([Metric("m", 1.0, 1.0)])
    assert "dropping 1 metrics" in caplog.text
    assert metrics.error_calls == [True]  # counted once, as retriable (the bus is down)


async def test_check_passes_when_reachable_and_names_the_url_when_not(emulator: Emulator) -> None:
    url = emulator.url
    bus = http_bus(url)
    await bus.check()  # before start(), too
    async with bus:
        await bus.check()
        await emulator.stop()
        with pytest.raises(TransientError, match=url):
            await bus.check()


async def test_unparseable_body_is_handed_on_once_per_cursor(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def garbage(request: web.Request) -> web.Response:
        return web.Response(body=b"<html>proxy error</html>")

    app = web.Application()
    app.router.add_get("/events", garbage)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    url = f"http://127.0.0.1:{runner.addresses[0][1]}"
    recorder, metrics = Recorder(), RecordingMetrics()
    caplog.set_level(logging.ERROR)
    try:
        async with running(http_bus(url, metrics), recorder):
            await wait_until(lambda: len(metrics.error_calls) >= 3)
    finally:
        await runner.cleanup()
    assert recorder.records == [b"<html>proxy error</html>"]
    assert recorder.batches[0].next_position is None  # the cursor cannot advance
    assert "not an events envelope" in caplog.text


async def test_a_broken_element_is_isolated_and_skipped_without_losing_its_neighbours(
    emulator: Emulator,
) -> None:
    # A server relaying a producer's raw bytes: the element breaks the whole envelope.
    emulator.append(numbered(0, 5))
    emulator.append([b"{not json"])
    emulator.append(numbered(5, 12))
    recorder = Recorder()
    start = restore_from(PartitionCheckpoint("http", emulator.stats()["oldest_cursor"], None))
    async with running(http_bus(emulator.url, http_batch_limit=10), recorder, start):
        await recorder.wait_for(lambda: len(recorder.records) == 13)
    good = [r for r in recorder.records if isinstance(r, dict)]
    assert [e["value"] for e in good] == list(range(12))  # all, in order, once
    assert [r for r in recorder.records if not isinstance(r, dict)] == [
        b'{"events":[{not json],"cursor":"' + emulator.stats()["end_cursor"][:-2].encode() + b'6"}'
    ]


async def test_numbers_beyond_a_double_arrive_as_their_exact_texts(emulator: Emulator) -> None:
    emulator.append([b'{"name":"a","value":1e999,"timestamp":1}', {"name": "b", "value": 2}])
    recorder = Recorder()
    async with running(http_bus(emulator.url), recorder):
        await recorder.wait_for(lambda: len(recorder.records) == 2)
    assert recorder.records == [
        b'{"name":"a","value":1e999,"timestamp":1}',
        b'{"name":"b","value":2}',
    ]
    assert recorder.batches[0].next_position == emulator.stats()["end_cursor"]


def test_split_json_array_returns_exact_element_texts() -> None:
    text = ' [ {"a": [1, 2]} , 1e999,"x,]" ,[] ] tail'
    assert split_json_array(text, 1) == (['{"a": [1, 2]}', "1e999", '"x,]"', "[]"], 36)
    assert split_json_array("[]") == ([], 2)
    with pytest.raises(ValueError):
        split_json_array("[1 2]")
