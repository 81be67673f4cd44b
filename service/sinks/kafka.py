"""KafkaSink: aggregates to ``KAFKA_TOPIC``, dead letters to ``KAFKA_DLQ_TOPIC``.

Records are grouped by partition (murmur2 of the key, as the Java client does, so one
name always lands on one partition) and handed to the producer as whole batches: about
three times the throughput of one ``send()`` per record. ``write`` returns once the
broker acknowledged every record (``acks=all``). A failed write may have delivered part
of the batch; retrying it duplicates those records, which consumers see as the same
aggregate again (same key, window and value), never as a different result.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections import defaultdict
from collections.abc import Sequence
from types import TracebackType
from typing import Any, Final, Self

import orjson
from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import (
    AuthenticationFailedError,
    AuthenticationMethodNotSupported,
    ClusterAuthorizationFailedError,
    KafkaConnectionError,
    KafkaError,
    KafkaTimeoutError,
    MessageSizeTooLargeError,
    RecordListTooLargeError,
    RecordTooLargeError,
    SaslAuthenticationFailed,
    TopicAlreadyExistsError,
    TopicAuthorizationFailedError,
    UnsupportedSaslMechanismError,
    for_code,
)
from aiokafka.partitioner import murmur2

from service.clock import Clock, SystemClock
from service.config import KafkaConfig
from service.errors import PermanentSinkError, TransientError
from service.events import Aggregate, DeadLetter, iso_utc
from service.kafka_client import client_options
from service.metrics import MetricsCollector

__all__ = ["KafkaSink", "encode_aggregates"]

log = logging.getLogger(__name__)

_TOO_LARGE: Final = (MessageSizeTooLargeError, RecordListTooLargeError, RecordTooLargeError)
_AUTH: Final = (
    AuthenticationFailedError,
    AuthenticationMethodNotSupported,
    ClusterAuthorizationFailedError,
    SaslAuthenticationFailed,
    TopicAuthorizationFailedError,
    UnsupportedSaslMechanismError,
)
# Headroom for the record and batch headers on top of key and value.
_RECORD_OVERHEAD: Final = 128
# Large batches keep throughput up (only one batch per partition is in flight), while
# staying well below brokers' default message.max.bytes of about 1 MiB.
_MAX_BATCH_BYTES: Final = 512 * 1024

_Record = tuple[bytes, bytes]  # key, value


def encode_aggregates(aggregates: Sequence[Aggregate]) -> list[_Record]:
    """(key, value) records: exactly ``Aggregate.to_json_obj()`` as JSON, keyed by name.

    Formatting ISO times dominates the cost, and a batch repeats the same few window
    bounds and emission times, so each distinct time is formatted once per batch.
    """
    iso = functools.lru_cache(maxsize=None)(iso_utc)
    dumps = orjson.dumps
    return [
        (
            a.name.encode(),
            dumps(
                {
                    "name": a.name,
                    "agg_func": a.agg_func,
                    "value": a.value,
                    "count": a.count,
                    "window_start": iso(a.window_start),
                    "window_end": iso(a.window_end),
                    "emitted_at": iso(a.emitted_at),
                }
            ),
        )
        for a in aggregates
    ]


class KafkaSink:
    """A producer with ``acks=all`` (not idempotent: tansu refuses idempotent producers).

    ``start`` creates the two topics when they are missing (``topic_partitions``
    partitions each; existing topics are left as they are) and raises
    :class:`TransientError` while the brokers are unreachable.
    """

    name = "kafka"

    def __init__(
        self,
        cfg: KafkaConfig,
        metrics: MetricsCollector,
        *,
        clock: Clock | None = None,
        topic_partitions: int = 3,
        request_timeout_s: float = 30.0,
        check_timeout_s: float = 3.0,
    ) -> None:
        self._cfg = cfg
        self._metrics = metrics
        self._clock = clock or SystemClock()
        self._topic_partitions = topic_partitions
        self._request_timeout_ms = int(request_timeout_s * 1000)
        self._check_timeout_s = check_timeout_s
        self._producer: Any = None
        self._servers = ",".join(cfg.bootstrap_servers)

    async def start(self) -> None:
        if self._producer is not None:
            return
        producer = AIOKafkaProducer(
            **client_options(self._cfg),
            acks="all",
            enable_idempotence=False,
            linger_ms=self._cfg.linger_ms,
            max_request_size=self._cfg.max_request_size,
            max_batch_size=min(self._cfg.max_request_size, _MAX_BATCH_BYTES),
            request_timeout_ms=self._request_timeout_ms,
        )
        try:
            await producer.start()
            await self._ensure_topics()
        except BaseException as exc:
            await producer.stop()
            if isinstance(exc, Exception):
                raise self._classify(exc) from exc
            raise
        self._producer = producer

    async def stop(self) -> None:
        producer, self._producer = self._producer, None
        if producer is not None:
            await producer.stop()

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    async def _ensure_topics(self) -> None:
        admin = AIOKafkaAdminClient(
            **client_options(self._cfg), request_timeout_ms=self._request_timeout_ms
        )
        await admin.start()
        try:
            topics = [self._cfg.topic, self._cfg.dlq_topic]
            response = await admin.create_topics(
                [NewTopic(t, self._topic_partitions, 1) for t in dict.fromkeys(topics)]
            )
        finally:
            await admin.close()
        for topic, code, message, *_ in response.topic_errors:
            if code == 0:
                log.info("kafka: created topic %s", topic)
                continue
            err = for_code(code)
            if err is not TopicAlreadyExistsError:
                raise err(f"cannot create topic {topic!r}: {message}")

    async def write(
        self, aggregates: Sequence[Aggregate], dead_letters: Sequence[DeadLetter]
    ) -> None:
        """Produce every record and wait until the broker acknowledged all of them."""
        if not aggregates and not dead_letters:
            return
        if self._producer is None:
            raise RuntimeError("KafkaSink is not started")
        started = self._clock.monotonic()
        futures: list[asyncio.Future[Any]] = []
        try:
            try:
                await self._send(self._cfg.topic, encode_aggregates(aggregates), futures)
                await self._send(
                    self._cfg.dlq_topic,
                    [(d.reason.encode(), orjson.dumps(d.to_json_obj())) for d in dead_letters],
                    futures,
                )
            finally:
                # Even when queueing failed half-way, settle what was queued so that no
                # delivery outcome goes unobserved.
                await self._await_all(futures)
        except Exception as exc:
            err = self._classify(exc)
            self._metrics.on_sink_error(self.name, err.retriable)
            raise err from exc
        self._metrics.on_sink_write(
            self.name, len(aggregates), len(dead_letters), self._clock.monotonic() - started
        )

    async def _send(
        self, topic: str, records: list[_Record], futures: list[asyncio.Future[Any]]
    ) -> None:
        """Queue ``records`` as per-partition batches, adding their delivery futures."""
        if not records:
            return
        limit = self._cfg.max_request_size - _RECORD_OVERHEAD
        for key, value in records:
            if len(key) + len(value) > limit:
                # Checked here so that the error names the record, not a whole batch.
                raise MessageSizeTooLargeError(
                    f"a record for {topic!r} with key {key[:80]!r} is "
                    f"{len(key) + len(value)} bytes"
                )
        producer = self._producer
        partitions = sorted(await producer.partitions_for(topic))
        by_partition: dict[int, list[_Record]] = defaultdict(list)
        partition_of: dict[bytes, int] = {}  # murmur2 is pure Python; names repeat in a batch
        for key, value in records:
            partition = partition_of.get(key)
            if partition is None:
                idx = (murmur2(key) & 0x7FFFFFFF) % len(partitions)
                partition = partition_of[key] = partitions[idx]
            by_partition[partition].append((key, value))
        for partition, items in by_partition.items():
            batch = producer.create_batch()
            for key, value in items:
                if batch.append(key=key, value=value, timestamp=None) is None:
                    # Full: ship it and start the next (a record always fits an empty batch).
                    futures.append(await producer.send_batch(batch, topic, partition=partition))
                    batch = producer.create_batch()
                    batch.append(key=key, value=value, timestamp=None)
            futures.append(await producer.send_batch(batch, topic, partition=partition))

    @staticmethod
    async def _await_all(futures: list[asyncio.Future[Any]]) -> None:
        """Wait for every delivery (not just the first failure), then raise the first error."""
        results = await asyncio.gather(*futures, return_exceptions=True)
        futures.clear()
        for result in results:
            if isinstance(result, BaseException):
                raise result

    async def check(self) -> None:
        if self._producer is None:
            raise TransientError(f"Kafka sink is not started (brokers {self._servers})")
        try:
            async with asyncio.timeout(self._check_timeout_s):
                await self._producer.client.fetch_all_metadata()
        except Exception as exc:
            raise TransientError(
                f"Kafka brokers {self._servers} unreachable: {type(exc).__name__}: {exc}"
            ) from exc

    def _classify(self, exc: Exception) -> TransientError | PermanentSinkError:
        servers = self._servers
        if isinstance(exc, _TOO_LARGE):
            return PermanentSinkError(
                f"Kafka refused a record as too large ({exc}); raise KAFKA_MAX_REQUEST_SIZE "
                f"(now {self._cfg.max_request_size}) and the topic's max.message.bytes"
            )
        if isinstance(exc, _AUTH):
            return PermanentSinkError(
                f"Kafka at {servers} refused authentication or authorisation ({exc}); check "
                "KAFKA_SECURITY_PROTOCOL, the SASL settings and the ACLs for topics "
                f"{self._cfg.topic!r} and {self._cfg.dlq_topic!r}"
            )
        if isinstance(exc, KafkaConnectionError | KafkaTimeoutError | OSError | TimeoutError) or (
            isinstance(exc, KafkaError) and exc.retriable
        ):
            return TransientError(f"Kafka at {servers} unavailable: {type(exc).__name__}: {exc}")
        return PermanentSinkError(
            f"Kafka at {servers} failed with an unexpected error: {type(exc).__name__}: {exc}"
        )
