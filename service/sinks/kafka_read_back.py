"""What the Kafka output already holds past a restored checkpoint, so a replay skips it.

An aggregate record's identity is ``(name, tags, agg_func, window_start, window_end,
revision)`` (``window_end`` only because rollups will share a start with the window
below them): each is written once, and a later revision of a written window is a new
record. A replay recomputes the same revision from the same events, so a read-back
identity is skipped however often the replay repeats it.

Records of the previous release (v1.2) hold ``"revision" = count`` and no ``tags``;
after an upgrade the new release re-emits such a window, replayed from the old
checkpoint, as revision 1 with the same count. Within this release a window's count
grows with every revision (a correction adds at least one event, the first emission
holds at least one), so for one window the count names the revision as well. Hence a
record without ``tags`` whose revision equals its count is also identified by its count,
whichever release wrote it, and an aggregate without tags (or with empty tags: the same
series, as in PostgreSQL) matching that count is skipped. Such a record counts by its
revision as well only when that is 1 (then both readings agree): a v1.2 record of 5
events must not hide revision 5 of its window. The residue: a replay that decides
differently about an event far behind its partition recomputes a window with another
count; such a record (revision = count > 1, no tags) is then written again.
"""

from __future__ import annotations

import functools
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any, Final

import orjson

from service.core.events import Aggregate, DeadLetter, iso_utc

__all__ = ["AlreadyWritten"]

_READ_BACK_KEEP_S: Final = 600.0

# (name, tags as sorted items, agg_func, window_start, window_end, revision)
_ByRevision = tuple[str, tuple[tuple[str, str], ...], str, str, str, int]
# (name, agg_func, window_start, window_end, count): tag-less records with revision = count
_ByCount = tuple[str, str, str, str, int]


def _tag_items(tags: Mapping[str, Any] | None) -> tuple[tuple[str, str], ...]:
    """No tags and empty tags are one series, as in PostgreSQL (``tags = '{}'``)."""
    return tuple(sorted(tags.items())) if tags else ()


class AlreadyWritten:
    """Records found in the output past a restored checkpoint (``emitted_at`` and
    ``received_at`` aside: a replay stamps new ones). Aggregates by identity (the
    module's docstring), skipped every time they come again; dead letters by
    ``(where, reason, raw)``, one copy skipped per copy found, with ``where`` their
    source when that names a position (Kafka: topic, partition, offset), else only its
    transport (an HTTP batch's cursor depends on where the replay's batches happen to
    start). All is forgotten ``_READ_BACK_KEEP_S`` after the read-back: by then the
    replay that could repeat them is long over."""

    def __init__(self) -> None:
        self._by_revision: set[_ByRevision] = set()
        self._by_count: set[_ByCount] = set()
        self._dead_letters: Counter[tuple[str, str, str]] = Counter()
        self._until = 0.0

    def __bool__(self) -> bool:
        return bool(self._by_revision or self._by_count or self._dead_letters)

    @staticmethod
    def _where(source: str) -> str:
        return source if "offset=" in source else source.split(" ", 1)[0]

    def add(self, found: list[tuple[str, bytes]], aggregates_topic: str, now: float) -> None:
        for topic, value in found:
            try:
                obj = orjson.loads(value)
                if topic == aggregates_topic:
                    self._add_aggregate(obj)
                else:
                    where = self._where(obj["source"])
                    self._dead_letters[(where, obj["reason"], obj["raw"])] += 1
            except (orjson.JSONDecodeError, KeyError, TypeError, AttributeError):
                continue  # not ours: nothing we could repeat
        self._until = now + _READ_BACK_KEEP_S

    def _add_aggregate(self, obj: dict[str, Any]) -> None:
        name, func, start, end = (
            obj["name"],
            obj["agg_func"],
            obj["window_start"],
            obj["window_end"],
        )
        revision, count = obj["revision"], obj["count"]
        tags = obj.get("tags")
        if tags is None and revision == count:
            self._by_count.add((name, func, start, end, count))
            if revision != 1:  # else both readings agree: it is revision 1
                return
        self._by_revision.add((name, _tag_items(tags), func, start, end, revision))

    def drop_written(
        self, aggregates: Sequence[Aggregate], dead_letters: Sequence[DeadLetter], now: float
    ) -> tuple[Sequence[Aggregate], Sequence[DeadLetter]]:
        if now > self._until:
            self._by_revision.clear()
            self._by_count.clear()
            self._dead_letters.clear()
            return aggregates, dead_letters
        iso = functools.lru_cache(maxsize=None)(iso_utc)
        by_revision, by_count = self._by_revision, self._by_count
        kept_a = []
        for a in aggregates:
            start, end = iso(a.window_start), iso(a.window_end)
            ident = (a.name, _tag_items(a.tags), a.agg_func, start, end, a.revision)
            if ident in by_revision:
                continue
            if not a.tags and (a.name, a.agg_func, start, end, a.count) in by_count:
                continue
            kept_a.append(a)
        seen_d = self._dead_letters
        kept_d = []
        for d in dead_letters:
            key_d = (self._where(d.source), d.reason, d.raw)
            if seen_d[key_d] > 0:
                seen_d[key_d] -= 1
            else:
                kept_d.append(d)
        seen_d += Counter()  # drop the keys counted down to zero
        return kept_a, kept_d
