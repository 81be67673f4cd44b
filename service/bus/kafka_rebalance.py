"""Steps of the Kafka bus's rebalance handling: restoring the checkpoints of
(re)assigned partitions and seeking them to their stored positions, waiting for
downstream to confirm revoked ones, and the listener that aiokafka calls."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence

from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener, TopicPartition

from service.bus.base import PartitionsRevoked, Restore
from service.bus.kafka_partitions import LivePartition
from service.checkpoints.base import PartitionCheckpoint
from service.core.clock import Clock
from service.core.errors import is_retriable
from service.core.retry import Backoff, retry

__all__ = [
    "RebalanceListener",
    "await_revocation",
    "restore_retried",
    "seek_assigned",
    "seek_rewound",
]

log = logging.getLogger(__name__)

_RESTORE_ATTEMPTS = 5

OnPartitions = Callable[[set[TopicPartition]], Awaitable[None]]


async def seek_assigned(
    consumer: AIOKafkaConsumer,
    tps: Sequence[TopicPartition],
    ids: Sequence[str],
    stored: Mapping[str, PartitionCheckpoint],
) -> tuple[list[PartitionCheckpoint], dict[TopicPartition, int]]:
    """Seek newly assigned partitions to their stored positions; the others read from
    their committed offset, else the earliest. Their checkpoints and positions."""
    checkpoints: list[PartitionCheckpoint] = []
    positions: dict[TopicPartition, int] = {}
    for tp, pid in zip(tps, ids, strict=True):
        cp = stored.get(pid) or PartitionCheckpoint(pid, None, None)
        checkpoints.append(cp)
        if cp.position is None:
            continue
        try:
            positions[tp] = int(cp.position)
        except ValueError:
            log.warning("kafka bus: ignoring stored position %r of %s", cp.position, pid)
            continue
        consumer.seek(tp, positions[tp])
    for tp in tps:
        if tp not in positions:
            # committed offset, else earliest (auto_offset_reset); waits for the lookup
            positions[tp] = await consumer.position(tp)
    return checkpoints, positions


async def restore_retried(
    restore: Restore, backoff: Backoff, clock: Clock, ids: list[str]
) -> dict[str, PartitionCheckpoint]:
    """``restore(ids)``; what says it is retriable is tried a few times, then raised."""
    return await retry(
        lambda: restore(ids),
        name=f"kafka bus: restoring {ids}",
        backoff=backoff,
        clock=clock,
        retriable=is_retriable,
        attempts=_RESTORE_ATTEMPTS,
    )


def seek_rewound(
    consumer: AIOKafkaConsumer,
    live: dict[TopicPartition, LivePartition],
    tps: Sequence[TopicPartition],
    stored: Mapping[str, PartitionCheckpoint],
) -> list[PartitionCheckpoint]:
    """Seek partitions that stay assigned back to their stored positions (else to where
    their assignment started) and reset their live state; their checkpoints."""
    checkpoints: list[PartitionCheckpoint] = []
    for tp in tps:
        was = live[tp]
        cp = stored.get(was.partition) or PartitionCheckpoint(was.partition, None, None)
        offset = was.assigned_at
        if cp.position is not None:
            try:
                offset = int(cp.position)
            except ValueError:
                log.warning("kafka bus: ignoring stored position %r", cp.position)
        consumer.seek(tp, offset)
        live[tp] = LivePartition(was.partition, offset, assigned_at=was.assigned_at)
        checkpoints.append(cp)
    return checkpoints


async def await_revocation(item: PartitionsRevoked, timeout_s: float) -> None:
    """Wait up to ``timeout_s`` for downstream to settle revoked partitions; logs how
    it ended. Being cancelled abandons them (and re-raises)."""
    ids = item.partitions
    try:
        async with asyncio.timeout(timeout_s):
            await item.done.wait()
    except asyncio.CancelledError:
        # stop() ends the wait: the group hands the partitions on meanwhile, so a
        # checkpoint saved from now on could overwrite their new owner's
        item.done.abandon()
        raise
    except TimeoutError:
        item.done.abandon()
        log.error(
            "kafka bus: downstream did not confirm revoked partitions %s within %.0fs; "
            "letting them go (the new owner resumes from the last checkpoint)",
            ids,
            timeout_s,
        )
    except Exception as exc:  # downstream could not checkpoint them
        log.error(
            "kafka bus: revoked partitions %s were not checkpointed (%r); the new owner "
            "resumes from their previous checkpoint",
            ids,
            exc,
        )
    else:
        log.info("kafka bus: revoked %s", ids)


class RebalanceListener(ConsumerRebalanceListener):  # type: ignore[misc]
    """Hands aiokafka's rebalance callbacks on (aiokafka calls them from its
    coordinator task)."""

    def __init__(self, on_revoked: OnPartitions, on_assigned: OnPartitions) -> None:
        self._on_revoked = on_revoked
        self._on_assigned = on_assigned

    async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        await self._on_revoked(set(revoked))

    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        await self._on_assigned(set(assigned))
