"""KafkaCheckpointStore: checkpoints in a compacted Kafka topic of the consumer group's.

Where no PostgreSQL is configured, the state must still live in the cluster, so that a
partition moving to another instance of the group (a join, a leave, a ``kill -9``)
takes its open windows and its history with it. Every instance of the group writes to
and reads from one topic, ``vabus-checkpoints.<group>`` (one partition, compacted:
the idea of Kafka Streams' changelog topics, reduced to "the latest checkpoint of each
input partition").

Record layout (keys are JSON arrays, so no separator can be ambiguous):

* ``[namespace, partition, "chunk", slot, i]`` -> 8-byte epoch + bytes ``i`` of the
  state; a state larger than ``chunk_bytes`` spans several records, since brokers
  refuse large messages;
* ``[namespace, partition, "head"]`` -> ``{"epoch", "slot", "position", "chunks",
  "size"}``, written only after all of its chunks are acknowledged.

Each save writes its chunks into the slot (0 or 1) that the current head does *not*
name, then the new head. So a checkpoint becomes visible whole or not at all: a crash
between the chunks and the head leaves the previous head and its slot untouched.
Compaction keeps at most two slots of chunks per partition.

The store keeps a consumer on the topic and reads only what is new at each ``load``,
so a restore costs reading the checkpoints written since the last one, not the topic.
"""

from __future__ import annotations

import asyncio
import logging
import re
import struct
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Final

import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from service.checkpoints.base import PartitionCheckpoint
from service.core.errors import PermanentError, TransientError
from service.core.lifecycle import AsyncResource
from service.kafka.clients import stop_clients
from service.kafka.errors import KAFKA_FAILURES, kafka_error
from service.kafka.options import create_topics
from service.kafka.reading import read_to_end

__all__ = ["KafkaCheckpointStore", "checkpoint_topic"]

log = logging.getLogger(__name__)

CHUNK_BYTES: Final = 512 * 1024
_EPOCH: Final = struct.Struct(">Q")
_UNSAFE: Final = re.compile(r"[^A-Za-z0-9._-]")
_READ_TIMEOUT_S: Final = 30.0


def checkpoint_topic(group: str) -> str:
    """The checkpoint topic of a consumer group (a valid topic name for any group id)."""
    return f"vabus-checkpoints.{_UNSAFE.sub('_', group)}"[:249]


@dataclass(slots=True)
class _Latest:
    """What has been read of one input partition's checkpoints."""

    head: dict[str, Any] | None = None
    # (slot, i) -> (epoch, data)
    chunks: dict[tuple[int, int], tuple[int, bytes]] = field(default_factory=dict)


