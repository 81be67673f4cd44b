"""Corrections (contract §12.4): late events applied to kept windows, re-emitted with a
higher revision.

A batch run finds the late events that are still correctable
(:class:`~service.aggregation.batch_run.Correction`); once the batch's windows have
closed they are applied here in record order. The late events of one record for one
key give one new revision: the key's kept shares on this instance (this partition's,
merged with the other partitions' as emission merges them) are emitted again, whole,
with the highest revision among them plus one, through the same ``Outputs`` as any
emission. Records are never coalesced, so a replay that batches the records
differently emits the same revisions with the same values.

The ledger counts each applied event once: ``late_applied`` and ``emitted`` (the
events of the window emitted before are not counted again).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Final

from service.aggregation.batch_run import Correction
from service.aggregation.dead_letters import DeadLetters
from service.aggregation.emission import Taken, aggregates_of
from service.aggregation.functions import FUNCTIONS, Acc
from service.aggregation.kept import Kept, copy_acc
from service.aggregation.partition import PartitionState, WindowKey
from service.aggregation.rollups import Touched, add_late, corrected
from service.aggregation.series import SEP, TagRule, is_overflow, name_of, overflow_of
from service.aggregation.windows import window_start
from service.bus.base import SourceBatch
from service.metrics.collector import MetricsCollector

if TYPE_CHECKING:
    from service.pipeline.flow import Outputs

__all__ = ["apply_corrections"]

log = logging.getLogger(__name__)

_NEW: Final[dict[str, Callable[[float, float], Acc]]] = {k: f.new for k, f in FUNCTIONS.items()}
_ADD: Final[dict[str, Callable[[Acc, float, float], None]]] = {
    k: f.add for k, f in FUNCTIONS.items()
}


def apply_corrections(
    part: PartitionState,
    parts: Iterable[PartitionState],
    batch: SourceBatch,
    corrections: Sequence[Correction],
    out: Outputs,
    dead: DeadLetters,
    *,
    interval: float,
    now: float,
    metrics: MetricsCollector,
    tags: TagRule | None = None,
    rollups: Sequence[float] = (),
) -> None:
    """Apply ``corrections`` (of ``batch``, on ``part``) and emit one revision per
    record and key; ``parts``: every partition of this instance, ``part`` among them.
    ``rollups``: an applied event also corrects the emitted rollup windows above its
    window, up to the first one still open (:func:`~service.aggregation.rollups.add_late`)."""
    everyone = list(parts)
    others = [q for q in everyone if q is not part]
    rejects: dict[str, int] = {}
    applied: dict[tuple[str, str, float], int] = {}
    overflowed = 0
    i, n = 0, len(corrections)
    while i < n:
        idx = corrections[i].idx
        touched: dict[tuple[float, WindowKey], None] = {}  # in first-touch order
        rolled: Touched = {}
        while i < n and corrections[i].idx == idx:
            c = corrections[i]
            i += 1
            key = _budgeted(part, c, tags)
            if _apply(part, others, c, key, batch, out, dead, rejects, now):
                touched[(c.start, key)] = None
                if rollups:
                    ts: float = c.event.timestamp  # type: ignore[assignment]  # a float now
                    add_late(part, everyone, rollups, c.start, key, c.event.value, ts, rolled)
                overflowed += key is not c.key
                late_key = (name_of(key[0]), key[1], c.start)  # per name, as late
                applied[late_key] = applied.get(late_key, 0) + 1
        if touched:
            _emit(part, everyone, touched, out, interval, now, metrics, tagged=tags is not None)
        for length, taken in corrected(part, everyone, rolled) if rolled else ():
            emitted = aggregates_of(taken, length, now, metrics, tagged=tags is not None)
            out.aggregates.extend(emitted)
            metrics.on_aggregates_emitted(emitted)
    dead.finish(out)
    accepted = sum(applied.values())
    received_in = window_start(batch.received_at, interval)
    part.count(received_in, 0, accepted, rejects)
    if applied:
        part.on_corrected(received_in, applied)
    metrics.on_events_aggregated(accepted)
    metrics.on_events_late_applied(accepted)
    if overflowed:
        part.on_series_overflow(overflowed)
        metrics.on_series_overflow(overflowed)
    for reason, count in rejects.items():
        metrics.on_events_rejected(reason, count)


def _apply(
    part: PartitionState,
    others: Sequence[PartitionState],
    c: Correction,
    key: WindowKey,
    batch: SourceBatch,
    out: Outputs,
    dead: DeadLetters,
    rejects: dict[str, int],
    now: float,
) -> bool:
    """Add one late event to this partition's kept share of ``key``; False when it was
    refused."""
    func = key[1]
    ev = c.event
    ts: float = ev.timestamp  # type: ignore[assignment]  # a float by now
    shares = part.kept.setdefault(c.start, {})
    share = shares.get(key)
    if share is None:  # a key this partition's share never had: its revision follows
        revision = max((k.revision for k in _shares(others, c.start, key)), default=0)
        shares[key] = Kept(_NEW[func](ev.value, ts), revision)
        return True
    try:
        _ADD[func](share.acc, ev.value, ts)
    except OverflowError as exc:
        dead.reject(out, rejects, batch, c.idx, c.raw, "overflow", str(exc), now)
        return False
    return True


def _budgeted(part: PartitionState, c: Correction, tags: TagRule | None) -> WindowKey:
    """The key a correction goes to: a tag set new to its kept window counts against
    AGGREGATION_MAX_SERIES_PER_NAME like one new to an open window, and beyond it the
    event joins the name's overflow series (a late event cannot grow a window past the
    budget its first emission kept to)."""
    series, func = c.key
    kept = part.kept.get(c.start)
    if tags is None or SEP not in series or kept is None or c.key in kept:
        return c.key
    name = name_of(series)
    known = {s for s, _ in kept if SEP in s and name_of(s) == name and not is_overflow(s)}
    if series in known or len(known) < tags.max_series:
        return c.key
    return overflow_of(series, tags.group_by), func


def _shares(parts: Iterable[PartitionState], start: float, key: WindowKey) -> list[Kept]:
    found = []
    for q in parts:
        keyed = q.kept.get(start)
        if keyed is not None and (k := keyed.get(key)) is not None:
            found.append(k)
    return found


def _emit(
    part: PartitionState,
    everyone: Sequence[PartitionState],
    touched: Iterable[tuple[float, WindowKey]],
    out: Outputs,
    interval: float,
    now: float,
    metrics: MetricsCollector,
    *,
    tagged: bool,
) -> None:
    """Emit the touched keys whole: the shares of this instance's partitions merged in
    their order, as emission merges them (into a copy: the shares stay as they are),
    with the next revision, set on every share."""
    taken = Taken()
    for start, key in touched:
        shares = _shares(everyone, start, key)
        merged = shares[0].acc if len(shares) == 1 else copy_acc(shares[0].acc)
        for other in shares[1:]:
            try:
                FUNCTIONS[key[1]].merge(merged, other.acc)
            except OverflowError:  # emission left this share out too (rejected then)
                log.error(
                    "correction of window %s of %r/%r: a share of another partition would "
                    "make the sum non-finite; it is left out as when the window was emitted",
                    start,
                    key[0],
                    key[1],
                )
        revision = max(k.revision for k in shares) + 1
        for k in shares:
            k.revision = revision
        taken.ready.setdefault(start, {})[key] = merged
        taken.owner.setdefault(start, part)
        taken.revisions.setdefault(start, {})[key] = revision
    emitted = aggregates_of(taken, interval, now, metrics, tagged=tagged)
    out.aggregates.extend(emitted)
    metrics.on_aggregates_emitted(emitted)
