"""Corrections of hopping windows (``AGGREGATION_HOP`` with
``AGGREGATION_ALLOWED_LATENESS`` above 0, contract §12.4 and §12.7).

A late event for pane ``q`` (the boundary passed its end) is a correction while the
first window covering it is correctable (its partition's watermark at the event below
``q + hop + lateness``; every later window covering it is then correctable or open),
else it is dead-lettered and late for every window covering it: a pane never holds an
event that one of its windows lacks, so a window merged from panes is exact whichever
partition's correction emits it. The correction is late for the windows covering it
that were emitted and on time for those still open. To give the same revisions
whatever the batch cuts, each :class:`~service.aggregation.batch_run.Correction`
carries its partition's emitted boundary *at the event*, and the batch's corrections
are applied after its run but before its final close, in record order:

1. emit every window ending at or before the correction's boundary (they were out
   before the event, so their revision 1 lacks it, as with one record per batch);
2. add the event to its pane (unpacking a packed or kept one, packed again after);
3. once a record's corrections are in, emit again each window covering them that was
   emitted at the event, whole, from the panes of every partition of this instance,
   with the highest revision recorded for it plus one: one revision per record and key.

The windows still open at the event take it in their revision 1 at the final close.
A pane whose windows are all out is kept packed (``kept_panes``) until its partition's
watermark passes ``q + interval + lateness`` (its last window's correction time); the
revisions (``hop_revisions``) expire with their windows. Both travel in the checkpoint.

The ledger counts each applied event once: ``aggregated`` and ``late_applied``, and
``emitted`` now when its pane's windows are all out, else with its pane.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Final

from service.aggregation.batch_run import Correction
from service.aggregation.dead_letters import DeadLetters
from service.aggregation.emission import Taken, aggregates_of
from service.aggregation.functions import FUNCTIONS, Acc
from service.aggregation.hopping import covering
from service.aggregation.kept import copy_acc
from service.aggregation.panes import PackedPanes
from service.aggregation.partition import PartitionState, WindowKey
from service.aggregation.series import SEP, TagRule, is_overflow, name_of, overflow_of
from service.aggregation.windows import window_start
from service.bus.base import SourceBatch
from service.metrics.collector import MetricsCollector

if TYPE_CHECKING:
    from service.pipeline.flow import Outputs

__all__ = ["HopCorrector", "drop_hop_kept", "expire_hop_kept"]

log = logging.getLogger(__name__)

_NEW: Final[dict[str, Callable[[float, float], Acc]]] = {k: f.new for k, f in FUNCTIONS.items()}
_ADD: Final[dict[str, Callable[[Acc, float, float], None]]] = {
    k: f.add for k, f in FUNCTIONS.items()
}


class HopCorrector:
    """Applies one batch's corrections of hopping windows (see the module docstring);
    ``emit_through``: the aggregator's emission of every window ending at or before a
    boundary; ``opened``: pane keys it added to open panes (the open-window count)."""

    def __init__(
        self,
        part: PartitionState,
        parts: Iterable[PartitionState],
        *,
        pane: float,
        interval: float,
        lateness: float,
        now: float,
        metrics: MetricsCollector,
        tags: TagRule | None,
        emit_through: Callable[[float, Outputs], None],
    ) -> None:
        self.part, self.everyone = part, list(parts)
        self.pane, self.interval, self.lateness = pane, interval, lateness
        self.now, self.metrics, self.tags, self.tagged = now, metrics, tags, tags is not None
        self.overflowed = 0  # corrections put into a name's overflow series
        self.emit_through = emit_through
        self.opened = 0
        # packed panes unpacked by this batch (kept up to date by its corrections): a
        # pane of a thousand keys is unpacked once, not once per late record
        self._unpacked: dict[tuple[int, float], dict[WindowKey, Acc]] = {}

    def apply(
        self,
        batch: SourceBatch,
        corrections: Sequence[Correction],
        out: Outputs,
        dead: DeadLetters,
    ) -> None:
        part = self.part
        rejects: dict[str, int] = {}
        applied: dict[tuple[str, str, float], int] = {}
        accepted = done = 0
        i, n = 0, len(corrections)
        while i < n:
            idx = corrections[i].idx
            # emitted windows reached, in first-touch order: events this record added
            touched: dict[tuple[float, WindowKey], int] = {}
            while i < n and corrections[i].idx == idx:
                c = corrections[i]
                i += 1
                self.emit_through(c.boundary, out)
                key, added = self._add(c)
                if added is None:
                    exc = f"adding {c.event.value!r} would make the sum non-finite"
                    dead.reject(out, rejects, batch, c.idx, c.raw, "overflow", exc, self.now)
                    continue
                accepted += 1
                done += added
                self.overflowed += key is not c.key
                name = name_of(key[0])
                for s in covering(c.start, self.pane, self.interval):
                    if s + self.interval <= c.boundary:  # emitted before the event
                        touched[(s, key)] = touched.get((s, key), 0) + 1
                        late_key = (name, key[1], s)
                        applied[late_key] = applied.get(late_key, 0) + 1
            if touched:
                self._emit(touched, out)
        dead.finish(out)
        received_in = window_start(batch.received_at, self.interval)
        part.count(received_in, 0, accepted, rejects)
        if accepted:
            part.on_corrected(received_in, applied, events=accepted, emitted=done)
        metrics = self.metrics
        metrics.on_events_aggregated(accepted)
        metrics.on_events_late_applied(accepted)
        for reason, count in rejects.items():
            metrics.on_events_rejected(reason, count)
        if self.overflowed:
            part.on_series_overflow(self.overflowed)
            metrics.on_series_overflow(self.overflowed)

    def _add(self, c: Correction) -> tuple[WindowKey, int | None]:
        """Add the event to its pane in this partition; returns the key it went to and
        1 when the pane's windows are all out (kept: the event counts as emitted now),
        0 when it is still open (counted with it), None when refused (a non-finite sum)."""
        p, q = self.part, c.start
        ev = c.event
        ts: float = ev.timestamp  # type: ignore[assignment]  # a float by now
        live = p.windows.get(q)
        if live is not None:  # restored and not packed yet: an open pane
            key = self._budgeted(live, c.key)
            return key, None if not self._add_to(live, key, ev.value, ts, open_pane=True) else 0
        if p.packed is None:
            p.packed = PackedPanes()
        if p.kept_panes is None:
            p.kept_panes = PackedPanes(p.packed.table)
        if q in p.packed.panes:
            store, is_open = p.packed, True
        elif q in p.kept_panes.panes:
            store, is_open = p.kept_panes, False
        else:  # none of its events came through this partition
            is_open = q + self.interval > c.boundary
            store = p.packed if is_open else p.kept_panes
        # a new dict, and a new list for the key: the unpacked copy stays as it was
        keyed = dict(_pane(p, q, self._unpacked))
        key = self._budgeted(keyed, c.key)
        if key in keyed:
            keyed[key] = copy_acc(keyed[key])
        if not self._add_to(keyed, key, ev.value, ts, open_pane=is_open):
            return key, None
        if q in store.panes:
            store.free(q)
        store.pack(q, keyed)
        self._unpacked[(id(p), q)] = keyed
        return key, 0 if is_open else 1

    def _budgeted(self, keyed: dict[WindowKey, Acc], key: WindowKey) -> WindowKey:
        """The key a correction goes to: a tag set new to its pane counts against
        AGGREGATION_MAX_SERIES_PER_NAME as in an open pane (corrections.py's rule, per
        pane as the series budget of hopping windows is), beyond it the name's overflow
        series."""
        tags = self.tags
        series, func = key
        if tags is None or SEP not in series or key in keyed:
            return key
        name = name_of(series)
        known = {s for s, _ in keyed if SEP in s and name_of(s) == name and not is_overflow(s)}
        if series in known or len(known) < tags.max_series:
            return key
        return overflow_of(series, tags.group_by), func

    def _add_to(
        self,
        keyed: dict[WindowKey, Acc],
        key: WindowKey,
        value: float,
        ts: float,
        *,
        open_pane: bool,
    ) -> bool:
        acc = keyed.get(key)
        if acc is None:
            keyed[key] = _NEW[key[1]](value, ts)
            self.opened += open_pane
            return True
        try:
            _ADD[key[1]](acc, value, ts)
        except OverflowError:
            return False
        return True

    def _emit(self, touched: dict[tuple[float, WindowKey], int], out: Outputs) -> None:
        """Emit the touched windows again, whole: each key merged from the panes of every
        partition here, in the order a first emission merges them (partition by
        partition, earliest pane first), with the next revision: the highest recorded
        for it plus one; without one, 2 when the key had events at the window's first
        emission (more than this record added: any other correction of it after its
        emission recorded one), else 1."""
        taken = Taken()
        panes = self._unpacked
        for (start, key), added in touched.items():
            merged: Acc | None = None
            shares: list[PartitionState] = []
            for p in self.everyone:
                for j in range(round(self.interval / self.pane)):
                    acc = _pane(p, start + j * self.pane, panes).get(key)
                    if acc is None:
                        continue
                    if p not in shares:
                        shares.append(p)
                    if merged is None:
                        merged = copy_acc(acc)
                        continue
                    try:
                        FUNCTIONS[key[1]].merge(merged, acc)
                    except OverflowError:  # as the first emission left it out
                        log.error(
                            "correction of window %s of %r/%r: a pane would make the sum "
                            "non-finite; it is left out as when the window was emitted",
                            start,
                            key[0],
                            key[1],
                        )
            if merged is None:  # not expected: the event was just added to its pane
                continue
            first = 1 if merged[0] > added else 0
            revision = 1 + max(p.hop_revisions.get((start, key), first) for p in self.everyone)
            for p in {id(q): q for q in [self.part, *shares]}.values():
                p.hop_revisions[(start, key)] = revision
            taken.ready.setdefault(start, {})[key] = merged
            taken.owner.setdefault(start, self.part)
            taken.revisions.setdefault(start, {})[key] = revision
        emitted = aggregates_of(taken, self.interval, self.now, self.metrics, tagged=self.tagged)
        out.aggregates.extend(emitted)
        self.metrics.on_aggregates_emitted(emitted)


def _pane(
    p: PartitionState, q: float, cache: dict[tuple[int, float], dict[WindowKey, Acc]]
) -> dict[WindowKey, Acc]:
    """The accumulators of partition ``p``'s pane ``q``, wherever it is held (empty when
    it has none); packed ones unpacked into new lists, once (``cache``)."""
    live = p.windows.get(q)
    if live is not None:
        return live
    found = cache.get((id(p), q))
    if found is None:
        found = {}
        for store in (p.packed, p.kept_panes):
            if store is not None and q in store.panes:
                found = dict(store.entries(q))
                break
        cache[(id(p), q)] = found
    return found


def expire_hop_kept(p: PartitionState, watermark: float, interval: float, lateness: float) -> None:
    """Free the kept panes and revisions whose windows' correction time has passed at
    the partition's ``watermark``: a pane with its last window (the one starting at it)."""
    kept = p.kept_panes
    if kept is not None and kept.panes:
        for q in [q for q in kept.panes if watermark >= q + interval + lateness]:
            kept.free(q)
    if p.hop_revisions:
        gone = [k for k in p.hop_revisions if watermark >= k[0] + interval + lateness]
        for k in gone:
            del p.hop_revisions[k]


def drop_hop_kept(p: PartitionState) -> None:
    """Free every kept pane and revision (restored with the lateness now 0)."""
    expire_hop_kept(p, math.inf, 0.0, 0.0)
