"""The Kafka bus's view of one assigned partition, and the batches it emits for it."""

from __future__ import annotations

from dataclasses import dataclass

from aiokafka import TopicPartition

from service.bus.base import SourceBatch

__all__ = ["LivePartition", "partition_id", "report_batch"]


def partition_id(tp: TopicPartition) -> str:
    return f"{tp.topic}:{tp.partition}"


@dataclass(slots=True)
class LivePartition:
    """An assigned partition that downstream knows about."""

    partition: str
    next_offset: int
    reported_at: float = float("-inf")  # when downstream last heard of it (monotonic)
    assigned_at: int = 0  # where it was read from on assignment: a rewind's fallback


def report_batch(
    live: LivePartition, source: str, highwater: int, received_at: float, seen: float
) -> SourceBatch:
    """A batch without records: where the partition stands against its high watermark."""
    return SourceBatch(
        partition=live.partition,
        records=[],
        source=source,
        next_position=None,
        received_at=received_at,
        caught_up=live.next_offset >= highwater,
        polled_at=seen,
        lag=max(0, highwater - live.next_offset),
    )
