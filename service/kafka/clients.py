"""Closing the Kafka clients a component owns."""

from __future__ import annotations

import contextlib

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.errors import KafkaError

__all__ = ["stop_clients"]


async def stop_clients(
    producer: AIOKafkaProducer | None, consumer: AIOKafkaConsumer | None
) -> None:
    """Stop the producer, then the consumer (either may be absent). A broker error
    while stopping the producer is swallowed; the consumer's propagates."""
    if producer is not None:
        with contextlib.suppress(KafkaError):
            await producer.stop()
    if consumer is not None:
        await consumer.stop()
