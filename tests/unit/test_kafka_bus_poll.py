"""KafkaBus.run when polls fail: each failure is counted, retried with backoff on the
injected clock, and a stop ends the wait at once (a fake consumer, no broker)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from aiokafka.errors import (
    IllegalStateError,
    KafkaConnectionError,
    KafkaError,
    TopicAuthorizationFailedError,
    UnknownError,
)

from service.bus.kafka import KafkaBus
from service.checkpoints.base import PartitionCheckpoint
from service.config import BusConfig, KafkaConfig
from service.core.errors import PermanentError
from service.core.retry import Backoff
from service.metrics.collector import MetricsCollector
from tests.fakes.clock import RecordingClock


class FailingConsumer:
    """Just what ``run`` calls; every poll fails, by default as with a broker that is gone."""

    def __init__(self, error: KafkaError | None = None) -> None:
        self.polls = 0
        self.error = error or KafkaConnectionError("broker gone")

    def subscribe(self, topics: list[str], listener: Any) -> None:
        pass

    async def getmany(self, timeout_ms: int, max_records: int) -> dict[Any, list[Any]]:
        self.polls += 1
        raise self.error


async def _no_restore(partitions: Any) -> dict[str, PartitionCheckpoint]:
    return {}


async def _no_emit(item: Any) -> None:
    raise AssertionError("nothing can be emitted")


def _config() -> BusConfig:
    return BusConfig(
        url="kafka://k:9092/t", kind="kafka", kafka_topic="t", kafka_bootstrap_servers=("k:9092",)
    )


async def test_poll_failures_are_counted_backed_off_and_a_stop_ends_the_wait() -> None:
    clock = RecordingClock()
    metrics = MetricsCollector(clock)
    config = _config()
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


@pytest.mark.parametrize("error", [UnknownError(), IllegalStateError("not assigned")])
async def test_an_unknown_failure_or_a_rebalance_race_while_polling_is_retried(
    error: KafkaError,
) -> None:
    """Only a refusal stops a running reader: anything else waits and polls again."""
    clock = RecordingClock()
    metrics = MetricsCollector(clock)
    backoff = Backoff("linear", initial_s=2.0, jitter=False)
    bus = KafkaBus(_config(), KafkaConfig(), metrics, clock, backoff=backoff)
    consumer = FailingConsumer(error)
    bus._consumer = consumer
    task = asyncio.create_task(bus.run(_no_emit, _no_restore))
    async with asyncio.timeout(5):
        await clock.sleeping()
        clock.advance(2.0)
        await clock.sleeping()
    assert consumer.polls == 2 and not task.done()
    bus.stop_intake()
    async with asyncio.timeout(5):
        await task


async def test_a_refused_poll_is_not_retried_but_raised_as_permanent_at_once() -> None:
    """Before, the bus retried every Kafka error for ever, also the ones the sink treats
    as permanent: refused authorisation now ends the intake with what to check."""
    clock = RecordingClock()
    metrics = MetricsCollector(clock)
    bus = KafkaBus(_config(), KafkaConfig(), metrics, clock)
    consumer = FailingConsumer(TopicAuthorizationFailedError())
    bus._consumer = consumer

    with pytest.raises(PermanentError, match=r"refused the request.*ACLs"):
        async with asyncio.timeout(5):
            await bus.run(_no_emit, _no_restore)
    assert consumer.polls == 1 and clock.sleeps == []
    assert metrics.bus_errors == {("kafka", False): 1}
