"""The windows of a range computed from archived events, by the service's own rules.

Per partition, events go into pane accumulators in the order they were read (the
functions of :mod:`service.aggregation.functions`, as the hot loop applies them); a
window is its panes merged earliest first (one pane when tumbling), as
:func:`service.aggregation.hopping.take_panes` does; each rollup level folds the
windows of the level below, per partition (rollups are never computed from raw events:
:mod:`service.aggregation.rollups`); then each window is merged over the partitions and
its aggregate made as :func:`service.aggregation.emission.aggregates_of` makes it.

With rules that match by source (several sources), a partition's events are marked as
the service marked them (service.aggregation.source_marks), from the partition the archive keeps:
a source rule's windows are series of their own here too.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

from service.aggregation.functions import FUNCTIONS, Acc
from service.aggregation.hopping import covering
from service.aggregation.kept import copy_acc
from service.aggregation.percentiles import sketch_of
from service.aggregation.series import ROUTE_SEP, SEP, split_route
from service.aggregation.windows import window_start
from service.config import AggregationConfig
from service.core.events import Aggregate, RoutedAggregate
from service.replay.archived import Columns
from service.replay.span import ReplaySpan

__all__ = ["Key", "Level", "Windows", "add_events", "aggregates", "levels_of", "merged"]

log = logging.getLogger(__name__)

Key = tuple[str, str]  # (series, agg_func), as in the aggregator
Windows = dict[float, dict[Key, Acc]]


@dataclass(frozen=True, slots=True)
class Level:
    """Windows of ``length`` seconds starting at multiples of ``step``."""

    length: float
    step: float


def levels_of(cfg: AggregationConfig) -> list[Level]:
    """The base windows (hopping: every hop), then each rollup (tumbling)."""
    return [Level(cfg.interval_s, cfg.pane_s), *(Level(r, r) for r in cfg.rollups_s)]


def add_events(
    panes: Windows,
    cols: Columns,
    pane_s: float,
    span: ReplaySpan,
    marker: Callable[[str], str] | None = None,
) -> int:
    """Add one partition's events, in their order, to its panes; returns how many.
    ``marker``: the partition's source rule marks (as the aggregator's)."""
    fns = FUNCTIONS
    added = 0
    wanted: dict[str, bool] = {}  # --names decided once per name
    for name, func, value, ts, tags in zip(
        cols.names, cols.funcs, cols.values, cols.times, cols.tags, strict=True
    ):
        want = wanted.get(name)
        if want is None:
            want = wanted[name] = span.wants(name)
        if not want:
            continue
        fn = fns.get(func)
        if fn is None:
            log.warning("replay: archived event of %r has unknown function %r", name, func)
            continue
        series = name if tags is None or tags == "{}" else name + SEP + tags
        if marker is not None:
            series = marker(series)
        keyed = panes.setdefault(window_start(ts, pane_s), {})
        acc = keyed.get((series, func))
        if acc is None:
            keyed[(series, func)] = fn.new(value, ts)
        else:
            try:
                fn.add(acc, value, ts)
            except OverflowError:  # the service refused it too (it is not archived then)
                log.warning("replay: %r/%s at %s would overflow: skipped", name, func, ts)
                continue
        added += 1
    return added


def partition_levels(panes: Windows, levels: list[Level]) -> list[Windows]:
    """One partition's windows of every level from its panes."""
    base, rollups = levels[0], levels[1:]
    out: list[Windows] = []
    if base.step == base.length:
        below = panes
    else:
        below = {}
        for q in sorted(panes):  # earliest first: a merge treats ``into`` as earlier
            for s in covering(q, base.step, base.length):
                _merge_into(below.setdefault(s, {}), panes[q])
    out.append(below)
    for level in rollups:
        folded: Windows = {}
        for s in sorted(below):
            _merge_into(folded.setdefault(window_start(s, level.length), {}), below[s])
        out.append(folded)
        below = folded
    return out


def merged(shares: Iterable[Windows]) -> Windows:
    """Windows merged over the partitions' shares, in the order given."""
    out: Windows = {}
    for share in shares:
        for s, keyed in share.items():
            _merge_into(out.setdefault(s, {}), keyed)
    return out


def _merge_into(into: dict[Key, Acc], other: Mapping[Key, Acc]) -> None:
    for key, acc in other.items():
        mine = into.get(key)
        if mine is None:
            into[key] = copy_acc(acc)
            continue
        try:
            FUNCTIONS[key[1]].merge(mine, acc)
        except OverflowError:
            log.warning("replay: merging %r/%s would overflow; that share left out", *key)


def aggregates(
    windows: Windows, length: float, span: ReplaySpan, now: float, *, tagged: bool
) -> list[Aggregate]:
    """The aggregates of the windows starting in the span (a non-finite result, which
    the service would not emit either, is left out)."""
    out: list[Aggregate] = []
    for start in sorted(windows):
        if not span.start <= start < span.end:
            continue
        for (series, func), acc in windows[start].items():
            value = FUNCTIONS[func].result(acc)
            if value - value != 0.0:
                continue
            route = None
            if tagged or SEP in series or ROUTE_SEP in series:
                name, tags, route = split_route(series)
                got: Mapping[str, str] | None = {} if tagged and tags is None else tags
            else:
                name, got = series, None
            args = (name, func, value, acc[0], start, start + length, now, got, 1)
            sketch = sketch_of(func, acc)
            if route is None:
                out.append(Aggregate(*args, sketch))
            else:  # a source rule's series, as the service emits it
                out.append(RoutedAggregate(*args, sketch, route))
    return out
