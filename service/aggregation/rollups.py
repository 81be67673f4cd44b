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
of).

Corrections (``AGGREGATION_ALLOWED_LATENESS`` > 0): a partition also keeps its share of
each emitted rollup window (``kept_rollups``, like :mod:`service.aggregation.kept`) until
its watermark passes the rollup's end plus the lateness; a late event applied to a base
window goes, level by level, into the rollup window's kept share (re-emitted with the
next revision, :func:`correct`) until it reaches a level whose window is still open,
whose partial takes it (no revision: the levels above get it when that one is taken).
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Final

from service.aggregation.functions import FUNCTIONS, Acc, valid
from service.aggregation.kept import Kept, KeptWindows, expire
from service.aggregation.series import is_plain, valid_series
from service.aggregation.windows import window_start

if TYPE_CHECKING:
    from service.aggregation.emission import Taken
    from service.aggregation.partition import PartitionState

__all__ = [
    "ROLLUP_STATE_FORMAT",
    "RollupPartials",
    "add_late",
    "corrected",
    "decode",
    "decode_kept",
    "encode",
    "encode_kept",
    "expire_kept",
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
    parts: Iterable[PartitionState],
    boundary: float,
    lengths: Sequence[float],
    *,
    keep: bool = False,
) -> list[tuple[float, Taken]]:
    """Take out every rollup window ending at or before ``boundary``, level by level
    (each partition's share folded into its next level first), merged over partitions;
    returns (length, taken) for the levels that took any. ``keep`` (allowed lateness
    above 0): each partition keeps its share (``kept_rollups``, revision 1) and the
    merge works on copies."""
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
                if keep:
                    p.kept_rollups.setdefault(length, {})[rs] = {
                        key: Kept(acc, 1) for key, acc in keyed.items()
                    }
                    keyed = {key: copy_acc(acc) for key, acc in keyed.items()}
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


Touched = dict[tuple[float, float, Key], None]  # (length, start, key), in touch order


def add_late(
    part: PartitionState,
    everyone: Sequence[PartitionState],
    lengths: Sequence[float],
    start: float,
    key: Key,
    value: float,
    ts: float,
    touched: Touched,
) -> None:
    """A late event applied to base window ``start`` of ``part``: into the kept share of
    each emitted rollup window above it (noted in ``touched``, to be re-emitted), up to
    the first level whose window is still open, whose partial takes it. A level emitted
    but no longer kept anywhere (expired, or emitted before a restart without them)
    stops it: a revision must never lack events emitted before. A level not emitted
    (kept nowhere, ending past the partition's emitted boundary) is open even when this
    partition has no partial of it yet."""
    func = FUNCTIONS[key[1]]
    for length in lengths:
        rs = window_start(start, length)
        into = part.rollups.get(length, {}).get(rs)
        if into is not None:  # open: the levels above get it when this one is taken
            _add(into, key, func.new, func.add, value, ts, length)
            return
        shares = [q.kept_rollups.get(length, {}).get(rs) for q in everyone]
        if not any(shares) and rs + length > part.closed_until:
            # open, but this partition had no base window in it yet: its partial starts
            level = part.rollups.setdefault(length, {})
            _add(level.setdefault(rs, {}), key, func.new, func.add, value, ts, length)
            return
        if not any(shares):
            log.warning(
                "a correction of %r/%r at %s: its %gs rollup window is no longer kept; "
                "that rollup (and those above it) are not corrected",
                key[0],
                key[1],
                start,
                length,
            )
            return
        mine = part.kept_rollups.setdefault(length, {}).setdefault(rs, {})
        share = mine.get(key)
        if share is None:  # a key new to this partition's share: its revision follows
            revision = max((k.revision for k in _kept_shares(everyone, length, rs, key)), default=0)
            mine[key] = Kept(func.new(value, ts), revision)
        else:
            try:
                func.add(share.acc, value, ts)
            except OverflowError:
                log.error("rollup window %s of %r/%r: a late event would overflow", rs, *key)
        touched[(length, rs, key)] = None


