"""What the Kafka output holds for a range: the latest revision of every aggregate whose
window starts in it, read from the topic (and each route's own topic).

Kafka has no index by window, so this reads every record the output produced since the
range could first be emitted: from ``--from`` less ``AGGREGATION_MAX_FUTURE`` (a window
is emitted once the watermark passes its end, which an event stamped ahead of the clock
can move up to that far before the wall clock gets there) by the records' timestamps,
to the end of every partition. The cost is the topic's traffic since then, whatever
the range's length; ``docs/replay.md`` has the figures to size it.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from datetime import datetime
from typing import Any

import orjson
from aiokafka import AIOKafkaConsumer, TopicPartition

from service.config import KafkaConfig
from service.kafka.options import client_options
from service.kafka.reading import read_to_end
from service.replay.compare import Held, HeldKey, tags_text
from service.replay.span import ReplaySpan

__all__ = ["kafka_held"]

log = logging.getLogger(__name__)

_READ_TIMEOUT_S = 600.0


def _seconds(text: str) -> float:
    return datetime.fromisoformat(text).timestamp()


async def kafka_held(
    cfg: KafkaConfig, topics: Sequence[str], span: ReplaySpan, since: float
) -> tuple[dict[tuple[str, HeldKey], Held], float]:
    """Per (topic, key) the record with the greatest ``(revision, count, emitted_at)``
    among those of windows starting in the span, and the latest window end read (the
    service's watermark has passed it). ``since``: Unix seconds to start reading at."""
    consumer = AIOKafkaConsumer(
        **client_options(cfg), enable_auto_commit=False, group_id=None, auto_offset_reset="latest"
    )
    await consumer.start()
    held: dict[tuple[str, HeldKey], Held] = {}
    ranks: dict[tuple[str, HeldKey], tuple[int, int, float]] = {}
    through = -math.inf
    try:
        tps = [TopicPartition(t, p) for t in topics for p in sorted(await _partitions(consumer, t))]
        if not tps:
            return held, through
        consumer.assign(tps)
        ends = await consumer.end_offsets(tps)
        try:
            starts = await consumer.offsets_for_times({tp: max(0, int(since * 1000)) for tp in tps})
        except Exception as exc:  # a broker without time lookup: read it all
            log.warning("replay: offsets by time unavailable (%s): reading from the start", exc)
            await consumer.seek_to_beginning(*tps)
        else:
            for tp in tps:
                at = starts.get(tp)
                consumer.seek(tp, at.offset if at is not None else ends[tp])

        def keep(tp: TopicPartition, record: Any) -> None:
            nonlocal through
            try:
                obj = orjson.loads(record.value)
                ws, we = _seconds(obj["window_start"]), _seconds(obj["window_end"])
                through = max(through, we)
                if not span.start <= ws < span.end:
                    return
                key = (obj["name"], tags_text(obj.get("tags")), obj["agg_func"], ws, we)
                rank = (int(obj["revision"]), int(obj["count"]), _seconds(obj["emitted_at"]))
                value = float(obj["value"])
            except Exception:  # not an aggregate of ours: another writer's record
                return
            seen = ranks.get((tp.topic, key))
            if seen is None or rank > seen:
                ranks[(tp.topic, key)] = rank
                held[(tp.topic, key)] = Held(value, rank[1], rank[0])

        await read_to_end(consumer, tps, keep, timeout_s=_READ_TIMEOUT_S)
    finally:
        await consumer.stop()
    return held, through


async def _partitions(consumer: AIOKafkaConsumer, topic: str) -> set[int]:
    found = consumer.partitions_for_topic(topic)
    if not found:
        await consumer.topics()  # fetches the cluster's metadata
        found = consumer.partitions_for_topic(topic)
    return set(found or ())
