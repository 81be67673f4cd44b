"""RETRY_BACKOFF, RETRY_INITIAL and RETRY_MAX, from the environment to the pace of the
output retries of a wired service."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path
from types import FrameType

import orjson
import pytest

from service.app import Service
from service.checkpoints.file import FileCheckpointStore
from service.config import load_config
from service.core.clock import ManualClock
from service.metrics.collector import MetricsCollector
from tests.fakes.bus import MemoryBus
from tests.fakes.sinks import MemorySink

START = 1_699_999_980.0
FAILURES = 4  # below the circuit breaker's threshold (5): pure backoff


class RecordingClock(ManualClock):
    """A manual clock that remembers the sleeps the output retry loop asks of it, and
    queues each one in ``retry_waits`` as it begins."""

    def __init__(self, start: float) -> None:
        super().__init__(start)
        self.sleeps: list[float] = []
        self.retry_waits: asyncio.Queue[float] = asyncio.Queue()

    async def sleep(self, seconds: float) -> None:
        if _called_from("DataSender._retrying"):
            self.sleeps.append(seconds)
            self.retry_waits.put_nowait(seconds)
        await super().sleep(seconds)


def _called_from(qualname: str) -> bool:
    """Whether the awaiting chain of the running task passes through ``qualname``."""
    frame: FrameType | None = sys._getframe(2)
    while frame is not None:
        if frame.f_code.co_qualname == qualname:
            return True
        frame = frame.f_back
    return False


async def retry_delays(env: dict[str, str], tmp_path: Path) -> list[float]:
    """Delays the sender waited between FAILURES failed writes of a wired service."""
    config = load_config({"AGGREGATION_INTERVAL": "60", **env}, dotenv=None)
    clock = RecordingClock(START + 600)
    sink = MemorySink()
    sink.fail_next(FAILURES)
    ev = orjson.dumps({"name": "a", "value": 1, "timestamp": "oops"})  # a dead letter
    bus = MemoryBus({"p0": [ev]}, clock=clock)
    service = Service(
        config,
        bus=bus,
        sinks=[sink],
        store=FileCheckpointStore(str(tmp_path), "t"),
        metrics=MetricsCollector(clock),
        clock=clock,
        serve_http=False,
    )
    task = asyncio.create_task(service.run())
    try:
        async with asyncio.timeout(10):
            for _ in range(FAILURES):
                clock.advance(await clock.retry_waits.get())  # the sender waits in it now
            await sink.wait_until(lambda s: bool(s.dead_letters))
    finally:
        service.request_stop()
        await asyncio.wait_for(task, 10)
    assert sink.failed_writes == FAILURES
    return clock.sleeps


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"RETRY_BACKOFF": "fixed", "RETRY_INITIAL": "0.7"}, [0.7] * FAILURES),
        ({"RETRY_BACKOFF": "linear", "RETRY_INITIAL": "0.3"}, [0.3, 0.6, 0.9, 1.2]),
        (
            {"RETRY_BACKOFF": "linear", "RETRY_INITIAL": "0.3", "RETRY_MAX": "0.65"},
            [0.3, 0.6, 0.65, 0.65],
        ),
    ],
)
async def test_retry_settings_pace_the_output_retries(
    env: dict[str, str], expected: list[float], tmp_path: Path
) -> None:
    assert await retry_delays(env, tmp_path) == pytest.approx(expected)


async def test_exponential_retries_grow_within_the_jitter_band(tmp_path: Path) -> None:
    env = {"RETRY_BACKOFF": "exponential", "RETRY_INITIAL": "0.4", "RETRY_MAX": "100"}
    delays = await retry_delays(env, tmp_path)
    steps = [0.4 * 2**i for i in range(FAILURES)]
    assert len(delays) == FAILURES
    assert all(step / 2 <= d <= step for d, step in zip(delays, steps, strict=True))