def _add(
    into: dict[Key, Acc], key: Key, new: Any, add: Any, value: float, ts: float, length: float
) -> None:
    acc = into.get(key)
    if acc is None:
        into[key] = new(value, ts)
        return
    try:
        add(acc, value, ts)
    except OverflowError:
        log.error("rollup window (%gs) of %r/%r: a late event would overflow", length, *key)


def _kept_shares(
    parts: Iterable[PartitionState], length: float, start: float, key: Key
) -> list[Kept]:
    found = []
    for q in parts:
        keyed = q.kept_rollups.get(length, {}).get(start)
        if keyed is not None and (k := keyed.get(key)) is not None:
            found.append(k)
    return found


def corrected(
    part: PartitionState, everyone: Sequence[PartitionState], touched: Touched
) -> list[tuple[float, Taken]]:
    """The touched rollup keys whole (the kept shares merged into a copy), with the next
    revision, set on every share; (length, taken) per level, lowest first."""
    from service.aggregation.emission import Taken

    levels: dict[float, Taken] = {}
    for length, start, key in touched:
        shares = _kept_shares(everyone, length, start, key)
        merged = copy_acc(shares[0].acc)
        for other in shares[1:]:
            _merge(merged, other.acc, key, start, length)
        revision = max(k.revision for k in shares) + 1
        for k in shares:
            k.revision = revision
        taken = levels.get(length)
        if taken is None:
            taken = levels[length] = Taken()
        taken.ready.setdefault(start, {})[key] = merged
        taken.owner.setdefault(start, part)
        taken.revisions.setdefault(start, {})[key] = revision
    return sorted(levels.items())


def expire_kept(p: PartitionState, watermark: float, lateness: float) -> None:
    """Free the kept rollup windows whose correction time has passed."""
    for length, kept in p.kept_rollups.items():
        expire(kept, watermark, length, lateness)


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


def encode_kept(kept: dict[float, KeptWindows]) -> list[list[Any]]:
    """The ``kept_rollups`` field: ``[length, start, series, func, acc, revision]``."""
    return [
        [length, start, series, func, k.acc, k.revision]
        for length, level in kept.items()
        for start, keyed in level.items()
        for (series, func), k in keyed.items()
    ]


def decode_kept(entries: Any) -> tuple[dict[float, KeptWindows], list[str]]:
    """The kept rollup windows of a checkpoint and why entries were dropped (a dropped
    share only loses that rollup's corrections: :func:`add_late` stops at it)."""
    kept: dict[float, KeptWindows] = {}
    if entries is None:
        return kept, []
    if type(entries) is not list:
        return kept, [f"kept_rollups is a {type(entries).__name__}"]
    dropped: list[str] = []
    for entry in entries:
        ok = type(entry) is list and len(entry) == 6
        why = _invalid(entry[:5]) if ok else "a kept rollup entry is not a list of 6"
        if why is None and (type(entry[5]) is not int or entry[5] < 0):
            why = f"kept rollup revision {entry[5]!r} is not a revision"
        if why is not None:
            dropped.append(why)
            continue
        length, start, series, func, acc, revision = entry
        level = kept.setdefault(float(length), {})
        level.setdefault(float(start), {})[(series, func)] = Kept(acc, revision)
    return kept, dropped


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


def keep_configured(p: PartitionState, lengths: Sequence[float]) -> list[str]:
    """Drop the partials (and kept rollups) of lengths not in ``lengths``
    (AGGREGATION_ROLLUPS changed: that resolution is no longer written)."""
    gone = [length for length in p.rollups if length not in lengths]
    for length in [length for length in p.kept_rollups if length not in lengths]:
        del p.kept_rollups[length]
    return [
        f"{partial_keys({length: p.rollups.pop(length)})} partial(s) of rollup length "
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
    if not is_plain(series) and not valid_series(series):
        return f"rollup series {series[:100]!r} is not a name, its tags and its route"
    if not valid(func, acc):
        return f"rollup state of {series[:100]!r}/{func} is not a valid accumulator"
    return None
