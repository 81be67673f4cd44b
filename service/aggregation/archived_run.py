"""A batch applied with its accepted events captured for the archive (ARCHIVE_URL).

Only with an archive configured (one check per batch): the aggregator then runs a
:class:`CapturingRun`, the hot loop itself, which only notes, per record, what it
refused — every dead letter marks its record, and a refused valid event (late, over the
cardinality budget, overflowing) is noted by content — and which events it left for
the corrections. :func:`capture` then reads the batch's accepted events back:

* a record nothing was refused from, decoded again by the fast decoder: every event in
  it was accepted;
* any other record, by the reference decoder's rules (:func:`valid_events`, the same
  as ``BatchRun.decode`` without its side effects), less the events noted for it.
  Events with equal content are interchangeable rows, so a multiset of contents says
  which to leave out.

A late event within the allowed lateness is accepted once its correction is applied:
:class:`Refusals` tells which corrections were refused instead (:func:`add_corrections`).
"""

from __future__ import annotations

from collections import Counter
from typing import Any, cast

from service.aggregation.batch_run import BatchRun, Correction, Limits
from service.aggregation.dead_letters import DeadLetters, RawOf
from service.aggregation.decode import (
    CANONICAL_FUNCS,
    Rejected,
    WireEvent,
    decode_fast,
    loads_message,
    parse_event,
)
from service.aggregation.series import SEP, TagRule, series_key, unmarked
from service.archive.rows import Rows
from service.bus.base import SourceBatch

__all__ = ["CapturingRun", "Refusals", "add_corrections", "capture", "valid_events"]

Content = tuple[str, str, float, float]  # (name or series key, canonical func, value, ts)


def _content(ev: WireEvent) -> Content:
    """As :func:`valid_events` gives it: without a source rule's mark."""
    return (unmarked(ev.name), CANONICAL_FUNCS[ev.agg_func], ev.value, ev.timestamp)  # type: ignore[return-value]  # floats by now


class CapturingRun(BatchRun):
    """The batch run, noting what it refused (per record) for :func:`capture`."""

    marked: set[int]
    refused: dict[int, Counter[Content]]

    def run(self) -> None:
        self.marked, self.refused = set(), {}
        super().run()

    def _note(self, idx: int, ev: WireEvent) -> None:
        self.refused.setdefault(idx, Counter())[_content(ev)] += 1

    def _reject(self, idx: int, raw: Any, reason: str, detail: str, n: int = 1) -> None:
        self.marked.add(idx)
        if type(raw) is RawOf:  # a valid event refused (late, over the budget)
            self._note(idx, raw.args[0])
        super()._reject(idx, raw, reason, detail, n)

    def overflow(
        self,
        idx: int,
        record: Any,
        evs: Any,
        raws: list[Any] | None,
        ev: WireEvent,
        exc: OverflowError,
    ) -> None:
        self._note(idx, ev)
        super().overflow(idx, record, evs, raws, ev, exc)


def valid_events(record: Any, lim: Limits, tags: TagRule | None) -> list[Content]:
    """The events ``BatchRun.decode`` finds valid in ``record``, without its side
    effects; names are series keys when ``tags`` is set."""
    if type(record) is bytes:
        if len(record) > lim.max_bytes:
            return []
        try:
            decoded = loads_message(record)
        except Rejected:
            return []
    else:
        decoded = record
    items = decoded if type(decoded) is list else [decoded]
    out = []
    for item in items[: lim.max_elements]:
        try:
            name, func, value, ts = parse_event(item, lim.max_ts)
            if tags is not None:
                name = series_key(name, item.get("tags"), tags.group_by)
        except Rejected:
            continue
        out.append((name, func, value, ts))
    return out


def _add(rows: Rows, name: str, func: str, value: float, ts: float, tagged: bool) -> None:
    tags = None
    name = unmarked(name)  # the archive keeps the partition, which gives the mark
    if tagged:  # the series key: name, separator, the group-by tags' JSON text
        name, sep, text = name.partition(SEP)
        tags = text if sep else "{}"
    rows.add(name, func, value, ts, tags)


def capture(run: CapturingRun, rows: Rows) -> None:
    """Add the accepted events of the batch ``run`` applied to ``rows``."""
    marked, refused = run.marked, run.refused
    for c in run.corrections:  # accepted, if at all, when applied (add_corrections)
        marked.add(c.idx)
        run._note(c.idx, c.event)
    tags, lim = run.tags, run.limits
    tagged = tags is not None
    canon, decode, wire = CANONICAL_FUNCS, decode_fast, WireEvent
    names, funcs, values = rows.names.append, rows.funcs.append, rows.values.append
    times, no_tags = rows.times.append, rows.tags.append
    for idx, record in enumerate(run.batch.records):
        if idx not in marked and not tagged and type(record) is bytes:
            # nothing refused: the run accepted every event of it, so what the fast
            # decoder reads with a float time is exactly what the run applied
            try:
                d = decode(record)
            except Exception:
                d = None
            evs = (d,) if type(d) is wire else cast(list[WireEvent] | None, d)
            if evs is not None and all(type(e.timestamp) is float for e in evs):
                for e in evs:
                    names(e.name)
                    funcs(canon[e.agg_func])
                    values(e.value)
                    times(e.timestamp)  # type: ignore[arg-type]  # a float: checked
                    no_tags(None)
                continue
        skip = refused.get(idx)
        for content in valid_events(record, lim, tags):
            if skip and skip[content] > 0:
                skip[content] -= 1
                continue
            _add(rows, *content, tagged)


class Refusals(DeadLetters):
    """The aggregator's dead letters, noting which events the corrections refused."""

    def __init__(self, dead: DeadLetters) -> None:  # delegates: no state of its own
        self._dead = dead
        self.refused: set[int] = set()

    def reject(
        self,
        out: Any,
        counts: dict[str, int],
        batch: SourceBatch,
        idx: int,
        raw: Any,
        reason: str,
        detail: str,
        now: float,
        n: int = 1,
    ) -> None:
        if type(raw) is RawOf:  # a correction's raw: RawOf(event, ...)
            self.refused.add(id(raw.args[0]))
        self._dead.reject(out, counts, batch, idx, raw, reason, detail, now, n)

    def finish(self, out: Any) -> None:
        self._dead.finish(out)

    def forget(self) -> None:
        self._dead.forget()

    def flush(self, out: Any) -> None:
        self._dead.flush(out)


def add_corrections(
    rows: Rows, corrections: list[Correction], refusals: Refusals, tagged: bool
) -> None:
    """The corrections that were applied (not refused) are accepted events."""
    for c in corrections:
        if id(c.event) not in refusals.refused:
            ev = c.event
            _add(rows, ev.name, CANONICAL_FUNCS[ev.agg_func], ev.value, ev.timestamp, tagged)  # type: ignore[arg-type]  # a float by now
