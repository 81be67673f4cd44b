"""The repartition router's one retry loop (a stand-in consumer, no broker: the broker
of the tests refuses nothing). A transient failure drops the batch, rewinds to the last
commit and tries again after 1 s on the injected clock; a refusal ends routing at once
(before, every Kafka error was retried for ever)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from aiokafka.errors import KafkaConnectionError, KafkaError, TopicAuthorizationFailedError

from service.config import BusConfig, KafkaConfig
from service.core.clock import ManualClock
from service.core.errors import PermanentError
from service.repartition.router import Router
from tests.fakes.clock import RecordingClock


class FailingConsumer:
    """Just what ``run`` calls; every poll fails with ``error``; nothing is assigned."""

    def __init__(self, error: KafkaError) -> None:
        self.error = error
        self.polls = 0

    def subscribe(self, topics: list[str], listener: Any) -> None:
        pass

    def assignment(self) -> set[Any]:
        return set()

    async def getmany(self, timeout_ms: int, max_records: int) -> dict[Any, list[Any]]:
        self.polls += 1
        raise self.error


class Outbox:
    def __init__(self) -> None:
        self.discards = 0

    def discard(self) -> None:
        self.discards += 1


def _router(error: KafkaError, clock: ManualClock) -> tuple[Router, FailingConsumer, Outbox]:
    config = BusConfig(
        url="kafka://k:9092/t", kind="kafka", kafka_topic="t", kafka_bootstrap_servers=("k:9092",)
    )
    router = Router(config, KafkaConfig(), clock)
    consumer, outbox = FailingConsumer(error), Outbox()
    router._consumer = consumer
    router._outbox = outbox  # type: ignore[assignment]
    return router, consumer, outbox


async def test_a_transient_failure_drops_the_batch_and_is_retried_until_the_stop() -> None:
    clock = RecordingClock()
    router, consumer, outbox = _router(KafkaConnectionError("gone"), clock)
    task = asyncio.create_task(router.run())
    async with asyncio.timeout(5):
        await clock.sleeping()
        clock.advance(1.0)
        await clock.sleeping()
    assert consumer.polls == 2 and outbox.discards == 2 and clock.sleeps == [1.0, 1.0]
    router.stop_intake()
    async with asyncio.timeout(5):
        await task  # a stop ends the wait; nothing is raised


async def test_a_refusal_ends_routing_at_once_with_what_to_check() -> None:
    clock = RecordingClock()
    router, consumer, outbox = _router(TopicAuthorizationFailedError(), clock)
    with pytest.raises(PermanentError, match=r"k:9092 refused the request \(repartition"):
        async with asyncio.timeout(5):
            await router.run()
    assert consumer.polls == 1 and outbox.discards == 1 and clock.sleeps == []
