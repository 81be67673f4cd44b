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
) -> None:
    """Apply ``corrections`` (of ``batch``, on ``part``) and emit one revision per
    record and key; ``parts``: every partition of this instance, ``part`` among them."""
    everyone = list(parts)
    others = [q for q in everyone if q is not part]
    rejects: dict[str, int] = {}
    applied: dict[tuple[str, str, float], int] = {}
    i, n = 0, len(corrections)
    while i < n:
        idx = corrections[i].idx
        touched: dict[tuple[float, WindowKey], None] = {}  # in first-touch order
        while i < n and corrections[i].idx == idx:
            c = corrections[i]
            i += 1
            if _apply(part, others, c, batch, out, dead, rejects, now):
                touched[(c.start, c.key)] = None
                late_key = (c.key[0], c.key[1], c.start)
                applied[late_key] = applied.get(late_key, 0) + 1
        if touched:
            _emit(part, everyone, touched, out, interval, now, metrics)
    dead.finish(out)
    accepted = sum(applied.values())
    received_in = window_start(batch.received_at, interval)
    part.count(received_in, 0, accepted, rejects)
    if applied:
        part.on_corrected(received_in, applied)
    metrics.on_events_aggregated(accepted)
    metrics.on_events_late_applied(accepted)
    for reason, count in rejects.items():
        metrics.on_events_rejected(reason, count)


def _apply(
    part: PartitionState,
    others: Sequence[PartitionState],
    c: Correction,
    batch: SourceBatch,
    out: Outputs,
    dead: DeadLetters,
    rejects: dict[str, int],
    now: float,
) -> bool:
    """Add one late event to this partition's kept share; False when it was refused."""
    func = c.key[1]
    ev = c.event
    ts: float = ev.timestamp  # type: ignore[assignment]  # a float by now
    shares = part.kept.setdefault(c.start, {})
    share = shares.get(c.key)
    if share is None:  # a key this partition's share never had: its revision follows
        revision = max((k.revision for k in _shares(others, c.start, c.key)), default=0)
        shares[c.key] = Kept(_NEW[func](ev.value, ts), revision)
        return True
    try:
        _ADD[func](share.acc, ev.value, ts)
    except OverflowError as exc:
        dead.reject(out, rejects, batch, c.idx, c.raw, "overflow", str(exc), now)
        return False
    return True


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
    emitted = aggregates_of(taken, interval, now, metrics)
    out.aggregates.extend(emitted)
    metrics.on_aggregates_emitted(emitted)
