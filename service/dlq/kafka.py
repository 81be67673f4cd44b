"""The dead letters of ``dlq replay`` in the Kafka dead-letter topic (STORAGE_TYPE
without postgres): marked in ``<KAFKA_DLQ_TOPIC>.replayed``, a compacted topic keyed by
``<topic>:<partition>:<offset>`` of the dead letter.

A marker record is the whole mark of one dead letter, written at once: its outcome,
its ledger counts, and — while its events are not yet counted — those events
(``"state": "pending"``); once its windows are recomputed, the same without the events
(``"state": "done"``). The latest record per key is what counts (compaction keeps
it). Read to its end before anything is selected.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from contextlib import AsyncExitStack
from datetime import UTC, datetime
from types import TracebackType
from typing import Any, Final

import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from service.config import Config
from service.core.clock import Clock
from service.core.errors import PermanentError
from service.dlq.base import DeadLetterRow, Marked, PendingRun, Redriven
from service.kafka.options import client_options, create_topics
from service.kafka.reading import read_to_end
from service.replay.kafka_held import kafka_held
from service.replay.span import ReplaySpan
from service.routes.matching import Router

__all__ = ["MARKER_SUFFIX", "KafkaDeadLetters"]

log = logging.getLogger(__name__)

MARKER_SUFFIX: Final = ".replayed"
_READ_TIMEOUT_S: Final = 600.0


class KafkaDeadLetters:
    """:class:`~service.dlq.base.DeadLetterSource` of the dead-letter topic."""

    def __init__(self, config: Config, clock: Clock) -> None:
        self.config, self.clock = config, clock
        self.topic = config.kafka.dlq_topic
        self.markers_topic = self.topic + MARKER_SUFFIX
        self.marks: dict[str, dict[str, Any]] = {}  # key -> its latest marker
        self._stack = AsyncExitStack()
        self._producer: Any = None

    async def __aenter__(self) -> KafkaDeadLetters:
        options = client_options(self.config.kafka)
        refused = await create_topics(
            options, [self.markers_topic], 1, {"cleanup.policy": "compact"}
        )
        if refused:
            raise PermanentError(str(refused[self.markers_topic]))
        try:
            self._producer = AIOKafkaProducer(**options, acks="all")
            await self._producer.start()
            self._stack.push_async_callback(self._producer.stop)
            await self._read(self.markers_topic, self._on_marker)
        except BaseException:
            await self._stack.aclose()
            raise
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self._stack.aclose()

    def _on_marker(self, _: TopicPartition, record: Any) -> None:
        key = record.key.decode("utf-8", "replace") if record.key else ""
        if record.value is None:
            self.marks.pop(key, None)
            return
        try:
            self.marks[key] = orjson.loads(record.value)
        except orjson.JSONDecodeError:
            log.warning("dlq replay: marker %s of %s unreadable; ignored", key, self.markers_topic)

    async def pending(self) -> list[PendingRun]:
        keys = sorted(k for k, m in self.marks.items() if m.get("state") == "pending")
        if not keys:
            return []
        events: list[Redriven] = []
        for k in keys:
            m = self.marks[k]
            evs = [(e[0], e[1], float(e[2]), float(e[3]), e[4]) for e in m["events"]]
            events.append((m["start"], m["end"], evs))
        return [PendingRun(keys, events)]

    async def select(self, reason: str, since: float | None) -> tuple[list[DeadLetterRow], int]:
        rows: list[DeadLetterRow] = []
        skipped = 0

        def on_record(tp: TopicPartition, record: Any) -> None:
            nonlocal skipped
            try:
                obj = orjson.loads(record.value)
                if obj["reason"] != reason:
                    return
                at = datetime.fromisoformat(obj["received_at"]).timestamp()
                raw, detail = str(obj["raw"]), str(obj.get("detail", ""))
            except Exception:  # not a dead letter of ours
                return
            if since is not None and at < since:
                return
            key = f"{tp.topic}:{tp.partition}:{record.offset}"
            if key in self.marks:
                skipped += 1
                return
            start, end = f"{tp.partition}.{record.offset}", f"{tp.partition}.{record.offset + 1}"
            rows.append(DeadLetterRow(key, raw, reason, detail, start, end))

        await self._read(self.topic, on_record)
        return rows, skipped

    async def mark(
        self,
        outcomes: Sequence[Marked],
        accepted: Sequence[Redriven],
    ) -> PendingRun | None:
        """One marker per dead letter, holding its ledger counts (the ledger of a
        deployment without PostgreSQL: docs/dlq.md)."""
        now = datetime.fromtimestamp(self.clock.now(), UTC).isoformat()
        by_start = {start: (start, end, evs) for start, end, evs in accepted}
        keys = []
        for row, outcome, counts in outcomes:
            mark: dict[str, Any] = {"outcome": outcome, "replayed_at": now, "state": "done"}
            mark["counts"] = dict(counts)
            got = by_start.get(row.start)
            if got is not None:
                mark.update(state="pending", start=row.start, end=row.end, events=got[2])
                keys.append(row.key)
            await self._put(row.key, mark)
        await self._producer.flush()
        return PendingRun(keys, list(accepted)) if keys else None

    async def finished(self, run: PendingRun) -> None:
        for key in run.ref:
            mark = dict(self.marks[key])
            for field in ("events", "start", "end"):
                mark.pop(field, None)
            mark["state"] = "done"
            await self._put(key, mark)
        await self._producer.flush()

    async def through(self, since: float) -> float:
        cfg = self.config
        topics: tuple[str, ...] = (cfg.kafka.topic,)
        if cfg.routes:
            router = Router(
                cfg.routes,
                outputs=cfg.outputs,
                kafka_topic=cfg.kafka.topic,
                postgres_table=cfg.postgres.table,
            )
            topics = router.destinations("kafka")
        _, latest = await kafka_held(cfg.kafka, topics, ReplaySpan(0.0, 1.0), since)
        return latest

    async def _put(self, key: str, mark: dict[str, Any]) -> None:
        await self._producer.send_and_wait(
            self.markers_topic, orjson.dumps(mark), key=key.encode(), partition=0
        )
        self.marks[key] = mark

    async def _read(self, topic: str, on_record: Any) -> None:
        """Every record of ``topic`` to its end (a consumer of its own: one consumer's
        metadata follows what it was assigned)."""
        consumer = AIOKafkaConsumer(
            **client_options(self.config.kafka), enable_auto_commit=False, group_id=None
        )
        await consumer.start()
        try:
            found = consumer.partitions_for_topic(topic)
            if not found:
                await consumer.topics()
                found = consumer.partitions_for_topic(topic)
            tps = [TopicPartition(topic, p) for p in sorted(found or ())]
            if not tps:
                return
            consumer.assign(tps)
            await consumer.seek_to_beginning(*tps)
            await read_to_end(consumer, tps, on_record, timeout_s=_READ_TIMEOUT_S)
        finally:
            await consumer.stop()
