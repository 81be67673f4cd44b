"""What the outputs hold against what the archive gives, and the revision to write.

Equal means the same ``count`` and the same value: exactly for the functions whose
result does not depend on the order of the events (``count``, ``min``, ``max``,
``first`` and ``last`` by event time, and percentiles, whose exact lists are sorted
and whose sketches count bins), and within a relative ``1e-9`` for ``sum``, ``avg``
and ``stddev``. Those are compensated or Welford sums whose last bits depend on the
order in which the partitions' shares were merged, which differs between the running
service and a replay; a real difference (a lost or doubled event, a wrong value) is many orders of
magnitude larger than that.

A window that differs is written with the held revision plus one (1 when none is held),
and with the count and value recomputed: the outputs' guard on ``(revision, count,
emitted_at)`` accepts it, a rerun finds it equal and writes nothing, and a rerun after
a crash half-way only writes what was not yet written (the target revision follows from
what the output holds, so it is the same on every run).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Final

import orjson

from service.core.events import Aggregate

__all__ = ["ORDER_FREE", "Held", "HeldKey", "decide", "held_key", "same_value", "tags_text"]

ORDER_FREE: Final = frozenset({"count", "min", "max", "first", "last"})
_REL_TOL: Final = 1e-9

HeldKey = tuple[str, str, str, float, float]  # name, tags JSON text, agg_func, start, end


@dataclass(frozen=True, slots=True)
class Held:
    value: float
    count: int
    revision: int


def tags_text(tags: Mapping[str, str] | None) -> str:
    """The tags as the PostgreSQL sink stores them (sorted keys; ``{}`` for none)."""
    return orjson.dumps(dict(tags) if tags else {}, option=orjson.OPT_SORT_KEYS).decode()


def held_key(a: Aggregate) -> HeldKey:
    return (a.name, tags_text(a.tags), a.agg_func, a.window_start, a.window_end)


def same_value(func: str, held: float, fresh: float) -> bool:
    if func in ORDER_FREE or func.startswith("p"):
        return held == fresh
    return math.isclose(held, fresh, rel_tol=_REL_TOL, abs_tol=0.0)


def decide(fresh: Aggregate, held: Held | None) -> Aggregate | None:
    """The aggregate to write, or None when the output already holds it."""
    if held is None:
        return fresh  # revision 1: the window was never written (its events arrived only late)
    if held.count == fresh.count and same_value(fresh.agg_func, held.value, fresh.value):
        return None
    return replace(fresh, revision=held.revision + 1)
