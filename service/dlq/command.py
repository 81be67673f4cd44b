"""``dlq replay``: dead letters of one reason through validation again; the accepted
events counted once, in their closed windows, through the archive and ``replay``.

The order of the steps is what makes a ``kill -9`` anywhere safe (docs/dlq.md):

1. finish the runs a previous invocation left unfinished (steps 4 and 5 of each);
2. select the unmarked dead letters of the reason, and revalidate each
   (:mod:`.revalidate`); one whose events' windows the service may still emit or
   correct is deferred: left unmarked, for a later run;
3. mark the others durably, each at once with its ledger counts and its accepted
   events (PostgreSQL: one transaction and a run row; Kafka: one marker record each);
4. write each marked dead letter's events to the archive under a name of its own
   (partition ``dlq:redrive``, positions from its row id or topic offset): writing it
   again after a crash writes the same file;
5. ``replay`` the span and names touched (it writes the windows that differ, with the
   next revision; idempotent), then mark the run finished.
"""

from __future__ import annotations

import contextlib
import glob
import logging
import math
import sys
from collections import Counter
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, TextIO

import asyncpg

from service.aggregation.batch_run import Limits
from service.aggregation.series import TagRule
from service.aggregation.windows import window_start
from service.archive.layout import data_name
from service.archive.parquet import by_hour
from service.archive.rows import Rows
from service.archive.stores import ArchiveStore, build_store
from service.config import Config
from service.core.clock import Clock, SystemClock
from service.core.errors import ServiceError
from service.dlq import postgres as pg
from service.dlq.base import DeadLetterSource, Marked, PendingRun, Redriven
from service.dlq.revalidate import Event, Outcome, revalidate
from service.replay.command import replay
from service.replay.recompute import levels_of
from service.replay.span import ReplaySpan
from service.routes.matching import Router
from service.wiring import checkpoint_namespace

__all__ = ["ARCHIVE_PARTITION", "DlqSummary", "Step", "dlq_replay", "usable"]

log = logging.getLogger(__name__)

# no source partition is named so: Kafka's end in a number, other sources' are prefixed
ARCHIVE_PARTITION = "dlq:redrive"
Step = Callable[[str], None]  # called after "marked" and "archived": tests crash there


class DlqBusy(ServiceError):
    """Another ``dlq replay`` holds the dead-letter table."""


@dataclass(slots=True)
class DlqSummary:
    selected: int = 0
    accepted: int = 0  # dead letters all of whose elements were accepted
    events: int = 0  # events accepted (counted in their windows)
    failed: Counter[str] = field(default_factory=Counter)  # elements per reason
    deferred: int = 0
    rerun_after: float = -math.inf
    skipped: int = 0  # replayed by an earlier run
    resumed: int = 0  # unfinished runs of an earlier invocation finished
    pending: int = 0  # runs left unfinished (windows not final yet for the replay)
    windows: int = 0
    changed: int = 0
    new: int = 0
    written: Counter[str] = field(default_factory=Counter)

    def lines(self) -> list[str]:
        out = [
            f"dlq replay: selected {self.selected}, accepted {self.accepted} "
            f"({self.events} event(s)), already replayed (skipped) {self.skipped}"
        ]
        for reason, n in sorted(self.failed.items()):
            out.append(f"failed again: {reason}: {n}")
        if self.deferred:
            at = datetime.fromtimestamp(self.rerun_after, UTC).isoformat()
            out.append(
                f"deferred (window still open): {self.deferred}: rerun after {at} "
                "(a window's end plus AGGREGATION_ALLOWED_LATENESS, in event time)"
            )
        if self.resumed:
            out.append(f"unfinished runs of an earlier invocation finished: {self.resumed}")
        if self.pending:
            out.append(f"runs left to finish (windows not final yet): {self.pending}: rerun")
        out.append(f"windows recomputed {self.windows}: changed {self.changed}, new {self.new}")
        if self.written:
            out += [f"written to {d}: {n}" for d, n in sorted(self.written.items())]
        else:
            out.append("written: nothing")
        return out


def usable(config: Config) -> list[str]:
    """Why this configuration cannot redrive (empty: it can)."""
    problems: list[str] = []
    if not config.archive.enabled:
        problems.append(
            "ARCHIVE_URL is not set: dlq replay adds the accepted events to the archive "
            "and recomputes their windows from it, where the windows' other events are "
            "(docs/dlq.md)"
        )
    return problems


async def dlq_replay(
    config: Config,
    reason: str,
    since: float | None,
    *,
    clock: Clock | None = None,
    err: TextIO | None = None,
    step: Step | None = None,
) -> DlqSummary:
    clock = clock or SystemClock()
    summary = DlqSummary()
    store = build_store(config.archive)
    try:
        async with _source(config, clock) as source:
            run = _Run(config, clock, err or sys.stderr, step or _nothing, store, source, summary)
            for pending in await source.pending():
                summary.resumed += 1
                await run.finish(pending)
            await run.redrive(reason, since)
    finally:
        await store.close()
    return summary


