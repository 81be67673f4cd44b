"""The Kafka bus's clients: starting its group member, checking its input topic,
committing, its metrics producer and the readiness check."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.errors import KafkaError

from service.config import BusConfig
from service.core.errors import TransientError
from service.core.events import Metric
from service.kafka.errors import KAFKA_FAILURES, kafka_error, kafka_error_kind
from service.kafka.options import create_topics, group_member_options

__all__ = [
    "broker_topics",
    "check_topic",
    "commit_offsets",
    "connect_consumer",
    "require_input_topic",
    "send_metrics",
    "start_metrics_producer",
]

log = logging.getLogger(__name__)

_MAX_PARTITION_FETCH_BYTES = 8 * 1024 * 1024
_FETCH_MAX_BYTES = 64 * 1024 * 1024  # with smaller fetches consumption was measurably slower
_METRICS_TIMEOUT_S = 5.0
_CHECK_TIMEOUT_S = 5.0


async def connect_consumer(
    cfg: BusConfig, options: dict[str, Any], revoke_timeout_s: float
) -> AIOKafkaConsumer:
    servers = options["bootstrap_servers"]
    try:
        consumer = await _start_consumer(cfg, options, revoke_timeout_s)
    except KAFKA_FAILURES as exc:
        raise kafka_error(
            exc,
            "kafka bus: connect",
            servers,
            hint="check VABUS_URL and that the broker is running",
        ) from exc
    log.info("kafka bus: connected to %s", servers)
    return consumer


async def _start_consumer(
    cfg: BusConfig, options: dict[str, Any], revoke_timeout_s: float
) -> AIOKafkaConsumer:
    """A started group member, or the start's error with the half-made client closed."""
    session_ms = cfg.kafka_session_timeout_ms
    consumer = AIOKafkaConsumer(
        **options,
        **group_member_options(cfg.kafka_group, session_ms),
        # the group waits this long for a member still checkpointing its revoked
        # partitions before it is thrown out
        rebalance_timeout_ms=max(session_ms, int(revoke_timeout_s * 1000) + 5000),
        max_partition_fetch_bytes=_MAX_PARTITION_FETCH_BYTES,
        fetch_max_bytes=_FETCH_MAX_BYTES,
    )
    try:
        await consumer.start()
    except BaseException:
        with contextlib.suppress(KafkaError):
            await consumer.stop()
        raise
    return consumer


async def require_input_topic(consumer: AIOKafkaConsumer, topic: str, servers: Any) -> set[str]:
    """The broker's topics, which must include the input topic (it belongs to the
    producers: it is waited for by the caller's start loop, never created)."""
    try:
        topics: set[str] = await consumer.topics()
    except KAFKA_FAILURES as exc:
        raise kafka_error(exc, "kafka bus: list topics", servers) from exc
    if topic not in topics:
        raise TransientError(
            f"input topic {topic!r} does not exist on {servers} yet; "
            "it is not created by this service"
        )
    return topics


async def start_metrics_producer(
    options: dict[str, Any], topic: str, topics: set[str]
) -> AIOKafkaProducer | None:
    """A small producer for our own metrics; failure only costs metrics, so it is logged."""
    try:
        if topic not in topics:
            # one partition: metrics are best-effort
            for error in (await create_topics(options, [topic], 1)).values():
                log.warning("kafka bus: %s", error)
        producer = AIOKafkaProducer(**options, linger_ms=50, acks=1)
        await producer.start()
    except KAFKA_FAILURES as exc:
        log.warning("kafka bus: metrics topic %r unavailable (%s)", topic, exc)
        return None
    return producer


async def send_metrics(producer: AIOKafkaProducer, topic: str, metrics: Sequence[Metric]) -> None:
    """Produce one JSON object per metric; gives up after a few seconds (raises)."""
    async with asyncio.timeout(_METRICS_TIMEOUT_S):
        sent: list[Awaitable[Any]] = [
            await producer.send(topic, orjson.dumps(m.to_json_obj()), key=m.name.encode())
            for m in metrics
        ]
        await asyncio.gather(*sent)


async def broker_topics(consumer: AIOKafkaConsumer | None, options: dict[str, Any]) -> set[str]:
    """The broker's topics, through the running consumer or a short-lived probe."""
    if consumer is not None:
        topics: set[str] = await consumer.topics()
        return topics
    probe = AIOKafkaConsumer(**options, request_timeout_ms=4000)
    try:
        await probe.start()
        topics = await probe.topics()
    finally:
        await probe.stop()
    return topics


async def check_topic(
    consumer: AIOKafkaConsumer | None, options: dict[str, Any], topic: str, servers: Any
) -> None:
    """Raise :class:`TransientError` unless the broker answers and the topic exists."""
    try:
        async with asyncio.timeout(_CHECK_TIMEOUT_S):
            topics = await broker_topics(consumer, options)
    except KAFKA_FAILURES as exc:  # readiness: any failure means "not ready now"
        raise TransientError(f"Kafka bus {servers} unreachable ({type(exc).__name__})") from exc
    if topic not in topics:
        raise TransientError(f"Kafka bus {servers}: topic {topic!r} does not exist")


async def commit_offsets(
    consumer: AIOKafkaConsumer,
    offsets: dict[TopicPartition, int],
    servers: Any,
    on_error: Callable[[bool], None],
) -> None:
    """Commit; a broker failure is logged and told to ``on_error(transient)``, never
    raised (the checkpoint store, not Kafka, is the source of truth)."""
    try:
        await consumer.commit(offsets)
    except KAFKA_FAILURES as exc:
        kind = kafka_error_kind(exc)
        if kind == "ownership":
            log.info("kafka bus: commit skipped after a rebalance (%s)", exc)
            return
        on_error(kind == "transient")
        log.warning("kafka bus: commit to %s failed (%s)", servers, exc)
