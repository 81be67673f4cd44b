"""KafkaSink: aggregates to ``KAFKA_TOPIC``, dead letters to ``KAFKA_DLQ_TOPIC``.

With ``ROUTES_FILE`` (docs/routes.md) each aggregate goes to its route's own topic, or
not here at all; every such topic is created, read back and de-duplicated on its own,
like ``KAFKA_TOPIC``. Dead letters always go to ``KAFKA_DLQ_TOPIC``.

Records are grouped by partition (murmur2 of the key, as the Java client does, so one
name always lands on one partition) and handed to the producer as whole batches: about
three times the throughput of one ``send()`` per record. ``write`` returns once the
broker acknowledged every record (``acks=all``).

No transactions, no idempotent producer (tansu refuses both with aiokafka), so the
guarantee rests on deterministic content, a revision and the commit order:

* A failed write may have delivered part of the batch; the retry (or a replay after a
  crash, from the last checkpoint) delivers those records again. A replayed aggregate
  is recomputed from the same events: same key, window, revision, value and ``count``.
  The read-back (:mod:`service.sinks.kafka_read_back`) skips every
  ``(name, tags, agg_func, window_start, revision)`` already in the output, so each
  revision of a window is written once; a later revision is a new record.
* Each value carries ``"revision"`` (1 for the first emission of a window, one more per
  correction) and, when set, ``"tags"`` and ``"sketch"`` (base64): docs/delivery.md
  "Outputs". A consumer keeps, per ``(name, tags, agg_func, window_start)``, the record
  with the greatest ``(revision, count, emitted_at)``, whatever order duplicates arrive
  in. Records of one name stay in one partition, so they also arrive in emission order.
* Source positions are committed only after every record before them is acknowledged.

An aggregate that cannot be encoded (a name holding a lone UTF-16 surrogate, which
UTF-8 JSON cannot carry) goes to the dead-letter topic with reason ``invalid_value``
instead of blocking the output.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
from base64 import b64encode
from collections import defaultdict
from collections.abc import Mapping, Sequence
from typing import Any, Final

import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.errors import MessageSizeTooLargeError
from aiokafka.partitioner import murmur2

from service.config import KafkaConfig
from service.core.clock import Clock
from service.core.errors import PermanentError, TransientError
from service.core.events import Aggregate, DeadLetter, iso_utc
from service.core.lifecycle import AsyncResource
from service.kafka.errors import KAFKA_FAILURES, kafka_error, kafka_error_kind
from service.kafka.options import client_options, create_topics
from service.kafka.reading import read_to_end
from service.metrics.collector import MetricsCollector
from service.routes.matching import Router
from service.sinks.kafka_read_back import AlreadyWritten

__all__ = ["KafkaSink", "encode_aggregates", "encode_dead_letter"]

log = logging.getLogger(__name__)

_STOP_TIMEOUT_S: Final = 5.0

# Headroom for the record and batch headers on top of key and value.
_RECORD_OVERHEAD: Final = 128
# Large batches keep throughput up (only one batch per partition is in flight), while
# staying well below brokers' default message.max.bytes of about 1 MiB.
_MAX_BATCH_BYTES: Final = 512 * 1024

_Record = tuple[bytes, bytes]  # key, value


def encode_aggregates(
    aggregates: Sequence[Aggregate],
) -> tuple[list[_Record], list[tuple[Aggregate, Exception]]]:
    """(records, refused): ``Aggregate.to_json_obj()`` as JSON, keyed by name;
    ``refused`` holds the aggregates that cannot be encoded, with why.

    Formatting ISO times dominates the cost, and a batch repeats the same few window
    bounds and emission times, so each distinct time is formatted once per batch.
    """
    iso = functools.lru_cache(maxsize=None)(iso_utc)
    dumps = orjson.dumps
    records: list[_Record] = []
    refused: list[tuple[Aggregate, Exception]] = []
    for a in aggregates:
        obj = {
            "name": a.name,
            "agg_func": a.agg_func,
            "value": a.value,
            "count": a.count,
            "window_start": iso(a.window_start),
            "window_end": iso(a.window_end),
            "emitted_at": iso(a.emitted_at),
            "revision": a.revision,
        }
        if a.tags is not None:  # orjson writes dicts only, not any Mapping
            obj["tags"] = a.tags if type(a.tags) is dict else dict(a.tags)
        if a.sketch is not None:
            obj["sketch"] = b64encode(a.sketch).decode("ascii")
        try:
            records.append((a.name.encode(), dumps(obj)))
        except (UnicodeEncodeError, TypeError) as exc:  # lone surrogates in the name
            refused.append((a, exc))
    return records, refused


def _utf8_text(value: Any) -> Any:
    return value.encode("utf-8", "backslashreplace").decode() if type(value) is str else value


def encode_dead_letter(d: DeadLetter, max_bytes: int) -> _Record:
    """(reason, JSON): always valid UTF-8 JSON that any parser reads, even when a field
    holds a lone surrogate (then it is written as the six characters ``\\udXXX``, not as
    an escape that strict parsers such as orjson refuse), and at most
    ``max_bytes`` long: ``raw`` is cut (and says so) rather than the output refusing a
    record it can never deliver."""
    key = d.reason.encode("utf-8", "backslashreplace")
    obj = d.to_json_obj()
    raw = d.raw
    while True:
        try:
            value = orjson.dumps(obj)
        except TypeError:  # a lone surrogate: written as the text \udXXX, as UTF-8 allows
            value = orjson.dumps({k: _utf8_text(v) for k, v in obj.items()})
        if len(key) + len(value) <= max_bytes or not raw:
            return key, value
        raw = raw[: len(raw) // 2]
        obj["raw"] = raw + "...[truncated]"


class KafkaSink(AsyncResource):
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
        clock: Clock,
        *,
        topic_partitions: int = 3,
        request_timeout_s: float = 30.0,
        check_timeout_s: float = 3.0,
        router: Router | None = None,
    ) -> None:
        self._cfg = cfg
        # ROUTES_FILE: aggregates go to their route's topic (or nowhere here); None: all
        # to KAFKA_TOPIC, as without routing
        self._router = router
        self._topics = router.destinations("kafka") if router else (cfg.topic,)
        self._metrics = metrics
        self._clock = clock
        self._topic_partitions = topic_partitions
        self._request_timeout_ms = int(request_timeout_s * 1000)
        self._check_timeout_s = check_timeout_s
        self._producer: Any = None
        self._servers = ",".join(cfg.bootstrap_servers)
        # "<topic>:<partition>" -> an offset up to which the partition is written
        self._written: dict[str, int] = {}
        self._seen = AlreadyWritten()  # KAFKA_TOPIC and the dead-letter topic
        # each route's own topic: an identity is per topic (a route's record is not the
        # default topic's)
        self._seen_routed = {t: AlreadyWritten() for t in self._topics if t != cfg.topic}

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
            self._written = await self._end_offsets()
        except BaseException as exc:
            await producer.stop()
            if isinstance(exc, Exception):
                raise self._classify(exc, "start") from exc
            raise
        self._producer = producer

    async def stop(self) -> None:
        producer, self._producer = self._producer, None
        if producer is None:
            return
        # With the broker gone, aiokafka would wait about 25 s for batches it cannot send;
        # nothing unacknowledged is lost (it was never checkpointed), so give up sooner.
        try:
            async with asyncio.timeout(_STOP_TIMEOUT_S):
                await producer.stop()
        except TimeoutError:
            log.warning("kafka: producer not closed within %.0fs; abandoned", _STOP_TIMEOUT_S)

    async def _ensure_topics(self) -> None:
        options = {**client_options(self._cfg), "request_timeout_ms": self._request_timeout_ms}
        topics = [*self._topics, self._cfg.dlq_topic]
        for error in (await create_topics(options, topics, self._topic_partitions)).values():
            raise error

    async def _end_offsets(self) -> dict[str, int]:
        """Where each output partition ends now. Some brokers (tansu) answer with the
        base offset of the last batch, which is lower: that only reads back more."""
        consumer = AIOKafkaConsumer(**client_options(self._cfg), enable_auto_commit=False)
        await consumer.start()
        try:
            tps = [
                TopicPartition(t, p)
                for t in (*self._topics, self._cfg.dlq_topic)
                for p in (consumer.partitions_for_topic(t) or await self._partitions(t))
            ]
            ends = await consumer.end_offsets(tps) if tps else {}
        finally:
            await consumer.stop()
        return {f"{tp.topic}:{tp.partition}": int(o) for tp, o in ends.items()}

    async def _partitions(self, topic: str) -> set[int]:
        return set(await self._producer_or_fail().partitions_for(topic))

    def _producer_or_fail(self) -> Any:
        if self._producer is None:
            raise RuntimeError("KafkaSink is not started")
        return self._producer

    def written_offsets(self) -> dict[str, int]:
        return dict(self._written)

    async def read_back(self, offsets: Mapping[str, int]) -> None:
        """Read both topics from ``offsets`` to their end and remember every aggregate
        and dead letter found there: :meth:`write` skips those records when a replay
        recomputes them (aggregates by ``(name, tags, agg_func, window, revision)``,
        :mod:`service.sinks.kafka_read_back`), so a restart or hand-off never writes one
        twice. Transient broker trouble raises :class:`TransientError`."""
        started = self._clock.monotonic()
        ours = (*self._topics, self._cfg.dlq_topic)
        tps = {}
        for key, offset in offsets.items():
            topic, _, partition = key.rpartition(":")
            if topic in ours:
                tps[TopicPartition(topic, int(partition))] = offset
        if not tps:
            return
        consumer = AIOKafkaConsumer(**client_options(self._cfg), enable_auto_commit=False)
        try:
            await consumer.start()
            consumer.assign(list(tps))
            for tp, offset in tps.items():
                consumer.seek(tp, offset)
            found: list[tuple[str, bytes]] = []

            def keep(tp: TopicPartition, record: Any) -> None:
                if record.value is not None:
                    found.append((tp.topic, record.value))

            await read_to_end(
                consumer,
                list(tps),
                keep,
                timeout_s=self._request_timeout_ms / 1000,
                max_records=50_000,
            )
        except KAFKA_FAILURES as exc:
            raise self._classify(exc, "read back the outputs") from exc
        finally:
            await consumer.stop()
        now = self._clock.monotonic()
        routed = self._seen_routed
        self._seen.add([f for f in found if f[0] not in routed], self._cfg.topic, now)
        for topic, seen in routed.items():
            seen.add([f for f in found if f[0] == topic], topic, now)
        log.info(
            "kafka: read back %d record(s) written after the checkpoint in %.2fs",
            len(found),
            self._clock.monotonic() - started,
        )

    async def write(
        self, aggregates: Sequence[Aggregate], dead_letters: Sequence[DeadLetter]
    ) -> None:
        """Produce every record and wait until the broker acknowledged all of them;
        records read back after a restore are not written again. With routes, each
        aggregate goes to its route's topic, or is not written here."""
        if self._router is None:
            groups: list[tuple[str | None, str, Sequence[Aggregate]]] = [
                (None, self._cfg.topic, aggregates)
            ]
        else:
            groups = [*self._router.split(aggregates, "kafka")]
        if self._seen or any(self._seen_routed.values()):
            groups, dead_letters = self._drop_written(groups, dead_letters)
        if not dead_letters and not any(aggs for _, _, aggs in groups):
            return
        if self._producer is None:
            raise RuntimeError("KafkaSink is not started")
        started = self._clock.monotonic()
        futures: list[asyncio.Future[Any]] = []
        encoded = [(route, topic, *encode_aggregates(aggs)) for route, topic, aggs in groups]
        created = [
            DeadLetter(
                raw=json.dumps(a.to_json_obj()),
                reason="invalid_value",
                detail=f"the Kafka output cannot encode this aggregate as UTF-8 JSON: {exc}",
                source=f"sink:kafka:{topic}",
                received_at=self._clock.now(),
            )
            for _, topic, _, refused in encoded
            for a, exc in refused
        ]
        if created:
            log.warning(
                "kafka: %d aggregate(s) that cannot be encoded were dead-lettered", len(created)
            )
        try:
            try:
                for _, topic, records, _ in encoded:
                    await self._send(topic, records, futures)
                await self._send(
                    self._cfg.dlq_topic,
                    [
                        encode_dead_letter(d, self._cfg.max_request_size - _RECORD_OVERHEAD)
                        for d in (*dead_letters, *created)
                    ],
                    futures,
                )
            finally:
                # Even when queueing failed half-way, settle what was queued so that no
                # delivery outcome goes unobserved.
                await self._await_all(futures)
        except Exception as exc:
            err = self._classify(exc, "write")
            self._metrics.on_sink_error(self.name, err.retriable)
            raise err from exc
        self._metrics.on_sink_write(
            self.name,
            sum(len(records) for _, _, records, _ in encoded),
            len(dead_letters) + len(created),
            self._clock.monotonic() - started,
        )
        for route, topic, records, _ in encoded:
            if route is not None and records:
                self._metrics.on_route_written(route, f"kafka:{topic}", len(records))

    def _drop_written(
        self,
        groups: list[tuple[str | None, str, Sequence[Aggregate]]],
        dead_letters: Sequence[DeadLetter],
    ) -> tuple[list[tuple[str | None, str, Sequence[Aggregate]]], Sequence[DeadLetter]]:
        """The records not already in the output (:class:`AlreadyWritten`), per topic."""
        now = self._clock.monotonic()
        # dead letters are counted down once: they go to the one dead-letter topic
        _, kept_d = self._seen.drop_written((), dead_letters, now)
        skipped = len(dead_letters) - len(kept_d)
        kept: list[tuple[str | None, str, Sequence[Aggregate]]] = []
        for route, topic, aggs in groups:
            seen = self._seen_routed.get(topic, self._seen)
            kept_a, _ = seen.drop_written(aggs, (), now)
            skipped += len(aggs) - len(kept_a)
            kept.append((route, topic, kept_a))
        if skipped:
            log.info("kafka: %d record(s) already in the output were not written again", skipped)
        return kept, kept_d

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
                    f"a record for {topic!r} with key {key[:80]!r} is {len(key) + len(value)} bytes"
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
                    futures.append(
                        self._track(
                            await producer.send_batch(batch, topic, partition=partition),
                            topic,
                            batch,
                        )
                    )
                    batch = producer.create_batch()
                    batch.append(key=key, value=value, timestamp=None)
            futures.append(
                self._track(
                    await producer.send_batch(batch, topic, partition=partition), topic, batch
                )
            )

    def _track(self, sent: asyncio.Future[Any], topic: str, batch: Any) -> asyncio.Future[Any]:
        """Note, once acknowledged, how far the batch's partition is written."""
        count = batch.record_count()

        def written(done: asyncio.Future[Any]) -> None:
            if done.cancelled() or done.exception() is not None:
                return
            meta = done.result()
            key = f"{topic}:{meta.partition}"
            self._written[key] = max(self._written.get(key, 0), meta.offset + count)

        sent.add_done_callback(written)
        return sent

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

    def _classify(self, exc: Exception, operation: str) -> TransientError | PermanentError:
        """``exc`` as :func:`service.kafka.errors.kafka_error` says, with what to change."""
        kind = kafka_error_kind(exc)
        hint = ""
        if kind == "record":
            hint = (
                f"raise KAFKA_MAX_REQUEST_SIZE (now {self._cfg.max_request_size}) and the "
                "topic's max.message.bytes"
            )
        elif kind == "config":
            hint = (
                "check KAFKA_SECURITY_PROTOCOL, the SASL settings and the ACLs for topics "
                f"{', '.join(map(repr, self._topics))} and {self._cfg.dlq_topic!r}"
            )
        return kafka_error(exc, f"kafka sink: {operation}", self._servers, hint=hint)
