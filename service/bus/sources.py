"""Partition ids of several sources (contract §12.8): which source a partition is of.

Source 1 keeps the ids its bus gives (``events:0``, ``http``), so the checkpoints of a
service that had one source stay valid when more are added after it; source ``k >= 2``
prefixes them ``s{k}/`` (``s2/http``, ``s3/events:0``). Neither prefix can be mistaken
for a plain id: a Kafka topic name cannot hold ``/``, and ``http`` is the HTTP bus's
only id.
"""

from __future__ import annotations

from typing import Final

__all__ = ["SOURCE_PREFIX", "SOURCE_SEP", "local_partition", "qualify", "source_of"]

SOURCE_PREFIX: Final = "s"
SOURCE_SEP: Final = "/"


def qualify(position: int, partition: str) -> str:
    """The id of ``partition`` of the source at 1-based ``position`` in VABUS_URL."""
    if position < 1:
        raise ValueError(f"a source position is 1-based, not {position}")
    if position == 1:
        return partition
    return f"{SOURCE_PREFIX}{position}{SOURCE_SEP}{partition}"


def source_of(partition: str) -> int:
    """The 1-based position of the source a partition id belongs to."""
    head, sep, _ = partition.partition(SOURCE_SEP)
    digits = head[len(SOURCE_PREFIX) :]
    if sep and head.startswith(SOURCE_PREFIX) and digits.isascii() and digits.isdecimal():
        position = int(digits)
        if position >= 2:  # "s0/x", "s1/x": no prefix qualify() writes, so source 1's own
            return position
    return 1


def local_partition(partition: str) -> str:
    """The id the source's own bus uses for ``partition`` (the prefix removed)."""
    if source_of(partition) == 1:
        return partition
    return partition.partition(SOURCE_SEP)[2]
