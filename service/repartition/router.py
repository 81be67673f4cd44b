"""``repartition=true``: input that is not keyed by event name, routed by name first.

Windows are kept per input partition, so two instances that each see part of one name's
events would each emit a partial aggregate. With ``?repartition=true`` every instance
runs two stages on the Kafka bus:

1. **Routing** (:class:`Router`): a member of the consumer group ``<group>`` on the
   input topic. It splits each message into its events and writes each one, keyed by
   its name, to the internal topic ``vabus-repartition.<group>`` (as many partitions as
   the input topic; created at start-up when missing). Each record carries the header
   ``vabus-origin: <topic>:<partition>:<offset>:<element>``. Only after the broker has
   acknowledged a batch are its input offsets committed (to Kafka: this stage has no
   other state). Messages without a usable name (not JSON, not an object, no string
   name) are routed by their input partition, so they reach the windowing stage's
   validation and dead letters the same way every time.
2. **Windowing**: the usual :class:`~service.bus.kafka.KafkaBus` on the internal topic,
   group ``<group>.windows``. Now each name lives in one partition: any number of
   instances give one exact result per window.

**Event time across the hand-off.** In an internal partition the names of every input
partition meet, so its event time must follow the slowest input partition, or one that
changes routing instance (seconds without records) would come back late. About once a
second each routing instance writes a progress report to every internal partition: for
each input partition it reads, the largest valid event time routed, whether it is caught
up and how long it has been silent (:mod:`service.repartition.records`). The windowing
stage holds each internal partition's event time per input partition with it
(:mod:`service.aggregation.origins`), so a hand-off only delays windows, and the quiet
rule is decided where the input is read.

**No event counted twice.** A crash of the routing stage replays the input from its
committed offsets, so the internal topic may hold a record twice. The routing stage
writes one input partition's records in order, so in each internal partition the
origins of one input partition only increase; the windowing stage keeps the last
origin seen per input partition in the internal partition's checkpoint (with its
windows) and drops any record that is not newer. Counted as
``vabus_aggregator_replays_dropped_total``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, Final

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener, TopicPartition
from aiokafka.errors import KafkaError

from service.aggregation.series import TagRule
from service.bus.base import REPORT_INTERVAL_S, Emit, OriginReport, Progress, Restore
from service.bus.kafka import KafkaBus
from service.config import AggregationConfig, BusConfig, KafkaConfig
from service.core.clock import Clock
from service.core.errors import TransientError
from service.core.events import Metric
from service.core.lifecycle import AsyncResource
from service.core.retry import Backoff, retry
from service.kafka.errors import KAFKA_FAILURES, kafka_error, keeps_reading
from service.kafka.options import bus_client_options, create_topics, group_member_options
from service.kafka.reading import poll_unless_stopped
from service.metrics.collector import MetricsCollector
from service.repartition import records
from service.repartition.keying import Routed, route
from service.repartition.outbox import Outbox
from service.repartition.records import (
    EXCESS_HEADER,
    ORIGIN_HEADER,
    PROGRESS_HEADER,
    encode_progress,
    excess_record,
)

__all__ = ["RepartitionedBus", "Router", "internal_topic", "windowing_group"]

log = logging.getLogger(__name__)

_UNSAFE: Final = re.compile(r"[^A-Za-z0-9._-]")
_POLL_MS: Final = 500
_MAX_RECORDS: Final = 5_000
_RETRY: Final = Backoff(kind="fixed", initial_s=1.0)  # a failed batch is read again
_DEFAULT_MAX_FUTURE_S: Final = AggregationConfig().max_future_s
_DEFAULT_MAX_LEAD_S: Final = AggregationConfig().max_watermark_lead_s
_BATCH_BYTES: Final = 512 * 1024  # one record batch of the internal topic, below 1 MB limits


def internal_topic(group: str) -> str:
    return f"vabus-repartition.{_UNSAFE.sub('_', group)}"[:249]


def windowing_group(group: str) -> str:
    return f"{group}.windows"


@dataclass(slots=True)
class _Owned:
    """An input partition this routing instance reads: what its progress reports say."""

    next_offset: int
    last_message_at: float  # monotonic time of the last fetch that brought messages
    max_ts: float | None = None

    def report(self, highwater: int | None, now: float) -> OriginReport:
        caught_up = highwater is not None and self.next_offset >= highwater
        return OriginReport(self.max_ts, caught_up, max(0.0, now - self.last_message_at))


class Router(AsyncResource):
    """Stage one: input topic → internal topic, keyed by name (see the module docstring)."""

    def __init__(
        self,
        bus_cfg: BusConfig,
        kafka_cfg: KafkaConfig,
        clock: Clock,
        max_future_s: float = _DEFAULT_MAX_FUTURE_S,
        max_lead_s: float = _DEFAULT_MAX_LEAD_S,
        group_by: tuple[str, ...] = (),
    ) -> None:
        self._cfg = bus_cfg
        # AGGREGATION_GROUP_BY: an event with unusable tags moves no progress (it will
        # be dead-lettered as invalid_tags); the budget plays no part here
        self._tags = TagRule(group_by, 1) if group_by else None
        self._options = bus_client_options(bus_cfg, kafka_cfg)
        self._servers = str(self._options["bootstrap_servers"])
        self._clock = clock
        self._max_future_s = max_future_s
        self._max_lead_s = max_lead_s  # AGGREGATION_MAX_WATERMARK_LEAD
        self.topic = internal_topic(bus_cfg.kafka_group)
        self._consumer: AIOKafkaConsumer | None = None
        self._producer: AIOKafkaProducer | None = None
        self._stopping = asyncio.Event()
        self._batch_lock = asyncio.Lock()  # a rebalance waits for the batch in flight
        self._owned: dict[TopicPartition, _Owned] = {}
        self._input_partitions = 0
        self._internal_partitions: list[int] = []
        self._outbox: Outbox | None = None
        self._reported_at = float("-inf")

    async def start(self) -> None:
        if self._producer is not None:
            return
        self._stopping.clear()
        try:
            producer = AIOKafkaProducer(
                **self._options, acks="all", linger_ms=5, max_batch_size=_BATCH_BYTES
            )
            await producer.start()
            self._producer = producer
            consumer = AIOKafkaConsumer(
                **self._options,
                **group_member_options(self._cfg.kafka_group, self._cfg.kafka_session_timeout_ms),
            )
            await consumer.start()
            self._consumer = consumer
            await self._ensure_topic(consumer)
            self._internal_partitions = sorted(await producer.partitions_for(self.topic))
            self._outbox = Outbox(producer, self.topic, self._internal_partitions)
        except KAFKA_FAILURES as exc:
            await self.stop()
            raise kafka_error(exc, "repartition: start", self._servers) from exc
        except BaseException:
            await self.stop()
            raise

    async def stop(self) -> None:
        self._stopping.set()
        consumer, self._consumer = self._consumer, None
        producer, self._producer = self._producer, None
        self._outbox = None
        if consumer is not None:
            await consumer.stop()
        if producer is not None:
            with contextlib.suppress(KafkaError):
                await producer.stop()
        self._owned.clear()

    def stop_intake(self) -> None:
        self._stopping.set()

    async def _ensure_topic(self, consumer: AIOKafkaConsumer) -> None:
        """The internal topic, with as many partitions as the input topic."""
        source = self._cfg.kafka_topic
        if source not in await consumer.topics():
            # the caller's start loop tries again (service.app.start_with_retry)
            raise TransientError(f"repartition: input topic {source!r} does not exist yet")
        count = max(1, len(consumer.partitions_for_topic(source) or ()))
        self._input_partitions = count
        refused = await create_topics(self._options, [self.topic], count)
        if refused:
            raise refused[self.topic]

    async def run(self) -> None:
        """Route until :meth:`stop_intake`; failures are retried, except a refusal of
        credentials, rights or topic, which raises a :class:`PermanentError`
        (``keeps_reading`` in ``service.kafka.errors``)."""
        consumer = self._require(self._consumer)
        consumer.subscribe([self._cfg.kafka_topic], listener=_Rebalance(self))
        stop = asyncio.ensure_future(self._stopping.wait())
        try:
            while not self._stopping.is_set():
                try:
                    routed = await retry(
                        lambda: self._route_once(consumer, stop),
                        name="repartition: routing",
                        backoff=_RETRY,
                        clock=self._clock,
                        retriable=keeps_reading,
                        stop=self._stopping,
                    )
                except KAFKA_FAILURES as exc:
                    if keeps_reading(exc):  # retried until stopped: only a stop ends it so
                        return
                    raise kafka_error(exc, "repartition: routing", self._servers) from exc
                if not routed:
                    return
        finally:
            stop.cancel()

    async def _route_once(self, consumer: AIOKafkaConsumer, stop: asyncio.Future[Any]) -> bool:
        """Poll and forward one batch; False when intake stops first. A batch that fails
        is dropped and the input rewound to the last commit (nothing of it was
        committed), so the next attempt starts where the batch did."""
        try:
            data = await poll_unless_stopped(
                consumer, stop, self._stopping, timeout_ms=_POLL_MS, max_records=_MAX_RECORDS
            )
            if data is None:
                return False
            await self._forward(data)
        except KAFKA_FAILURES:
            self._require(self._outbox).discard()
            await self._seek_to_committed()
            raise
        return True

    async def _forward(self, data: Mapping[TopicPartition, Sequence[Any]]) -> None:
        consumer, out = self._require(self._consumer), self._require(self._outbox)
        async with self._batch_lock:
            assigned = consumer.assignment()
            polled_at = self._clock.monotonic()
            now = self._clock.now()
            max_ts = now + self._max_future_s
            # an event further ahead of the clock moves no event time in the reports
            # (the windowing stage's rule for its records, service.aggregation.partition)
            lead_cap = now + self._max_lead_s
            cap = self._cfg.max_events_per_message
            offsets: dict[TopicPartition, int] = {}
            for tp, msgs in data.items():
                owned = self._owned.get(tp)
                if tp not in assigned or owned is None or not msgs:
                    continue  # revoked meanwhile: its new owner reads it again
                fallback = f"{tp.topic}:{tp.partition}".encode()
                prefix = f"{tp.topic}:{tp.partition}:"
                for m in msgs:
                    routed = route(m.value, fallback, max_ts, self._tags)
                    for i, (key, value, ts) in enumerate(
                        routed if len(routed) <= cap else routed[:cap]
                    ):
                        origin = f"{prefix}{m.offset}:{i}".encode()
                        await out.add(key, value, [(ORIGIN_HEADER, origin)])
                        if (
                            ts is not None
                            and ts <= lead_cap
                            and (owned.max_ts is None or ts > owned.max_ts)
                        ):
                            owned.max_ts = ts
                    if len(routed) > cap:  # the rest: one record, one dead letter downstream
                        await self._add_excess(out, fallback, f"{prefix}{m.offset}", routed)
                owned.next_offset = offsets[tp] = msgs[-1].offset + 1
                owned.last_message_at = polled_at
            await out.flush()
            if offsets:
                await self._commit(offsets)
            if self._clock.monotonic() - self._reported_at >= REPORT_INTERVAL_S:
                await self._report_progress()

    async def _add_excess(
        self, out: Outbox, fallback: bytes, message: str, routed: list[Routed]
    ) -> None:
        """The elements of one input message past ``VABUS_MAX_EVENTS_PER_MESSAGE`` as one
        record (keyed by the input partition, after the message's other elements), which
        the windowing stage dead-letters as one ``too_large`` with their count."""
        cap = self._cfg.max_events_per_message
        excess = routed[cap:]
        headers = [
            (ORIGIN_HEADER, f"{message}:{cap}".encode()),
            (EXCESS_HEADER, str(len(excess)).encode()),
        ]
        await out.add(fallback, excess_record([value for _, value, _ in excess]), headers)

    async def _report_progress(self) -> None:
        """A progress report on the input partitions read here, to every internal
        partition, after the records it covers (one producer keeps them in order);
        acknowledged before the next batch, so a revocation leaves none behind."""
        consumer, producer = self._require(self._consumer), self._require(self._producer)
        now = self._clock.monotonic()
        self._reported_at = now
        if not self._owned:
            return
        topic = self._cfg.kafka_topic
        # the input may have grown since start-up (its metadata is refreshed periodically)
        self._input_partitions = max(
            self._input_partitions, len(consumer.partitions_for_topic(topic) or ())
        )
        progress = Progress(
            topic,
            self._input_partitions,
            {
                f"{tp.topic}:{tp.partition}": owned.report(consumer.highwater(tp), now)
                for tp, owned in self._owned.items()
            },
        )
        value = encode_progress(progress)
        headers = [(PROGRESS_HEADER, b"1")]
        acks = [
            await producer.send(self.topic, value, partition=p, headers=headers)
            for p in self._internal_partitions
        ]
        await asyncio.gather(*acks)

    async def _commit(self, offsets: dict[TopicPartition, int]) -> None:
        consumer = self._require(self._consumer)
        try:
            await consumer.commit(offsets)
        except KafkaError as exc:  # a replay is harmless: the windowing stage drops it
            log.info("repartition: commit skipped (%r)", exc)

    async def _seek_to_committed(self) -> None:
        consumer = self._require(self._consumer)
        for tp in consumer.assignment():
            committed = await consumer.committed(tp)
            if committed is None:
                await consumer.seek_to_beginning(tp)
            else:
                consumer.seek(tp, committed)
            if (owned := self._owned.get(tp)) is not None:
                owned.next_offset = await consumer.position(tp)

    async def on_revoked(self, revoked: set[TopicPartition]) -> None:
        """A rebalance: the batch in flight finishes (commits, reports) first; no report
        on these partitions leaves this instance afterwards."""
        async with self._batch_lock:
            for tp in revoked:
                self._owned.pop(tp, None)

    async def on_assigned(self, assigned: set[TopicPartition]) -> None:
        """Newly read partitions, reported at the next batch: their event time is unknown
        until then, and every internal partition holds back meanwhile."""
        consumer = self._require(self._consumer)
        now = self._clock.monotonic()
        for tp in assigned:
            self._owned[tp] = _Owned(await consumer.position(tp), now)
        self._reported_at = float("-inf")

    async def check(self) -> None:
        if self._producer is None:
            raise TransientError("repartition: not started")

    def _require(self, client: Any) -> Any:
        if client is None:
            raise RuntimeError("Router is not started")
        return client


class _Rebalance(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, router: Router) -> None:
        self._router = router

    async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        await self._router.on_revoked(set(revoked))

    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        await self._router.on_assigned(set(assigned))


class RepartitionedBus(AsyncResource):
    """The ``kafka://…?repartition=true`` transport: both stages as one bus."""

    name = "kafka"

    def __init__(self, router: Router, windowing: KafkaBus) -> None:
        self._router = router
        self._windowing = windowing

    async def start(self) -> None:
        await self._router.start()  # creates the internal topic the windowing stage reads
        try:
            await self._windowing.start()
        except BaseException:
            await self._router.stop()
            raise

    async def stop(self) -> None:
        await self._windowing.stop()
        await self._router.stop()

    async def run(self, emit: Emit, restore: Restore) -> None:
        """Both stages; when the windowing stage returns (intake stopped), routing stops.
        Routing that fails stops the windowing stage too: its internal partitions would
        otherwise wait for progress reports that never come."""
        routing = asyncio.ensure_future(self._router.run())

        def failed(task: asyncio.Future[None]) -> None:
            if not task.cancelled() and task.exception() is not None:
                self._windowing.stop_intake()

        routing.add_done_callback(failed)
        try:
            await self._windowing.run(emit, restore)
        finally:
            self._router.stop_intake()
            await asyncio.gather(routing, return_exceptions=True)
        if routing.done() and not routing.cancelled() and (exc := routing.exception()):
            raise exc

    def stop_intake(self) -> None:
        self._router.stop_intake()
        self._windowing.stop_intake()

    def rewind(self, partitions: Sequence[str]) -> None:
        self._windowing.rewind(partitions)

    async def commit(self, positions: Mapping[str, str]) -> None:
        await self._windowing.commit(positions)

    async def send_metrics(self, metrics: Sequence[Metric]) -> None:
        await self._windowing.send_metrics(metrics)

    async def check(self) -> None:
        await self._windowing.check()
        await self._router.check()


def build_repartitioned_bus(
    bus_cfg: BusConfig,
    kafka_cfg: KafkaConfig,
    agg_cfg: AggregationConfig,
    metrics: MetricsCollector,
    clock: Clock,
) -> RepartitionedBus:
    windowing_cfg = replace(
        bus_cfg,
        kafka_topic=internal_topic(bus_cfg.kafka_group),
        kafka_group=windowing_group(bus_cfg.kafka_group),
    )
    return RepartitionedBus(
        Router(
            bus_cfg,
            kafka_cfg,
            clock,
            agg_cfg.max_future_s,
            agg_cfg.max_watermark_lead_s,
            agg_cfg.group_by,
        ),
        KafkaBus(windowing_cfg, kafka_cfg, metrics, clock, internal=records),
    )
