"""The archive step the sender runs before each checkpoint: exactly once across crashes.

Per slice (one partition's accepted events of positions ``[start, end)``):

1. the partition's intent (``_intents/<partition>.json``: the start and the files of
   the slice being written last) is read when this instance does not know it — after an
   assignment, a restore or a failure. If it names the same ``start``, those files come
   from an attempt that never reached its checkpoint (a ``kill -9``, a rewind, a
   hand-off, a retry): they are deleted, in whatever hour they are, because the events
   they hold are about to be written again, perhaps cut differently;
2. the new intent (``start``, ``end``, the files) is written, then the files; every
   write is atomic, so a crash leaves whole files that the intent names;
3. only then does the sender save the checkpoint at ``end``.

A checkpoint at ``end`` therefore covers files that are all present, and the next
restore (at ``end`` or later) never deletes them: a slice's files are deleted only by a
slice with the same start, that is, by a replay of the same positions. See
docs/archive.md for the argument and its one assumption (a position is never reused).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import orjson

from service.archive.layout import data_name, intent_name
from service.archive.parquet import by_hour
from service.archive.rows import ArchiveSlice
from service.archive.stores import ArchiveStore, build_store
from service.config.archive import ArchiveConfig
from service.core.errors import TransientError
from service.metrics.collector import MetricsCollector

__all__ = ["ARCHIVE", "ArchiveWriter", "build_archive"]

log = logging.getLogger(__name__)

ARCHIVE = "archive"
"""The archive's name in retry logs, metrics (``sink`` label) and ``/readyz``."""


@dataclass(frozen=True, slots=True)
class _Intent:
    start: str | None
    files: tuple[str, ...]


_NONE = _Intent(None, ())


class ArchiveWriter:
    name = ARCHIVE

    def __init__(self, store: ArchiveStore, metrics: MetricsCollector) -> None:
        self._store = store
        self._metrics = metrics
        # the intent last written or read per partition: valid while this instance
        # owns the partition and nothing failed half-way
        self._known: dict[str, _Intent] = {}

    async def start(self) -> None:
        await self._store.check()

    async def stop(self) -> None:
        await self._store.close()

    async def check(self) -> None:
        await self._store.check()

    def forget(self, partitions: Iterable[str]) -> None:
        """What this instance knows of these partitions' intents may be stale."""
        for p in partitions:
            self._known.pop(p, None)

    async def write(self, slices: Sequence[ArchiveSlice]) -> None:
        """Make every slice durable (retried by the caller as a whole: idempotent). The
        partitions are written side by side; all of them finish before a failure is
        raised, so a retry never overlaps a write still under way."""
        await _all(self._one(s) for s in slices)

    async def _one(self, s: ArchiveSlice) -> None:
        if s.fresh:
            self._known.pop(s.partition, None)
        try:
            await self._write(s)
        except Exception as exc:
            self._known.pop(s.partition, None)  # read it again on the retry
            self._metrics.on_sink_error(ARCHIVE, isinstance(exc, TransientError))
            raise

    async def _write(self, s: ArchiveSlice) -> None:
        prior = self._known.get(s.partition)
        if prior is None:
            prior = await self._read_intent(s.partition)
        files = by_hour(s.rows, s.partition) if len(s.rows) else {}
        names = {data_name(h, s.partition, s.start, s.end): data for h, data in files.items()}
        if prior.start == s.start and prior.files:
            stale = [n for n in prior.files if n not in names]
            if stale:
                log.info(
                    "archive: %s from position %s written again: removing %d file(s) of "
                    "an attempt that was not checkpointed",
                    s.partition,
                    s.start,
                    len(stale),
                )
                await _all(self._store.delete(n) for n in stale)
        elif not names:
            self._known[s.partition] = prior  # nothing to undo, nothing to write
            return
        intent = _Intent(s.start, tuple(sorted(names)))
        text = {"start": s.start, "end": s.end, "files": list(intent.files)}
        await self._store.put(intent_name(s.partition), orjson.dumps(text))
        self._known[s.partition] = intent
        await _all(self._store.put(n, data) for n, data in names.items())
        if names:
            self._metrics.on_archive_written(len(names), len(s.rows))

    async def _read_intent(self, partition: str) -> _Intent:
        data = await self._store.get(intent_name(partition))
        if data is None:
            return _NONE
        try:
            doc = orjson.loads(data)
            start, files = doc["start"], doc["files"]
            if (start is not None and type(start) is not str) or not all(
                type(f) is str for f in files
            ):
                raise TypeError("start or files of the wrong type")
        except Exception as exc:  # not ours, or damaged: nothing to undo by it
            log.error("archive: intent of %s unreadable, ignored: %r", partition, exc)
            return _NONE
        return _Intent(start, tuple(files))


async def _all(steps: Iterable[Coroutine[Any, Any, None]]) -> None:
    """Run ``steps`` side by side; raise the first failure once every one has ended
    (so that nothing still runs when the caller retries)."""
    for outcome in await asyncio.gather(*steps, return_exceptions=True):
        if isinstance(outcome, BaseException):
            raise outcome


def build_archive(cfg: ArchiveConfig, metrics: MetricsCollector) -> ArchiveWriter:
    """The writer ARCHIVE_URL names (a directory or an S3 bucket)."""
    return ArchiveWriter(build_store(cfg), metrics)
