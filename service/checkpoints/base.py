"""Where open-window state and source positions are kept between runs.

A checkpoint is written only after every output derived from the events before its
positions is durable; a restart loads it, restores the windows and continues reading
from the stored positions, so nothing is lost and nothing is counted twice.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

__all__ = ["CheckpointStore", "PartitionCheckpoint"]


@dataclass(frozen=True, slots=True)
class PartitionCheckpoint:
    """What was durably stored for one source partition.

    ``outputs`` says how far each output topic partition (``"<topic>:<partition>"``)
    had been written when this checkpoint was taken: after a restore, outputs found
    past those offsets were already written by the run that died, and are not written
    again (see ``KafkaSink.read_back``).
    """

    partition: str
    position: str | None
    state: bytes | None
    outputs: Mapping[str, int] | None = None
    # the partition's ledger as of this checkpoint (also inside ``state``), for stores
    # that publish it: {"totals", "intervals", "late_windows"}
    ledger: Mapping[str, Any] | None = field(default=None, compare=False)


class CheckpointStore(Protocol):
    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    async def load(self, partitions: Sequence[str]) -> dict[str, PartitionCheckpoint]:
        """Stored checkpoints of these partitions; partitions never saved are absent."""

    async def save(self, checkpoints: Sequence[PartitionCheckpoint]) -> None:
        """Store atomically: after a crash either all of these or none are visible."""
