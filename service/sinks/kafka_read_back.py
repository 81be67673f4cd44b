"""What the Kafka output already holds past a restored checkpoint, so a replay skips it."""

from __future__ import annotations

import functools
from collections import Counter
from collections.abc import Sequence
from typing import Any, Final

import orjson

from service.core.events import Aggregate, DeadLetter, iso_utc

__all__ = ["AlreadyWritten"]

_READ_BACK_KEEP_S: Final = 600.0


class AlreadyWritten:
    """Records found in the output past a restored checkpoint, matched by content
    (``emitted_at`` and ``received_at`` aside: a replay stamps new ones), one copy per
    copy found: an aggregate is ``(name, agg_func, window_start, count, value)``, a dead
    letter ``(where, reason, raw)`` with ``where`` its source when that names a position
    (Kafka: topic, partition, offset), else only its transport (an HTTP batch's cursor
    depends on where the replay's batches happen to start). Forgotten once matched, or
    ``_READ_BACK_KEEP_S`` after the read-back: by then the replay that could repeat them
    is long over."""

    def __init__(self) -> None:
        self._aggregates: Counter[tuple[Any, ...]] = Counter()
        self._dead_letters: Counter[tuple[str, str, str]] = Counter()
        self._until = 0.0

    def __bool__(self) -> bool:
        return bool(self._aggregates or self._dead_letters)

    @staticmethod
    def _where(source: str) -> str:
        return source if "offset=" in source else source.split(" ", 1)[0]

    def add(self, found: list[tuple[str, bytes]], aggregates_topic: str, now: float) -> None:
        for topic, value in found:
            try:
                obj = orjson.loads(value)
                if topic == aggregates_topic:
                    key = (obj["name"], obj["agg_func"], obj["window_start"], obj["count"])
                    self._aggregates[(*key, obj["value"])] += 1
                else:
                    where = self._where(obj["source"])
                    self._dead_letters[(where, obj["reason"], obj["raw"])] += 1
            except (orjson.JSONDecodeError, KeyError, TypeError):
                continue  # not ours: nothing we could repeat
        self._until = now + _READ_BACK_KEEP_S

    def drop_written(
        self, aggregates: Sequence[Aggregate], dead_letters: Sequence[DeadLetter], now: float
    ) -> tuple[Sequence[Aggregate], Sequence[DeadLetter]]:
        if now > self._until:
            self._aggregates.clear()
            self._dead_letters.clear()
            return aggregates, dead_letters
        iso = functools.lru_cache(maxsize=None)(iso_utc)
        seen_a, seen_d = self._aggregates, self._dead_letters
        kept_a = []
        for a in aggregates:
            key = (a.name, a.agg_func, iso(a.window_start), a.count, a.value)
            if seen_a[key] > 0:
                seen_a[key] -= 1
            else:
                kept_a.append(a)
        kept_d = []
        for d in dead_letters:
            key_d = (self._where(d.source), d.reason, d.raw)
            if seen_d[key_d] > 0:
                seen_d[key_d] -= 1
            else:
                kept_d.append(d)
        seen_a += Counter()  # drop the keys counted down to zero
        seen_d += Counter()
        return kept_a, kept_d
