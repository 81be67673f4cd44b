"""A batch applied with its accepted events captured for the archive (ARCHIVE_URL).

Only with an archive configured: the aggregator then applies each batch through the
reference step (:meth:`BatchRun.place`, which the hot loop must equal:
``tests/unit/test_window_paths.py``) and keeps each event that step accepted. The hot
loop stays as it is, and without an archive nothing here runs (a check per batch).
A late event within the allowed lateness is accepted when its correction is applied:
:class:`Refusals` tells which corrections were refused instead.
"""

from __future__ import annotations

from typing import Any

from service.aggregation.batch_run import BatchRun, Correction
from service.aggregation.dead_letters import DeadLetters, RawOf
from service.aggregation.decode import WireEvent
from service.aggregation.series import SEP
from service.archive.rows import Rows
from service.bus.base import SourceBatch

__all__ = ["Refusals", "add_corrections", "run_archived"]


def _add(rows: Rows, ev: WireEvent, tagged: bool) -> None:
    name, tags = ev.name, None
    if tagged:  # the series key: name, separator, the group-by tags' JSON text
        name, sep, text = name.partition(SEP)
        tags = text if sep else "{}"
    rows.add(name, ev.agg_func, ev.value, ev.timestamp, tags)  # type: ignore[arg-type]  # floats by now


def run_archived(run: BatchRun, rows: Rows) -> None:
    """``run.run()``, adding every accepted event of the batch to ``rows``."""
    tagged = run.tags is not None
    part_max = run.part_max
    for idx, record in enumerate(run.batch.records):
        evs, raws = run.decode(idx, record)
        for ev in evs:
            accepted = run.accepted
            part_max = run.place(idx, record, evs, raws, ev, part_max)[0]
            if run.accepted != accepted:
                _add(rows, ev, tagged)
    run.part_max = part_max


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
            _add(rows, c.event, tagged)
