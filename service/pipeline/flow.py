"""Control items that travel the hub beside the data, so they stay ordered with it.

bus --SourceBatch/PartitionsAssigned/PartitionsRevoked--> "input" --> aggregator stage
ticker --Tick/CheckpointRequest--> "input"
aggregator stage --Outputs/Checkpoint/ReadBack--> "output" --> DataSender --> sinks, store,
    bus commit
"""

from __future__ import annotations

from dataclasses import dataclass, field

from service.archive.rows import ArchiveSlice
from service.checkpoints.base import PartitionCheckpoint
from service.core.confirmation import Confirmation
from service.core.events import Aggregate, DeadLetter

__all__ = ["INPUT", "OUTPUT", "Checkpoint", "CheckpointRequest", "Outputs", "ReadBack", "Tick"]

INPUT = "input"
OUTPUT = "output"


@dataclass(frozen=True, slots=True)
class Tick:
    """Time passes (about once a second): lets idle windows flush and checkpoints happen."""


@dataclass(slots=True)
class CheckpointRequest:
    """Checkpoint everything now (shutdown); ``done`` is confirmed when it is durable."""

    done: Confirmation = field(default_factory=Confirmation)


@dataclass(frozen=True, slots=True)
class ReadBack:
    """Partitions were restored: before writing anything derived from their replay, the
    outputs read what was written past these offsets (``"<topic>:<partition>"`` ->
    offset, from the checkpoints), so that none of it is written twice."""

    offsets: dict[str, int]


@dataclass(slots=True)
class Checkpoint:
    """Make these partition states durable, then commit their positions to the bus.

    Travels behind the outputs it covers, so the sender has written them first. The
    sender settles ``done``, and skips the checkpoint when its waiter abandoned it first.
    """

    checkpoints: list[PartitionCheckpoint]
    done: Confirmation | None = None
    # ARCHIVE_URL set: the accepted events these checkpoints cover, archived before
    # they are saved (service.archive); None without an archive
    archive: list[ArchiveSlice] | None = None

    @property
    def positions(self) -> dict[str, str]:
        return {c.partition: c.position for c in self.checkpoints if c.position is not None}


@dataclass(slots=True)
class Outputs:
    """What one step of the aggregator produced for the outputs."""

    aggregates: list[Aggregate] = field(default_factory=list)
    dead_letters: list[DeadLetter] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.aggregates or self.dead_letters)

    def extend(self, other: Outputs) -> None:
        self.aggregates.extend(other.aggregates)
        self.dead_letters.extend(other.dead_letters)
