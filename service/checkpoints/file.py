"""FileCheckpointStore: checkpoints of one namespace in one local file.

File layout: a header line ``VABUS-CHECKPOINT <version> <crc32 hex> <body length>``,
then an orjson body ``{"namespace": ..., "partitions": {partition: {"position": str |
null, "state": base64 | null, "outputs": {topic:partition: offset} | null}}}``. Every
save rewrites the whole file atomically (temp file, fsync, rename, fsync of the
directory), so a crash leaves either the old or the new file. A file that is
truncated, corrupt or of an unknown version is an error: starting from zero would
silently lose or double-count data.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import errno
import hashlib
import os
import re
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Final

import orjson

from service.checkpoints.base import PartitionCheckpoint
from service.core.errors import PermanentError, ServiceError, TransientError, describe_error
from service.core.lifecycle import AsyncResource

__all__ = ["FORMAT_VERSION", "CheckpointFileError", "FileCheckpointStore", "file_stem"]

FORMAT_VERSION: Final = 1
_MAGIC: Final = b"VABUS-CHECKPOINT"
_UNSAFE: Final = re.compile(r"[^A-Za-z0-9_.-]")
# Write failures that can end without anyone changing the configuration (space freed,
# the disk back); any other (permission, read-only, not a directory) needs an operator.
_TRANSIENT_ERRNOS: Final = frozenset(
    {errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.EAGAIN, errno.EINTR, errno.EBUSY}
)


def file_stem(namespace: str) -> str:
    """A safe, readable file name for ``namespace`` (e.g. ``kafka:events:group``).

    Characters other than letters, digits, ``_ . -`` become ``_``; a short hash of the
    exact namespace keeps two namespaces that differ only in those characters apart.
    """
    digest = hashlib.sha256(namespace.encode()).hexdigest()[:10]
    return f"{_UNSAFE.sub('_', namespace)[:100]}-{digest}"


class CheckpointFileError(ServiceError):
    """The checkpoint file cannot be trusted; an operator must look at it."""


class FileCheckpointStore(AsyncResource):
    """Implements :class:`~service.checkpoints.base.CheckpointStore` on a local file.

    ``start`` reads the file (raising :class:`CheckpointFileError` if it is unusable);
    ``load`` then answers from memory. One process per file: the store does not lock
    it against other processes.
    """

    def __init__(self, state_dir: str, namespace: str) -> None:
        if not namespace:
            raise ValueError("checkpoint namespace must not be empty")
        self._dir = Path(state_dir)
        self.namespace = namespace
        stem = file_stem(namespace)
        self.path = self._dir / f"{stem}.checkpoint"
        self._tmp_path = self._dir / f".{stem}.checkpoint.tmp"
        self._view: dict[str, PartitionCheckpoint] | None = None
        self._lock = asyncio.Lock()

    async def start(self) -> None:
        if self._view is None:
            self._view = await asyncio.to_thread(self._read)

    async def stop(self) -> None:
        self._view = None

    def _started_view(self) -> dict[str, PartitionCheckpoint]:
        if self._view is None:
            raise RuntimeError("FileCheckpointStore is not started")
        return self._view

    async def load(self, partitions: Sequence[str]) -> dict[str, PartitionCheckpoint]:
        view = self._started_view()
        return {p: view[p] for p in partitions if p in view}

    async def save(self, checkpoints: Sequence[PartitionCheckpoint]) -> None:
        """Merge ``checkpoints`` into the stored set and replace the file atomically."""
        async with self._lock:  # saves must reach the disk in the order they were made
            view = dict(self._started_view())
            view.update((c.partition, c) for c in checkpoints)
            try:
                await asyncio.to_thread(self._write, view)
            except OSError as exc:
                raise self._write_error(exc) from exc
            self._view = view  # only once durable: a failed save changes nothing

    def _write_error(self, exc: OSError) -> TransientError | PermanentError:
        text = f"saving checkpoints in STATE_DIR {self._dir} failed: {describe_error(exc)}"
        if exc.errno in _TRANSIENT_ERRNOS:
            return TransientError(text)
        return PermanentError(
            f"{text}; it must be a directory the service's user can write "
            "(in the image: writable by group 0)"
        )

    # -- file I/O (runs in a worker thread) --------------------------------------------

    def _read(self) -> dict[str, PartitionCheckpoint]:
        self._dir.mkdir(parents=True, exist_ok=True)  # fail early on a bad STATE_DIR
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return {}
        return decode(data, self.namespace, str(self.path))

    def _write(self, view: dict[str, PartitionCheckpoint]) -> None:
        data = encode(view, self.namespace)
        with open(self._tmp_path, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(self._tmp_path, self.path)
        dir_fd = os.open(self._dir, os.O_RDONLY)
        try:
            os.fsync(dir_fd)  # makes the rename itself durable
        finally:
            os.close(dir_fd)


def encode(view: dict[str, PartitionCheckpoint], namespace: str) -> bytes:
    body = orjson.dumps(
        {
            "namespace": namespace,
            "partitions": {
                p: {
                    "position": c.position,
                    "state": None if c.state is None else base64.b64encode(c.state).decode(),
                    "outputs": None if c.outputs is None else dict(c.outputs),
                }
                for p, c in view.items()
            },
        }
    )
    header = b"%s %d %08x %d\n" % (_MAGIC, FORMAT_VERSION, zlib.crc32(body), len(body))
    return header + body


def decode(data: bytes, namespace: str, where: str) -> dict[str, PartitionCheckpoint]:
    """Parse a checkpoint file; raises :class:`CheckpointFileError` naming the problem."""
    header, sep, body = data.partition(b"\n")
    fields = header.split(b" ")
    if not sep or len(fields) != 4 or fields[0] != _MAGIC:
        raise CheckpointFileError(
            f"{where} is not a VaBus checkpoint file (bad header); move it away to start "
            "from scratch, knowing that open windows and positions will be lost"
        )
    if fields[1] != str(FORMAT_VERSION).encode():
        raise CheckpointFileError(
            f"{where} has checkpoint format version {fields[1].decode(errors='replace')}, "
            f"this service reads version {FORMAT_VERSION}; run a matching service version"
        )
    if fields[3] != str(len(body)).encode() or fields[2] != b"%08x" % zlib.crc32(body):
        raise CheckpointFileError(
            f"{where} is corrupt (length or checksum mismatch); restore it from a backup or "
            "move it away to start from scratch"
        )
    try:
        obj: Any = orjson.loads(body)
        if obj["namespace"] != namespace:
            raise CheckpointFileError(
                f"{where} belongs to namespace {obj['namespace']!r}, not {namespace!r}"
            )
        return {
            p: PartitionCheckpoint(
                partition=p,
                position=c["position"],
                state=None if c["state"] is None else base64.b64decode(c["state"], validate=True),
                outputs=c.get("outputs"),
            )
            for p, c in obj["partitions"].items()
        }
    except (orjson.JSONDecodeError, KeyError, TypeError, AttributeError, binascii.Error) as exc:
        raise CheckpointFileError(f"{where} has a malformed body: {exc}") from exc
