"""Closing windows: what a close boundary takes out of each partition, merged over the
partitions that hold shares of one window, and the aggregates of what was taken.

Each partition's emitted boundary only moves up (a partition adopted with an older
history pulls the watermark back for a while; the others keep theirs). A holding
partition's moves to the boundary, which is never above its own event time minus the
grace. A silent one's moves only past the windows emitted for it (the quiet rule,
:func:`~service.aggregation.windows.quiet_close`), so when it speaks again it is judged
by its own history.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Final

from service.aggregation.functions import FUNCTIONS, Acc
from service.aggregation.kept import Kept, copy_acc
from service.aggregation.partition import PartitionState, WindowKey
from service.aggregation.percentiles import sketch_of
from service.aggregation.rollups import fold, take_levels
from service.aggregation.series import ROUTE_SEP, SEP, split_route
from service.aggregation.windows import emitted_by, quiet_close
from service.core.events import Aggregate, RoutedAggregate
from service.metrics.collector import MetricsCollector

__all__ = ["Taken", "aggregates_of", "take_through"]

log = logging.getLogger(__name__)

_Split = tuple[str, Mapping[str, str] | None, str | None]  # (name, tags, route)

_RESULT: Final[dict[str, Callable[[Acc], float]]] = {k: f.result for k, f in FUNCTIONS.items()}


class Taken:
    """The windows a boundary took out: merged by start, the partition that gave each
    its first share (blamed when its result is unusable), and how many keys in all;
    ``revisions``: of corrections (:mod:`service.aggregation.corrections`), else 1."""

    __slots__ = ("keys", "levels", "owner", "private", "ready", "revisions")

    def __init__(self) -> None:
        self.ready: dict[float, dict[WindowKey, Acc]] = {}
        self.owner: dict[float, PartitionState] = {}
        self.revisions: dict[float, dict[WindowKey, int]] = {}
        # keeping: the merged accumulators that are copies (the others are kept shares)
        self.private: dict[float, set[WindowKey]] | None = None
        self.keys = 0
        # AGGREGATION_ROLLUPS: (length, windows) of the rollup levels this step took
        self.levels: list[tuple[float, Taken]] = []


def take_through(
    parts: Collection[PartitionState],
    boundary: float,
    interval: float,
    idle_s: float,
    metrics: MetricsCollector,
    *,
    keep: bool = False,
    rollups: Sequence[float] = (),
) -> Taken:
    """Take out every window ending at or before ``boundary``, merged over partitions,
    and move each partition's emitted boundary; ``keep`` (allowed lateness above 0):
    each partition keeps its share for corrections (``kept``, revision 1), and a merge
    of shares works on copies (only of the keys that several partitions share).
    ``rollups`` (AGGREGATION_ROLLUPS): each window taken is folded into its partition's
    first rollup level, and the rollup windows the boundary passed are taken too
    (``levels``, :mod:`service.aggregation.rollups`)."""
    taken = Taken()
    if keep:
        taken.private = {}
    for p in parts:
        if p.closed_until >= boundary:
            continue
        starts = emitted_by(p.windows, boundary, interval)
        if p.holds(idle_s):
            p.closed_until = boundary
        elif starts:
            # ahead events' windows above the partition's event time are remembered one
            # by one, so on-time events below them stay on time
            p.closed_until, above = quiet_close(starts, p.max_ts, p.closed_until, interval)
            p.ahead_closed.update(above)
        if p.ahead_closed:
            p.ahead_closed = {s for s in p.ahead_closed if s + interval > p.closed_until}
        for start in starts:
            keyed = p.windows.pop(start)
            if p.series is not None:
                p.series.forget(start)
            if keep:
                p.kept[start] = {key: Kept(acc, 1) for key, acc in keyed.items()}
            taken.keys += len(keyed)
            p.on_emitted(keyed)
            if rollups:  # before the merge, which changes the first share in place
                fold(p.rollups, rollups[0], start, keyed)
            _merge(taken, p, start, keyed, metrics)
    if rollups:
        taken.levels = take_levels(parts, boundary, rollups, keep=keep)
    return taken


def _merge(
    taken: Taken,
    p: PartitionState,
    start: float,
    keyed: dict[WindowKey, Acc],
    metrics: MetricsCollector,
) -> None:
    into = taken.ready.get(start)
    private = taken.private
    if into is None:
        taken.ready[start] = keyed if private is None else dict(keyed)
        taken.owner[start] = p
        return
    for key, acc in keyed.items():
        mine = into.get(key)
        if mine is None:
            into[key] = acc
            continue
        if private is not None:  # never merge into a kept share: into a copy of it
            copied = private.setdefault(start, set())
            if key not in copied:
                into[key] = mine = copy_acc(mine)
                copied.add(key)
        try:
            FUNCTIONS[key[1]].merge(mine, acc)
        except OverflowError:
            _on_merge_overflow(p, key, start, acc[0], metrics)


def aggregates_of(
    taken: Taken, interval: float, now: float, metrics: MetricsCollector, *, tagged: bool = False
) -> list[Aggregate]:
    """The aggregates of the windows taken, by start; a window without a finite result
    is dropped (and logged), never emitted. ``tagged`` (AGGREGATION_GROUP_BY set):
    each series key is split into the name and its tags ({} for none)."""
    emitted: list[Aggregate] = []
    append = emitted.append
    result_of = _RESULT
    names: dict[str, _Split] = {}  # series -> split, cached
    for start in sorted(taken.ready):
        end = start + interval
        revisions = taken.revisions.get(start)
        for (series, func), acc in taken.ready[start].items():
            try:
                value = result_of[func](acc)
                finite = value - value == 0.0  # inf - inf and nan - nan are nan
            except Exception:  # a broken state must not stop the stage: dropped
                finite = False
            if finite:
                revision = 1 if revisions is None else revisions[(series, func)]
                sketch = sketch_of(func, acc)  # p50..p99: the DDSketch (contract 12.5)
                if not tagged and SEP not in series and ROUTE_SEP not in series:
                    # without tags: as before v1.3
                    append(
                        Aggregate(
                            series,
                            func,
                            value,
                            acc[0],
                            start,
                            end,
                            now,
                            revision=revision,
                            sketch=sketch,
                        )
                    )
                    continue
                split_ = names.get(series)
                if split_ is None:
                    split_ = names[series] = _split(series, tagged)
                name, tags, route = split_
                n = acc[0]
                if route is None:
                    append(Aggregate(name, func, value, n, start, end, now, tags, revision, sketch))
                else:  # a source rule's series (service.aggregation.source_marks)
                    made = RoutedAggregate(
                        name, func, value, n, start, end, now, tags, revision, sketch, route
                    )
                    append(made)
            else:
                _on_unusable(taken.owner[start], (series, func), start, acc, metrics)
    return emitted


def _split(series: str, tagged: bool) -> _Split:
    """(name, tags, route) of an aggregate; a tagged series restored into a run without
    AGGREGATION_GROUP_BY keeps its tags rather than merge into the name's series."""
    name, tags, route = split_route(series)
    return name, ({} if tagged and tags is None else tags), route


def _on_merge_overflow(
    p: PartitionState, key: WindowKey, start: float, events: int, metrics: MetricsCollector
) -> None:
    """A partition's share of a window would take the merged sum beyond the double
    range: the window keeps the value it had, that share counts as rejected."""
    log.error(
        "window %s of %r/%r: merging %d event(s) from another partition would make the "
        "sum non-finite; they are counted as rejected (overflow)",
        start,
        key[0],
        key[1],
        events,
    )
    p.on_merge_overflow(events)
    metrics.on_events_rejected("overflow", events)


def _on_unusable(
    p: PartitionState, key: WindowKey, start: float, acc: Acc, metrics: MetricsCollector
) -> None:
    """Never expected (state is validated when restored, every function stays finite),
    but no output may hold a value a consumer cannot parse, nor a stage crash-loop."""
    events = acc[0] if type(acc[0]) is int else 0
    log.error(
        "window %s of %r/%r has no finite result (state %.200r); dropped with %d event(s)",
        start,
        key[0],
        key[1],
        acc,
        events,
    )
    p.on_dropped(events, emitted=True)
    metrics.on_state_dropped("window")
