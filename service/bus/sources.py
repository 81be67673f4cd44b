"""How partitions of several sources are told apart (contract §12.8).

The partitions of source 1 (the first URL of ``VABUS_URL``) keep their names, so a
deployment with one source sees the names and checkpoints it saw before; those of
source k >= 2 are prefixed ``s{k}/``.
"""

from __future__ import annotations

from typing import Final

__all__ = ["SOURCE_PREFIX", "SOURCE_SEP", "local_partition", "qualify", "source_of"]

SOURCE_PREFIX: Final = "s"
SOURCE_SEP: Final = "/"


def qualify(position: int, partition: str) -> str:
    """The partition ``partition`` of source ``position`` (1-based) as the pipeline
    names it: unchanged for source 1, ``s{k}/partition`` otherwise."""
    if position == 1:
        return partition
    return f"{SOURCE_PREFIX}{position}{SOURCE_SEP}{partition}"


def _split(partition: str) -> tuple[int, str]:
    head, sep, rest = partition.partition(SOURCE_SEP)
    if sep and head.startswith(SOURCE_PREFIX) and head[1:].isascii() and head[1:].isdigit():
        position = int(head[1:])
        if position >= 2:
            return position, rest
    return 1, partition


def source_of(partition: str) -> int:
    """``"s2/http"`` -> 2, ``"events:0"`` -> 1."""
    return _split(partition)[0]


def local_partition(partition: str) -> str:
    """``"s2/http"`` -> ``"http"``; a partition of source 1 unchanged."""
    return _split(partition)[1]
