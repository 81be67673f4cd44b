"""KafkaCheckpointStore classifies broker failures as every Kafka user does
(``service.kafka.errors``). Before, every Kafka error of the store was transient, so the
sender retried a refusal for ever while the Kafka sink called the same error permanent.
The broker used in the tests (tansu) refuses nothing (no ACLs, any topic name), so the
refusal comes from a stand-in producer."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from aiokafka.errors import KafkaConnectionError, KafkaError, TopicAuthorizationFailedError

from service.checkpoints.base import PartitionCheckpoint
from service.checkpoints.kafka import KafkaCheckpointStore
from service.core.errors import PermanentError, TransientError


class RefusingProducer:
    """Just what ``save`` calls; every send fails with ``error``."""

    def __init__(self, error: KafkaError) -> None:
        self.error = error

    async def send(self, topic: str, value: bytes, key: bytes, partition: int) -> Any:
        raise self.error


def _store(error: KafkaError) -> KafkaCheckpointStore:
    store = KafkaCheckpointStore({"bootstrap_servers": "k:9092"}, "vabus-checkpoints.g", "ns")
    store._producer = RefusingProducer(error)
    return store


async def test_a_refused_save_is_permanent_and_says_what_to_check() -> None:
    store = _store(TopicAuthorizationFailedError())
    with pytest.raises(PermanentError, match=r"k:9092 refused the request.*ACLs"):
        await store.save([PartitionCheckpoint("t:0", "1", b"s")])


async def test_a_save_to_an_unreachable_broker_is_transient() -> None:
    store = _store(KafkaConnectionError("gone"))
    with pytest.raises(TransientError, match=r"k:9092 unavailable \(checkpoint topic"):
        await store.save([PartitionCheckpoint("t:0", "1", b"s")])


async def test_a_read_that_times_out_is_transient() -> None:
    class SlowConsumer:
        async def end_offsets(self, partitions: Any) -> Any:
            await asyncio.Event().wait()  # no answer, ever

    store = KafkaCheckpointStore(
        {"bootstrap_servers": "k:9092"}, "vabus-checkpoints.g", "ns", timeout_s=0.01
    )
    store._consumer = SlowConsumer()
    with pytest.raises(TransientError, match="TimeoutError"):
        await store.load(["t:0"])
