"""VaBus over Kafka: one consumer-group member that hands on per-partition batches.

Positions are owned by the checkpoint store, not by Kafka: on every assignment the
stored position of each partition is sought to (the checkpointed window state matches
exactly that offset); Kafka's committed offset, then the earliest offset, are only
fallbacks for partitions that were never checkpointed. Committing to Kafka is advisory.

Rebalance ordering guarantees (the aggregator relies on them):

* ``PartitionsAssigned`` is emitted before any batch of those partitions; newly
  assigned partitions stay paused until it has been emitted.
* After ``PartitionsRevoked`` no batch of those partitions is emitted, and the group
  is held (up to ``revoke_timeout_s``) until downstream resolves ``done``.

Both hold because every emit goes through one lock, and a batch is emitted only for a
partition that is currently announced ("live"). Records fetched for a partition that
is not live are dropped: the next assignment seeks every partition explicitly, so they
are read again by whichever member gets it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine, Mapping, Sequence
from functools import partial
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from service.bus.base import (
    REPORT_INTERVAL_S,
    Emit,
    PartitionsAssigned,
    PartitionsRevoked,
    Restore,
    SourceBatch,
)
from service.bus.internal_records import InternalRecords, InternalTopicReader
from service.bus.kafka_clients import (
    check_topic,
    commit_offsets,
    connect_consumer,
    require_input_topic,
    send_metrics,
    start_metrics_producer,
)
from service.bus.kafka_partitions import LivePartition, partition_id, report_batch
from service.bus.kafka_rebalance import (
    RebalanceListener,
    await_revocation,
    restore_retried,
    seek_assigned,
    seek_rewound,
)
from service.config import BusConfig, KafkaConfig
from service.core.clock import Clock
from service.core.events import Metric
from service.core.lifecycle import AsyncResource
from service.core.retry import Backoff, retry
from service.kafka.clients import stop_clients
from service.kafka.errors import KAFKA_FAILURES, is_transient, kafka_error, keeps_reading
from service.kafka.options import bus_client_options
from service.kafka.reading import poll_unless_stopped
from service.metrics.collector import MetricsCollector

__all__ = ["KafkaBus"]

log = logging.getLogger(__name__)

_POLL_TIMEOUT_MS = 500
_MAX_RECORDS = 20_000


class KafkaBus(AsyncResource):
    """The ``kafka://`` transport (docs/bus.md).

    ``run`` may be called once per started bus. ``emit`` is called from the poll loop
    and from the rebalance callbacks, never concurrently.
    """

    name = "kafka"

    def __init__(
        self,
        bus_cfg: BusConfig,
        kafka_cfg: KafkaConfig,
        metrics: MetricsCollector,
        clock: Clock,
        *,
        backoff: Backoff = Backoff(initial_s=0.5, maximum_s=10.0),  # noqa: B008 - frozen
        revoke_timeout_s: float = 30.0,
        internal: InternalRecords | None = None,
    ) -> None:
        if bus_cfg.kafka_repartition and internal is None:
            raise ValueError("a KafkaBus on the internal topic needs its InternalRecords")
        self._cfg = bus_cfg
        self._internal = (
            InternalTopicReader(internal, metrics, self.name, bus_cfg.kafka_topic)
            if internal is not None and bus_cfg.kafka_repartition
            else None
        )
        self._options = bus_client_options(bus_cfg, kafka_cfg)
        self._servers = self._options["bootstrap_servers"]
        self._metrics = metrics
        self._clock = clock
        self._backoff = backoff
        self._revoke_timeout_s = revoke_timeout_s
        self._consumer: AIOKafkaConsumer | None = None
        self._producer: AIOKafkaProducer | None = None
        self._live: dict[TopicPartition, LivePartition] = {}
        self._emit_lock = asyncio.Lock()
        self._stopping = asyncio.Event()  # stop_intake() or stop()
        self._closing = asyncio.Event()  # stop(): rebalance callbacks give up waiting
        self._failure: BaseException | None = None
        self._rewinds: set[str] = set()  # partitions to deliver again (rewind)

    # -- lifecycle --------------------------------------------------------------------
    async def start(self) -> None:
        """Connect, check that the input topic exists, start the metrics producer.

        One attempt: the caller's start loop (``service.app.start_with_retry``) is the
        one that retries, so a :class:`TransientError` (the broker unreachable, the
        input topic missing: it belongs to the producers and is never created here) is
        tried again there, and a :class:`PermanentError` (refused credentials, say)
        fails the start.
        """
        if self._consumer is not None:
            return
        self._stopping.clear()
        self._closing.clear()
        consumer = await connect_consumer(self._cfg, self._options, self._revoke_timeout_s)
        self._consumer = consumer
        try:
            topics = await require_input_topic(consumer, self._cfg.kafka_topic, self._servers)
            self._producer = await start_metrics_producer(
                self._options, self._cfg.kafka_metrics_topic, topics
            )
        except BaseException:
            await self.stop()
            raise

    async def stop(self) -> None:
        """Leave the group and disconnect. Idempotent; pending rebalance waits end."""
        self._stopping.set()
        self._closing.set()
        producer, self._producer = self._producer, None
        consumer, self._consumer = self._consumer, None
        await stop_clients(producer, consumer)
        self._live.clear()

    def _require_consumer(self) -> AIOKafkaConsumer:
        if self._consumer is None:
            raise RuntimeError("KafkaBus is not started")
        return self._consumer

    # -- intake -----------------------------------------------------------------------
    def stop_intake(self) -> None:
        self._stopping.set()

    async def run(self, emit: Emit, restore: Restore) -> None:
        """Join the group and poll until :meth:`stop_intake`; failed polls are retried
        with backoff, except a refusal of credentials, rights or topic, which raises a
        :class:`PermanentError` (``keeps_reading`` in ``service.kafka.errors``).

        Raises what a rebalance callback could not handle (e.g. ``restore`` failing
        persistently): continuing would read partitions without their state.
        """
        consumer = self._require_consumer()
        listener = RebalanceListener(
            lambda revoked: self._guard(self._on_revoked(revoked, emit)),
            partial(self._assign, emit=emit, restore=restore),
        )
        consumer.subscribe(topics=[self._cfg.kafka_topic], listener=listener)
        stop_waiter = asyncio.ensure_future(self._stopping.wait())
        try:
            while not self._stopping.is_set():
                if self._rewinds:
                    await self._rewind(consumer, emit, restore)
                try:
                    data = await retry(
                        partial(self._poll, consumer, stop_waiter),
                        name=f"kafka bus: poll of {self._servers}",
                        backoff=self._backoff,
                        clock=self._clock,
                        retriable=keeps_reading,
                        on_failure=self._count_error,
                        stop=self._stopping,
                    )
                except KAFKA_FAILURES as exc:
                    if keeps_reading(exc):  # retried until stopped: only a stop ends it so
                        break
                    self._metrics.on_bus_error(self.name, False)
                    raise kafka_error(exc, "kafka bus: poll", self._servers) from exc
                if data is None:
                    break
                await self._emit_polled(consumer, data, emit)
        finally:
            stop_waiter.cancel()
        if self._failure is not None:
            raise self._failure

    async def _poll(
        self, consumer: AIOKafkaConsumer, stop_waiter: asyncio.Future[Any]
    ) -> Mapping[TopicPartition, list[Any]] | None:
        """One fetch, or None when intake stops first."""
        return await poll_unless_stopped(
            consumer,
            stop_waiter,
            self._stopping,
            timeout_ms=_POLL_TIMEOUT_MS,
            max_records=_MAX_RECORDS,
        )

    def _count_error(self, exc: BaseException, attempt: int) -> None:
        self._metrics.on_bus_error(self.name, True)  # only transient errors are retried

    async def _emit_polled(
        self, consumer: AIOKafkaConsumer, data: Mapping[TopicPartition, list[Any]], emit: Emit
    ) -> None:
        now = self._clock.now()
        mono = self._clock.monotonic()
        received = 0
        async with self._emit_lock:
            assigned = consumer.assignment()
            for tp, msgs in data.items():
                live = self._live.get(tp)
                if live is None or not msgs:
                    continue  # not announced: the next assignment seeks it again
                highwater = consumer.highwater(tp) if tp in assigned else None
                received += await self._emit_records(tp, live, msgs, highwater, emit, now, mono)
            await self._emit_reports(consumer, data, assigned, emit, now)
        if received:
            # one Kafka message may hold a JSON array; the bus does not decode, so the
            # event count is reported as the message count
            self._metrics.on_messages_received(self.name, received, received)

    async def _emit_records(
        self,
        tp: TopicPartition,
        live: LivePartition,
        msgs: list[Any],
        highwater: int | None,
        emit: Emit,
        now: float,
        mono: float,
    ) -> int:
        """Emit a partition's fetched records; how many were emitted."""
        if msgs[0].offset < live.next_offset:  # fetched before a seek
            msgs = [m for m in msgs if m.offset >= live.next_offset]
            if not msgs:
                return 0
        live.next_offset = msgs[-1].offset + 1
        caught_up = highwater is not None and live.next_offset >= highwater
        live.reported_at = mono
        lag = None if highwater is None else max(0, highwater - live.next_offset)
        # An internal partition of repartitioned input is cut after each progress
        # report, which applies after its events: event time then moves exactly
        # where the routing stage wrote it, whatever the fetches.
        runs = (
            self._internal.split_at_progress(msgs)
            if self._internal is not None
            else ((msgs, None, live.next_offset),)
        )
        received = 0
        for run, progress, next_offset in runs:
            received += len(run)
            origins, rejected = (
                self._internal.origins(run) if self._internal is not None else (None, None)
            )
            await emit(
                SourceBatch(
                    partition=live.partition,
                    records=[b"" if m.value is None else m.value for m in run],
                    offsets=[m.offset for m in run],
                    source=f"kafka {self._cfg.kafka_topic}/{tp.partition}",
                    next_position=str(next_offset),
                    received_at=now,
                    caught_up=caught_up and next_offset == live.next_offset,
                    polled_at=mono,
                    lag=lag,
                    origins=origins,
                    progress=progress,
                    rejected=rejected,
                )
            )
        return received

    async def _emit_reports(
        self,
        consumer: AIOKafkaConsumer,
        data: Mapping[TopicPartition, list[Any]],
        assigned: set[TopicPartition],
        emit: Emit,
        now: float,
    ) -> None:
        """Reports on partitions this poll brought nothing for: a silent partition
        stops holding the watermark only on such evidence. Taken after any backpressure
        in emitting the records, so the time and the high watermark are both current."""
        for tp, live in list(self._live.items()):  # stop() may clear it meanwhile
            if tp in data or tp not in assigned:
                continue
            seen = self._clock.monotonic()
            if seen - live.reported_at < REPORT_INTERVAL_S:
                continue
            highwater = consumer.highwater(tp)
            if highwater is None:
                continue  # not fetched yet: nothing is known about it
            live.reported_at = seen
            source = f"kafka {self._cfg.kafka_topic}/{tp.partition}"
            await emit(report_batch(live, source, highwater, now, seen))

    # -- rebalance (called by the RebalanceListener from aiokafka's coordinator task) ---
    async def _assign(self, assigned: set[TopicPartition], emit: Emit, restore: Restore) -> None:
        consumer = self._consumer
        if consumer is None or not assigned:
            return
        # before any await: the fetcher must not return records of these partitions
        # until they are positioned and announced
        consumer.pause(*assigned)
        await self._guard(self._on_assigned(consumer, assigned, emit, restore))

    async def _on_assigned(
        self,
        consumer: AIOKafkaConsumer,
        assigned: set[TopicPartition],
        emit: Emit,
        restore: Restore,
    ) -> None:
        tps = sorted(assigned)
        ids = [partition_id(tp) for tp in tps]
        stored = await restore_retried(restore, self._backoff, self._clock, ids)
        checkpoints, positions = await seek_assigned(consumer, tps, ids, stored)
        async with self._emit_lock:
            for tp, pid in zip(tps, ids, strict=True):
                self._live[tp] = LivePartition(pid, positions[tp], assigned_at=positions[tp])
            await emit(PartitionsAssigned(checkpoints))
        consumer.resume(*tps)
        log.info("kafka bus: assigned %s at %s", ids, [positions[tp] for tp in tps])

    def rewind(self, partitions: Sequence[str]) -> None:
        """Done by the poll loop before its next fetch (see :meth:`_rewind`)."""
        self._rewinds.update(partitions)

    async def _rewind(self, consumer: AIOKafkaConsumer, emit: Emit, restore: Restore) -> None:
        """The steps of an assignment for partitions that stay assigned: pause, restore,
        seek to the stored positions, announce, resume. A seek drops what was fetched
        before it; those of the partitions a rebalance took meanwhile are skipped."""
        ids, self._rewinds = self._rewinds, set()
        tps = sorted(tp for tp, live in self._live.items() if live.partition in ids)
        if not tps:
            return
        consumer.pause(*tps)
        stored = await restore_retried(
            restore, self._backoff, self._clock, [partition_id(tp) for tp in tps]
        )
        async with self._emit_lock:
            assigned = consumer.assignment()
            tps = [tp for tp in tps if tp in self._live and tp in assigned]
            checkpoints = seek_rewound(consumer, self._live, tps, stored)
            offsets = [self._live[tp].next_offset for tp in tps]
            if checkpoints:
                await emit(PartitionsAssigned(checkpoints))
        consumer.resume(*(tp for tp in tps if tp in consumer.assignment()))
        log.warning(
            "kafka bus: delivering %s again from %s (rewind)",
            [c.partition for c in checkpoints],
            offsets,
        )

    async def _on_revoked(self, revoked: set[TopicPartition], emit: Emit) -> None:
        async with self._emit_lock:
            ids = [self._live.pop(tp).partition for tp in sorted(revoked) if tp in self._live]
            if not ids:
                return
            item = PartitionsRevoked(ids)
            await emit(item)
        await await_revocation(item, self._revoke_timeout_s)

    async def _guard(self, work: Coroutine[Any, Any, None]) -> None:
        """Run a rebalance callback so that :meth:`stop` can end it and its failure
        reaches :meth:`run` (aiokafka would only log it)."""
        if self._closing.is_set():
            work.close()
            return
        task = asyncio.ensure_future(work)
        closing = asyncio.ensure_future(self._closing.wait())
        try:
            await asyncio.wait({task, closing}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            closing.cancel()
            if not task.done():
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        if not task.cancelled() and (exc := task.exception()) is not None:
            log.error("kafka bus: rebalance handling failed: %r", exc)
            self._failure = exc
            self._stopping.set()

    # -- positions and metrics ----------------------------------------------------------
    async def commit(self, positions: Mapping[str, str]) -> None:
        """Commit offsets of the partitions still assigned here; others are ignored.

        Never raises for broker trouble: the checkpoint store, not Kafka, is the source
        of truth, so a failed commit is logged and counted.
        """
        consumer = self._consumer
        if consumer is None:
            return
        offsets = {
            tp: int(positions[live.partition])
            for tp, live in self._live.items()
            if live.partition in positions
        }
        if not offsets:
            return
        await commit_offsets(
            consumer, offsets, self._servers, partial(self._metrics.on_bus_error, self.name)
        )

    async def send_metrics(self, metrics: Sequence[Metric]) -> None:
        """Produce one JSON object per metric; gives up after a few seconds and logs."""
        producer = self._producer
        if producer is None or not metrics:
            return
        topic = self._cfg.kafka_metrics_topic
        try:
            await send_metrics(producer, topic, metrics)
        except KAFKA_FAILURES as exc:
            self._metrics.on_bus_error(self.name, is_transient(exc))
            log.warning("kafka bus: metrics not sent to %r (%r)", topic, exc)

    async def check(self) -> None:
        """Raise :class:`TransientError` unless the broker answers and the topic exists."""
        await check_topic(self._consumer, self._options, self._cfg.kafka_topic, self._servers)