@contextlib.asynccontextmanager
async def _source(config: Config, clock: Clock) -> AsyncIterator[DeadLetterSource]:
    """The dead letters of PostgreSQL when it is an output, else of the Kafka topic."""
    if "postgres" not in config.outputs:
        from service.dlq.kafka import KafkaDeadLetters

        async with KafkaDeadLetters(config, clock) as kafka:
            yield kafka
        return
    table = config.postgres.dead_letter_table
    conn: Any = await asyncpg.connect(config.postgres.dsn.value)
    try:
        await pg.prepare(conn, table)
        if not await pg.lock(conn, table):
            raise DlqBusy(f"another dlq replay is running on {table}; run this one after it")
        interval = window_start(clock.now(), config.aggregation.interval_s)
        yield pg.PostgresDeadLetters(
            conn, table, checkpoint_namespace(config), interval, _tables(config)
        )
    finally:
        await conn.close()


def _tables(config: Config) -> tuple[str, ...]:
    """The PostgreSQL outputs' aggregates tables (the routes' own too)."""
    if not config.routes:
        return (config.postgres.table,)
    router = Router(
        config.routes,
        outputs=config.outputs,
        kafka_topic=config.kafka.topic,
        postgres_table=config.postgres.table,
    )
    return router.destinations("postgres")


def _counts(got: Outcome) -> dict[str, int]:
    """A dead letter's ledger counts (docs/dlq.md, "The ledger")."""
    n = len(got.accepted)
    counts = {"redriven": n + sum(got.failed.values()), "redriven:accepted": n}
    counts.update({f"redriven:rejected:{why}": k for why, k in got.failed.items()})
    return {c: k for c, k in counts.items() if k}


def _nothing(_: str) -> None:
    return None


class _Run:
    def __init__(
        self,
        config: Config,
        clock: Clock,
        err: TextIO,
        step: Step,
        store: ArchiveStore,
        source: DeadLetterSource,
        summary: DlqSummary,
    ) -> None:
        self.config, self.clock, self.err, self.step = config, clock, err, step
        self.store, self.source, self.summary = store, source, summary

    async def redrive(self, reason: str, since: float | None) -> None:
        agg, s = self.config.aggregation, self.summary
        rows, s.skipped = await self.source.select(reason, since)
        s.selected = len(rows)
        if not rows:
            return
        limits, tags = self._limits()
        outcomes: list[Marked] = []
        accepted: list[Redriven] = []
        checked = [
            (row, revalidate(row.raw, row.reason, row.detail, limits, tags, self.clock))
            for row in rows
        ]
        times = [ev[3] for _, got in checked for ev in got.accepted]
        final_until = -math.inf
        if times:
            through = await self.source.through(min(times) - agg.max_future_s)
            final_until = min(self.clock.now(), through) - agg.allowed_lateness_s
        for row, got in checked:
            if got.accepted:
                end = max(self._last_end(ev[3]) for ev in got.accepted)
                if end > final_until:
                    s.deferred += 1
                    s.rerun_after = max(s.rerun_after, end + agg.allowed_lateness_s)
                    continue
                accepted.append((row.start, row.end, got.accepted))
            outcomes.append((row, got.label, _counts(got)))
            s.events += len(got.accepted)
            s.accepted += not got.failed
            s.failed.update(got.failed)
        if not outcomes:
            return
        run = await self.source.mark(outcomes, accepted)
        self.step("marked")
        if run is not None:
            await self.finish(run)

    async def finish(self, run: PendingRun) -> None:
        """Steps 4 and 5 for one run; both may be repeated (a crash, a rerun)."""
        for start, end, events in run.events:
            await self._archive(start, end, events)
        self.step("archived")
        by_name: dict[str, list[float]] = {}
        for _, _, events in run.events:
            for ev in events:
                by_name.setdefault(ev[0], []).append(ev[3])
        longest = max(level.length for level in levels_of(self.config.aggregation))
        complete = True
        for name, times in sorted(by_name.items()):
            # every window of every level holding one of these events starts in it
            first = window_start(min(times), longest) - longest
            span = ReplaySpan(first, math.floor(max(times)) + 1.0, glob.escape(name))
            got = await replay(self.config, span, clock=self.clock, err=self.err, tty=False)
            s = self.summary
            s.windows += got.windows
            s.changed += got.changed
            s.new += got.new
            s.written.update(got.written)
            complete = complete and got.skipped_open == 0
        if complete:
            await self.source.finished(run)
        else:  # the service may still write one of them: a rerun recomputes it
            self.summary.pending += 1

    async def _archive(self, start: str, end: str, events: Sequence[Event]) -> None:
        rows = Rows()
        for ev in events:
            rows.add(*ev)
        for hour, data in by_hour(rows, ARCHIVE_PARTITION).items():
            await self.store.put(data_name(hour, ARCHIVE_PARTITION, start, end), data)

    def _limits(self) -> tuple[Limits, TagRule | None]:
        agg, bus, now = self.config.aggregation, self.config.bus, self.clock.now()
        limits = Limits(
            interval=agg.pane_s,
            grace=agg.grace_s,
            budget=agg.max_open_windows,
            max_ts=now + agg.max_future_s,
            lead_cap=now + agg.max_watermark_lead_s,
            max_bytes=bus.max_message_bytes,
            max_elements=bus.max_events_per_message,
            reach=agg.interval_s,
        )
        tags = TagRule(agg.group_by, agg.max_series_per_name) if agg.group_by else None
        return limits, tags

    def _last_end(self, ts: float) -> float:
        """The end of the last window of any level that holds an event at ``ts``."""
        return max(
            window_start(ts, level.step) + level.length
            for level in levels_of(self.config.aggregation)
        )
