"""Reading the archive back for a replay: the files of the hours a range needs, per
source partition, in position order, without the superseded ones.

A file is ``hour=<H>/<partition>@<start>-<end>.parquet`` (service.archive.layout): the
accepted events of one partition read from positions ``[start, end)`` in that hour. The
writer deletes an attempt's files before it writes the same ``start`` again, so once
the slice from ``start`` is checkpointed only one ``end`` remains for it. Two ends for
one start can only be seen between a crash and the next write from that start (or
while a deletion is under way): the partition's intent (``_intents/<partition>.json``)
then names the files of the latest attempt, and only those count; without an intent
naming one of them the archive is ambiguous and the replay refuses to guess.
"""

from __future__ import annotations

import asyncio
import logging
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

import orjson
import pyarrow as pa
import pyarrow.parquet as pq

from service.archive.layout import INTENTS, hour_dir, token
from service.archive.stores import ArchiveStore, DirectoryStore, S3Store
from service.core.errors import ServiceError

__all__ = ["ArchiveAmbiguous", "Columns", "PartitionFiles", "hours_of", "list_files", "read"]

log = logging.getLogger(__name__)

_FILE: Final = re.compile(r"(?P<part>[^/@]+)@(?P<start>[^/@-]+)-(?P<end>[^/@-]+)\.parquet")


class ArchiveAmbiguous(ServiceError):
    """Two attempts of one slice and no intent saying which one counts."""


@dataclass(slots=True)
class Columns:
    """Events of one partition, in the order they were read from the source."""

    names: list[str] = field(default_factory=list)
    funcs: list[str] = field(default_factory=list)
    values: list[float] = field(default_factory=list)
    times: list[float] = field(default_factory=list)  # Unix seconds
    tags: list[str | None] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.names)

    def extend(self, table: pa.Table) -> None:
        micros = table.column("timestamp").cast(pa.int64()).to_pylist()
        self.names += table.column("name").to_pylist()
        self.funcs += table.column("agg_func").to_pylist()
        self.values += table.column("value").to_pylist()
        self.times += [m / 1_000_000 for m in micros]
        self.tags += table.column("tags").to_pylist()


@dataclass(frozen=True, slots=True)
class _File:
    name: str  # under the archive's root
    partition: str  # its token
    start: str
    end: str


@dataclass(slots=True)
class PartitionFiles:
    """One partition's files, in position order."""

    partition: str
    files: list[str]


def hours_of(start: float, end: float) -> list[int]:
    """Hours since the epoch that hold event times in ``[start, end)``."""
    return list(range(math.floor(start / 3600), math.ceil(end / 3600)))


async def list_files(store: ArchiveStore, hours: Sequence[int]) -> list[PartitionFiles]:
    """Every partition's counted files in those hours; :class:`ArchiveAmbiguous` when
    two attempts of a slice remain and no intent tells which one counts."""
    found: list[_File] = []
    for hour in hours:
        for name in await _names_under(store, hour_dir(hour)):
            m = _FILE.fullmatch(name.rpartition("/")[2])
            if m is None:
                log.warning("replay: %s is not an archive file name; ignored", name)
                continue
            found.append(_File(name, m["part"], m["start"], m["end"]))
    by_part: dict[str, list[_File]] = {}
    for f in found:
        by_part.setdefault(f.partition, []).append(f)
    out = []
    for part in sorted(by_part):
        files = await _counted(store, part, by_part[part])
        files.sort(key=lambda f: (_position_order(f.start), f.name))
        out.append(PartitionFiles(part, [f.name for f in files]))
    return out


async def _counted(store: ArchiveStore, part: str, files: list[_File]) -> list[_File]:
    """``files`` without those of superseded attempts (see the module's docstring)."""
    ends: dict[str, set[str]] = {}
    for f in files:
        ends.setdefault(f.start, set()).add(f.end)
    doubled = {start for start, e in ends.items() if len(e) > 1}
    if not doubled:
        return files
    intent = await _intent_files(store, part) or set()
    named = {f.start for f in files if f.name in intent}
    for start in doubled - named:
        raise ArchiveAmbiguous(
            f"archive: partition {part} has two attempts from position {start} "
            f"(ends {sorted(ends[start])}) and no intent naming either; wait for the "
            "service to write that partition again, then replay"
        )
    keep = []
    for f in files:
        if f.start in doubled and f.name not in intent:
            log.info("replay: %s superseded by the intent of %s; not counted", f.name, part)
        else:
            keep.append(f)
    return keep


async def _intent_files(store: ArchiveStore, part: str) -> set[str] | None:
    data = await store.get(f"{INTENTS}/{part}.json")
    if data is None:
        return None
    try:
        files = orjson.loads(data)["files"]
        return {str(f) for f in files}
    except Exception:
        return None


def _position_order(position: str) -> tuple[int, int, str]:
    """Kafka offsets as numbers, the partition's beginning first, digests by text (an
    HTTP cursor's order is not in its digest: those rows keep the file order)."""
    if position == token(None):
        return (0, 0, "")
    if position.isdigit():
        return (1, int(position), "")
    return (2, 0, position)


async def _names_under(store: ArchiveStore, folder: str) -> list[str]:
    """Names of the Parquet files in ``folder`` (one hour), those being written left out."""
    if isinstance(store, DirectoryStore):
        root = store.root
        return await asyncio.to_thread(_dir_names, root, folder)
    if isinstance(store, S3Store):
        return await asyncio.to_thread(_s3_names, store, folder)
    raise TypeError(f"replay cannot list a {type(store).__name__}")


def _dir_names(root: Path, folder: str) -> list[str]:
    path = root / folder
    if not path.is_dir():
        return []
    return sorted(
        f"{folder}/{p.name}"
        for p in path.iterdir()
        if p.name.endswith(".parquet") and not p.name.startswith((".", "_"))
    )


def _s3_names(store: S3Store, folder: str) -> list[str]:
    s3 = store._s3()
    prefix = f"{store.prefix}{folder}/"
    names: list[str] = []
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=store.bucket, Prefix=prefix):
        for item in page.get("Contents", ()):
            rest = str(item["Key"])[len(store.prefix) :]
            if rest.endswith(".parquet") and not rest.rpartition("/")[2].startswith((".", "_")):
                names.append(rest)
    return sorted(names)


async def read(store: ArchiveStore, name: str) -> pa.Table | None:
    """One file as a table; None when it is gone since it was listed (an attempt
    superseded meanwhile, whose events the retry's files hold)."""
    data = await store.get(name)
    if data is None:
        log.info("replay: %s is gone since it was listed; not counted", name)
        return None
    return pq.read_table(pa.BufferReader(data))
