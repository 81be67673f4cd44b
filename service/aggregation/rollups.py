"""Rollups (``AGGREGATION_ROLLUPS``, contract §12.6): longer windows merged from the
finished windows below them, never from raw events.

Each partition keeps, per rollup length and window start, one *partial*: an accumulator
per series key (``RollupPartials``). When a base window is taken out for emission
(:func:`~service.aggregation.emission.take_through`) a copy of each of its accumulators
is merged into the partial of the first level; when a level's window is taken, into the
next level's. A rollup window is taken when the close boundary reaches its end, from
every partition in the same close step (merged over them like base windows), so it is
durable with the base window that completes it. Memory: one accumulator per open rollup
window and key (the percentile ones are sketches beyond 10,000 values), never events.

Partials travel in the partition's checkpoint (``rollups``; state format 4 while there
are any, so a release before rollups refuses a state it would silently lose the hour
of). Late events applied as corrections go into the lowest rollup window still open
(:func:`add_late`); a rollup window that was already emitted is not corrected
(docs/rollups.md).
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Final

from service.aggregation.functions import FUNCTIONS, Acc, valid
from service.aggregation.series import SEP, valid_series
from service.aggregation.windows import window_start

if TYPE_CHECKING:
    from service.aggregation.emission import Taken
    from service.aggregation.partition import PartitionState

__all__ = [
    "ROLLUP_STATE_FORMAT",
    "RollupPartials",
    "add_late",
    "decode",
    "encode",
    "fold",
    "keep_configured",
    "partial_keys",
    "take_levels",
]

log = logging.getLogger(__name__)

Key = tuple[str, str]  # partition.WindowKey: (series, agg_func)
RollupPartials = dict[float, dict[float, dict[Key, Acc]]]  # length -> start -> key -> acc

ROLLUP_STATE_FORMAT: Final = 4
"""A partition state holding rollup partials: a release before rollups would drop them
(and emit nothing for those hours), so it refuses the state instead."""


def copy_acc(acc: Acc) -> Acc:
    """A copy that shares nothing mutable with ``acc`` (a percentile's store is a list
    or a sketch dict); cheaper than a deepcopy of the whole accumulator."""
    out = acc[:]
    store = out[1] if len(out) > 1 else None
    if type(store) is list:
        out[1] = store[:]
    elif type(store) is dict:
        out[1] = copy.deepcopy(store)
    return out


def fold(partials: RollupPartials, length: float, start: float, keyed: Mapping[Key, Acc]) -> None:
    """Merge copies of a finished window's accumulators (``keyed``, starting at
    ``start``) into the partial of the ``length`` window that holds it; ``keyed`` is
    left as it is (its owner merges other partitions' shares into it next)."""
    level = partials.get(length)
    if level is None:
        level = partials[length] = {}
    rs = window_start(start, length)
    into = level.get(rs)
    if into is None:
        level[rs] = {key: copy_acc(acc) for key, acc in keyed.items()}
        return
    for key, acc in keyed.items():
        mine = into.get(key)
        if mine is None:
            into[key] = copy_acc(acc)
        else:
            _merge(mine, acc, key, rs, length)


def _merge(into: Acc, other: Acc, key: Key, start: float, length: float) -> None:
    try:
        FUNCTIONS[key[1]].merge(into, other)
    except OverflowError:  # merge left ``into`` as it was; the base windows hold them
        log.error(
            "rollup window %s (%gs) of %r/%r: merging %d event(s) would make the sum "
            "non-finite; the rollup leaves them out",
            start,
            length,
            key[0],
            key[1],
            other[0],
        )


def take_levels(
    parts: Iterable[PartitionState], boundary: float, lengths: Sequence[float]
) -> list[tuple[float, Taken]]:
    """Take out every rollup window ending at or before ``boundary``, level by level
    (each partition's share folded into its next level first), merged over partitions;
    returns (length, taken) for the levels that took any."""
    from service.aggregation.emission import Taken  # emission imports this module

    parts = list(parts)
    out: list[tuple[float, Taken]] = []
    for i, length in enumerate(lengths):
        upper = lengths[i + 1] if i + 1 < len(lengths) else None
        taken: Taken | None = None
        for p in parts:
            level = p.rollups.get(length)
            if not level:
                continue
            for rs in sorted(s for s in level if s + length <= boundary):
                keyed = level.pop(rs)
                if upper is not None:
                    fold(p.rollups, upper, rs, keyed)
                if taken is None:
                    taken = Taken()
                _merge_share(taken, p, rs, keyed, length)
        if taken is not None:
            out.append((length, taken))
    return out


def _merge_share(
    taken: Taken, p: PartitionState, start: float, keyed: dict[Key, Acc], length: float
) -> None:
    """Like emission's merge of base shares, without the ledger (a rollup counts no
    event again); the popped partial is no one else's, so it is merged into as it is."""
    into = taken.ready.get(start)
    if into is None:
        taken.ready[start] = keyed
        taken.owner[start] = p
        taken.keys += len(keyed)
        return
    for key, acc in keyed.items():
        mine = into.get(key)
        if mine is None:
            into[key] = acc
            taken.keys += 1
        else:
            _merge(mine, acc, key, start, length)


def add_late(
    partials: RollupPartials,
    lengths: Sequence[float],
    start: float,
    key: Key,
    value: float,
    ts: float,
) -> bool:
    """A late event applied to base window ``start`` goes into the lowest rollup window
    of this partition that is still open (the levels above get it when that one is
    taken). False when every level's window was emitted: not corrected (documented)."""
    func = FUNCTIONS[key[1]]
    for length in lengths:
        into = partials.get(length, {}).get(window_start(start, length))
        if into is None:
            continue
        acc = into.get(key)
        if acc is None:
            into[key] = func.new(value, ts)
            return True
        try:
            func.add(acc, value, ts)
        except OverflowError:
            log.error("rollup window (%gs) of %r/%r: a late event would overflow", length, *key)
        return True
    return False


def partial_keys(partials: RollupPartials) -> int:
    return sum(len(keyed) for level in partials.values() for keyed in level.values())


# -- checkpoint --------------------------------------------------------------------------


def encode(partials: RollupPartials) -> list[list[Any]]:
    """The ``rollups`` field: ``[length, start, series, func, acc]`` entries."""
    return [
        [length, start, series, func, acc]
        for length, level in partials.items()
        for start, keyed in level.items()
        for (series, func), acc in keyed.items()
    ]


def decode(entries: Any) -> tuple[RollupPartials, list[str]]:
    """The partials of a checkpoint's ``rollups`` field and why entries were dropped
    (the aggregator drops lengths no longer configured: :func:`keep_configured`)."""
    partials: RollupPartials = {}
    dropped: list[str] = []
    if entries is None:
        return partials, dropped
    if type(entries) is not list:
        return partials, [f"rollups is a {type(entries).__name__}"]
    for entry in entries:
        why = _invalid(entry)
        if why is not None:
            dropped.append(why)
            continue
        length, start, series, func, acc = entry
        level = partials.setdefault(float(length), {})
        level.setdefault(float(start), {})[(series, func)] = acc
    return partials, dropped


def keep_configured(partials: RollupPartials, lengths: Sequence[float]) -> list[str]:
    """Drop the partials of lengths not in ``lengths`` (AGGREGATION_ROLLUPS changed:
    that resolution is no longer written); returns what was dropped."""
    gone = [length for length in partials if length not in lengths]
    return [
        f"{partial_keys({length: partials.pop(length)})} partial(s) of rollup length "
        f"{length:g}, which AGGREGATION_ROLLUPS no longer lists"
        for length in gone
    ]


def _invalid(entry: Any) -> str | None:
    if type(entry) is not list or len(entry) != 5:
        return f"rollup entry {str(entry)[:100]} is not [length, start, series, func, state]"
    length, start, series, func, acc = entry
    for t in (length, start):
        if type(t) not in (int, float) or not math.isfinite(t):
            return f"rollup time {t!r} is not a time"
    if type(series) is not str or type(func) is not str or func not in FUNCTIONS:
        return f"rollup series {str(series)[:100]!r} or function {func!r} is not valid"
    if SEP in series and not valid_series(series):
        return f"rollup series {series[:100]!r} is not a name and its tags"
    if not valid(func, acc):
        return f"rollup state of {series[:100]!r}/{func} is not a valid accumulator"
    return None