class KafkaCheckpointStore(AsyncResource):
    """Implements :class:`~service.checkpoints.base.CheckpointStore` in a Kafka topic.

    ``options`` are aiokafka client options (servers and security, see
    :func:`service.kafka.options.client_options`). Failures are classified by
    :mod:`service.kafka.errors`: broker trouble surfaces as :class:`TransientError`,
    which the sender retries; a refusal (authorisation, an invalid topic) as
    :class:`PermanentError`.
    """

    def __init__(
        self,
        options: dict[str, Any],
        topic: str,
        namespace: str,
        *,
        chunk_bytes: int = CHUNK_BYTES,
        timeout_s: float = _READ_TIMEOUT_S,
    ) -> None:
        self._options = options
        self.topic = topic
        self.namespace = namespace
        self._chunk = chunk_bytes
        self._timeout_s = timeout_s
        self._tp = TopicPartition(topic, 0)
        self._producer: AIOKafkaProducer | None = None
        self._consumer: AIOKafkaConsumer | None = None
        self._latest: dict[str, _Latest] = {}
        self._read_lock = asyncio.Lock()
        self._last_epoch = 0

    async def start(self) -> None:
        if self._producer is not None:
            return
        try:
            await self._ensure_topic()
            producer = AIOKafkaProducer(
                **self._options, acks="all", linger_ms=5, max_request_size=self._chunk + 65536
            )
            await producer.start()
            self._producer = producer
            consumer = AIOKafkaConsumer(
                **self._options, enable_auto_commit=False, auto_offset_reset="earliest"
            )
            await consumer.start()
            consumer.assign([self._tp])
            await consumer.seek_to_beginning(self._tp)
            self._consumer = consumer
        except KAFKA_FAILURES as exc:
            await self.stop()
            raise self._error(exc, "start") from exc

    async def stop(self) -> None:
        producer, self._producer = self._producer, None
        consumer, self._consumer = self._consumer, None
        await stop_clients(producer, consumer)

    async def _ensure_topic(self) -> None:
        # compacted: only the newest record per key matters; never deleted by age
        configs = {"cleanup.policy": "compact", "retention.ms": "-1"}
        refused = await create_topics(self._options, [self.topic], 1, configs)
        if refused:
            raise refused[self.topic]

    # -- reading ------------------------------------------------------------------------
    async def load(self, partitions: Sequence[str]) -> dict[str, PartitionCheckpoint]:
        """The newest complete checkpoint of each of these partitions (absent: never)."""
        try:
            await self._catch_up()
        except KAFKA_FAILURES as exc:
            raise self._error(exc, "read") from exc
        found: dict[str, PartitionCheckpoint] = {}
        for p in partitions:
            cp = self._complete(p)
            if cp is not None:
                found[p] = cp
        return found

    def _complete(self, partition: str) -> PartitionCheckpoint | None:
        latest = self._latest.get(partition)
        if latest is None or latest.head is None:
            return None
        head = latest.head
        epoch, slot, n = head["epoch"], head["slot"], head["chunks"]
        parts = [latest.chunks.get((slot, i)) for i in range(n)]
        if any(c is None or c[0] != epoch for c in parts):
            log.error(
                "kafka checkpoints: checkpoint of %s (epoch %d) is incomplete in %s; "
                "it replays from the committed offset",
                partition,
                epoch,
                self.topic,
            )
            return None
        state = b"".join(c[1] for c in parts if c is not None) if n else None
        return PartitionCheckpoint(partition, head["position"], state, head.get("outputs"))

    async def _catch_up(self) -> None:
        """Read every record acknowledged before this call."""
        consumer = self._require(self._consumer)
        async with self._read_lock:
            await read_to_end(
                consumer,
                [self._tp],
                lambda _tp, record: self._apply(record.key, record.value),
                timeout_s=self._timeout_s,
            )

    def _apply(self, key: bytes | None, value: bytes | None) -> None:
        if key is None:
            return
        try:
            ns, partition, kind, *rest = orjson.loads(key)
        except (orjson.JSONDecodeError, ValueError, TypeError):
            return  # not ours
        if ns != self.namespace:
            return
        latest = self._latest.setdefault(partition, _Latest())
        if kind == "head":
            latest.head = None if value is None else orjson.loads(value)
        elif kind == "chunk" and len(rest) == 2 and value is not None:
            (epoch,) = _EPOCH.unpack_from(value)
            latest.chunks[(int(rest[0]), int(rest[1]))] = (epoch, value[_EPOCH.size :])

    # -- writing ------------------------------------------------------------------------
    async def save(self, checkpoints: Sequence[PartitionCheckpoint]) -> None:
        """Chunks into the free slot first, heads after every chunk is acknowledged."""
        producer = self._require(self._producer)
        heads: list[tuple[bytes, bytes]] = []
        chunks: list[tuple[bytes, bytes]] = []
        for cp in checkpoints:
            latest = self._latest.setdefault(cp.partition, _Latest())
            slot = 1 - latest.head["slot"] if latest.head is not None else 0
            epoch = self._next_epoch()
            state = cp.state or b""
            pieces = [state[i : i + self._chunk] for i in range(0, len(state), self._chunk)]
            for i, piece in enumerate(pieces):
                key = orjson.dumps([self.namespace, cp.partition, "chunk", slot, i])
                chunks.append((key, _EPOCH.pack(epoch) + piece))
            head = {
                "epoch": epoch,
                "slot": slot,
                "position": cp.position,
                "outputs": None if cp.outputs is None else dict(cp.outputs),
                "chunks": len(pieces),
                "size": len(state),
            }
            heads.append((orjson.dumps([self.namespace, cp.partition, "head"]), orjson.dumps(head)))
        try:
            for records in (chunks, heads):
                sent = [await producer.send(self.topic, v, key=k, partition=0) for k, v in records]
                await asyncio.gather(*sent)
        except KAFKA_FAILURES as exc:
            raise self._error(exc, "write") from exc
        for key, value in (*chunks, *heads):  # what we wrote is what a reader would see
            self._apply(key, value)

    def _error(self, exc: Exception, operation: str) -> TransientError | PermanentError:
        servers = str(self._options.get("bootstrap_servers", "?"))
        return kafka_error(exc, f"checkpoint topic {self.topic!r}: {operation}", servers)

    def _next_epoch(self) -> int:
        """Increasing across saves and restarts (nanoseconds of wall time, or one more)."""
        self._last_epoch = max(self._last_epoch + 1, time.time_ns())
        return self._last_epoch

    def _require(self, client: Any) -> Any:
        if client is None:
            raise RuntimeError("KafkaCheckpointStore is not started")
        return client
