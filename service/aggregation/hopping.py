"""Hopping windows (``AGGREGATION_HOP`` below ``AGGREGATION_INTERVAL``, contract §12.7):
windows of the interval starting at every multiple of the hop, kept as hop-sized panes.

A partition's ``windows`` hold panes (the tumbling machinery with the hop as its
length), so an event is added once, to one accumulator, whatever the number of windows
it belongs to. A window ``[s, s + interval)`` is emitted when the close boundary passes
its end, by merging copies of its ``interval / hop`` panes (over every partition); a
pane is freed (and its events counted ``emitted`` in the ledger, once) with the last
window that covers it.

An event is late (dead-lettered) once the first window covering its pane was emitted
(the pane's end is at or before the emitted boundary: the tumbling rule with the hop),
and counted late for each window covering it (``late_windows``): a pane takes no event
after one of its windows went out, so every window holds exactly the events that were
on time for all of it, however batches are cut (a replay gives the same windows). Such
a pane is held packed until it is freed (:mod:`service.aggregation.panes`,
``PartitionState.packed``; ``windows`` holds the panes still open to events). With
AGGREGATION_ALLOWED_LATENESS above 0 such an event may instead be a correction
(:mod:`service.aggregation.hop_corrections`). docs/hopping.md shows the rules at work.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

from service.aggregation.emission import Taken
from service.aggregation.functions import FUNCTIONS, Acc
from service.aggregation.kept import copy_acc
from service.aggregation.panes import PackedPanes
from service.aggregation.partition import PartitionState, WindowKey
from service.aggregation.percentiles import PERCENTILES

__all__ = ["covering", "first_window", "keep_pane", "take_panes"]

log = logging.getLogger(__name__)


def covering(pane: float, pane_s: float, interval: float) -> list[float]:
    """The starts of the windows that cover the pane starting at ``pane``, earliest
    first: ``interval / pane_s`` of them (one, ``pane`` itself, when tumbling)."""
    n = round(interval / pane_s)
    return [pane - (n - 1 - j) * pane_s for j in range(n)]


def first_window(pane: float, pane_s: float, interval: float) -> float:
    """The start of the earliest window covering ``pane`` (the first to be emitted)."""
    return pane - (round(interval / pane_s) - 1) * pane_s


def take_panes(
    parts: Iterable[PartitionState],
    boundary: float,
    pane_s: float,
    interval: float,
    idle_s: float,
    *,
    keep: bool = False,
) -> Taken:
    """Emit every window ending in (a partition's emitted boundary, ``boundary``] from
    copies of its panes, merged over partitions and panes, free the panes whose last
    window ends at or before ``boundary`` and pack the others it passed (panes.py).
    ``keep`` (AGGREGATION_ALLOWED_LATENESS above 0): a pane whose last window is out
    moves, packed, to the partition's ``kept_panes`` instead of being freed
    (:mod:`service.aggregation.hop_corrections`); it counts as emitted all the same.

    A partition that holds the watermark, or has a pane below ``boundary``, moves its
    emitted boundary to ``boundary``, so no window is emitted twice from its panes; a
    silent one without such a pane keeps its own (emission.take_through's rule).
    """
    taken = Taken()
    for p in parts:
        old = p.closed_until
        if old >= boundary:
            continue
        packed = p.packed
        live = [q for q in p.windows if q < boundary]
        if not live and not (packed is not None and packed.panes) and not p.holds(idle_s):
            continue
        p.closed_until = boundary
        if p.ahead_closed:
            p.ahead_closed = {s for s in p.ahead_closed if s + interval > boundary}
        if packed is None:
            packed = p.packed = PackedPanes()
        # earliest first: a merge treats ``into`` as the earlier events
        for q in sorted([*live, *packed.panes]):
            is_live = q in p.windows
            for s in covering(q, pane_s, interval):
                if old < s + interval <= boundary:
                    if is_live:
                        _merge(taken, p, s, p.windows[q].items(), copy=True)
                    else:
                        _merge(taken, p, s, packed.entries(q), copy=False)
            if q + interval <= boundary:  # its last window is out: free it
                if is_live:
                    keyed = p.windows.pop(q)
                    keys, events = len(keyed), sum(acc[0] for acc in keyed.values())
                    if keep:
                        packed.pack(q, keyed)
                        keep_pane(p, packed, q)
                elif keep:
                    keys, events = keep_pane(p, packed, q)
                else:
                    keys, events = packed.free(q)
                if p.series is not None:
                    p.series.forget(q)
                taken.keys += keys
                p.on_emitted_events(events)
            elif is_live:  # no event can reach it any more: packed until then
                packed.pack(q, p.windows.pop(q))
    return taken


def keep_pane(p: PartitionState, packed: PackedPanes, q: float) -> tuple[int, int]:
    """Move packed pane ``q`` to the partition's kept panes (the same key table, so the
    pane moves as it is); returns (keys, events) it holds."""
    kept = p.kept_panes
    if kept is None:
        kept = p.kept_panes = PackedPanes(packed.table)
    pane = kept.panes[q] = packed.panes.pop(q)
    return len(pane.slots), pane.events


def _merge(
    taken: Taken,
    p: PartitionState,
    start: float,
    entries: Iterable[tuple[WindowKey, Acc]],
    *,
    copy: bool,
) -> None:
    """Merge a pane's accumulators into the window starting at ``start``; ``copy``:
    they are the pane's own (it serves later windows too), else new lists to keep."""
    into = taken.ready.get(start)
    if into is None:
        into = taken.ready[start] = {}
        taken.owner[start] = p
    for key, acc in entries:
        mine = into.get(key)
        if mine is None:
            # flat but for a percentile's store: a list or a sketch
            into[key] = (copy_acc(acc) if key[1] in PERCENTILES else acc[:]) if copy else acc
            continue
        try:
            FUNCTIONS[key[1]].merge(mine, acc)
        except OverflowError:  # never in the ledger: the pane's events stay
            log.error(  # counted once, with the pane (hopping.md)
                "window %s of %r/%r: merging a pane of %d event(s) would make "
                "the sum non-finite; the window keeps the value it had",
                start,
                key[0],
                key[1],
                acc[0],
            )
