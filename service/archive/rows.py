"""Accepted events on their way to the archive: buffered per partition between two
checkpoints, then handed to the sender with the checkpoint that covers them.

The aggregator owns an :class:`ArchiveTap` only when ARCHIVE_URL is set. Each
partition's buffer starts at a source position (the restored checkpoint's, then each
checkpoint's in turn), so a slice is the events of exactly the positions
``[start, end)``; memory holds them only until their checkpoint is taken.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from service.checkpoints.base import PartitionCheckpoint

__all__ = ["ArchiveSlice", "ArchiveTap", "Rows"]


@dataclass(slots=True)
class Rows:
    """Columns of accepted events: ``times`` in seconds since the epoch (UTC);
    ``tags`` the JSON text of the grouped tags (None without AGGREGATION_GROUP_BY)."""

    names: list[str] = field(default_factory=list)
    funcs: list[str] = field(default_factory=list)
    values: list[float] = field(default_factory=list)
    times: list[float] = field(default_factory=list)
    tags: list[str | None] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.names)

    def add(self, name: str, func: str, value: float, ts: float, tags: str | None) -> None:
        self.names.append(name)
        self.funcs.append(func)
        self.values.append(value)
        self.times.append(ts)
        self.tags.append(tags)


@dataclass(frozen=True, slots=True)
class ArchiveSlice:
    """The accepted events of ``partition`` read from source positions ``[start, end)``
    (None: the partition's beginning, or no position yet). ``fresh``: the first slice
    since the partition was assigned, whose start is the restored position: the writer
    must first undo what a crashed or replaced owner wrote from there."""

    partition: str
    start: str | None
    end: str | None
    rows: Rows
    fresh: bool


@dataclass(slots=True)
class _Open:
    start: str | None
    rows: Rows = field(default_factory=Rows)
    fresh: bool = True


class ArchiveTap:
    """Per partition: the rows since its last checkpoint, and where they start."""

    def __init__(self) -> None:
        self._open: dict[str, _Open] = {}

    def rows_for(self, partition: str) -> Rows:
        """The buffer a batch of ``partition`` adds its accepted events to."""
        held = self._open.get(partition)
        if held is None:  # never assigned (tests feeding batches alone): from the start
            held = self._open[partition] = _Open(None)
        return held.rows

    def restore(self, checkpoints: Iterable[PartitionCheckpoint]) -> None:
        """Partitions (re)assigned: reading resumes at each checkpoint's position."""
        for cp in checkpoints:
            self._open[cp.partition] = _Open(cp.position)

    def discard(self, partitions: Iterable[str]) -> None:
        """Forget untrusted partitions; they are restored (and read) again."""
        for p in partitions:
            self._open.pop(p, None)

    def take(self, checkpoints: Sequence[PartitionCheckpoint]) -> list[ArchiveSlice]:
        """The slices these checkpoints cover: each partition's buffer up to the
        checkpoint's position, which is where its next slice starts."""
        slices = []
        for cp in checkpoints:
            held = self._open.get(cp.partition)
            if held is None:
                continue
            end = cp.position
            slices.append(ArchiveSlice(cp.partition, held.start, end, held.rows, held.fresh))
            self._open[cp.partition] = _Open(cp.position, fresh=False)
        return slices

    def release(self, partitions: Iterable[str]) -> None:
        """Revoked partitions: their last slice has been taken."""
        self.discard(partitions)

    @property
    def buffered(self) -> int:
        """Events waiting for their checkpoint, over every partition."""
        return sum(len(h.rows) for h in self._open.values())
