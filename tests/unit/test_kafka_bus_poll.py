"""KafkaBus.run when polls fail: each failure is counted, retried with backoff on the
injected clock, and a stop ends the wait at once (a fake consumer, no broker)."""

from __future__ import annotations

import asyncio
from typing import Any

from aiokafka.errors import KafkaConnectionError

from service.bus.kafka import KafkaBus
from service.checkpoints.base import PartitionCheckpoint
from service.config import BusConfig, KafkaConfig
from service.core.clock import ManualClock
from service.core.retry import Backoff
from service.metrics.collector import MetricsCollector


class RecordingClock(ManualClock):
    """A manual clock that remembers every sleep asked of it."""

    def __init__(self) -> None:
        super().__init__()
        self.sleeps: list[float] = []

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        await super().sleep(seconds)


class FailingConsumer:
    """Just what ``run`` calls; every poll fails as with a broker that is gone."""

    def __init__(self) -> None:
        self.polls = 0

    def subscribe(self, topics: list[str], listener: Any) -> None:
        pass

    async def getmany(self, timeout_ms: int, max_records: int) -> dict[Any, list[Any]]:
        self.polls += 1
        raise KafkaConnectionError("broker gone")


async def _no_restore(partitions: Any) -> dict[str, PartitionCheckpoint]:
    return {}


async def _no_emit(item: Any) -> None:
    raise AssertionError("nothing can be emitted")


async def test_poll_failures_are_counted_backed_off_and_a_stop_ends_the_wait() -> None:
    clock = RecordingClock()
    metrics = MetricsCollector(clock)
    config = BusConfig(
        url="kafka://k:9092/t", kind="kafka", kafka_topic="t", kafka_bootstrap_servers=("k:9092",)
    )
    bus = KafkaBus(
        config,
        KafkaConfig(),
        metrics,
        clock,
        backoff=Backoff("linear", initial_s=2.0, jitter=False),
    )
    consumer = FailingConsumer()
    bus._consumer = consumer
    task = asyncio.create_task(bus.run(_no_emit, _no_restore))

    async with asyncio.timeout(5):
        await clock.sleeping()  # after the first failure
        clock.advance(2.0)
        await clock.sleeping()  # the second failure's wait has begun
    assert consumer.polls == 2 and clock.sleeps == [2.0, 4.0]
    assert metrics.bus_errors == {("kafka", True): 2}

    bus.stop_intake()  # the clock stays where it is: the wait ends by the stop alone
    async with asyncio.timeout(5):
        await task
    assert consumer.polls == 2
