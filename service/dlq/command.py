"""``dlq replay``: dead letters of one reason through validation again; the accepted
events counted once, in their closed windows, through the archive and ``replay``.

The order of the steps is what makes a ``kill -9`` anywhere safe (docs/dlq.md):

1. finish the runs a previous invocation left unfinished (steps 4 and 5 of each);
2. select the unmarked dead letters of the reason, and revalidate each
   (:mod:`.revalidate`); one whose events' windows the service may still emit or
   correct is deferred: left unmarked, for a later run;
3. in one transaction: mark the others (``replayed_at``, ``replay_outcome``), add to
   the ledger, and record a run holding the accepted events;
4. write each marked dead letter's events to the archive under a name of its own
   (partition ``dlq:redrive``, positions ``<id>-<id+1>``): writing it again after a
   crash writes the same file;
5. ``replay`` the span and names touched (it writes the windows that differ, with the
   next revision; idempotent), then mark the run finished.
"""

from __future__ import annotations

import glob
import logging
import math
import sys
from collections import Counter
from collections.abc import Callable, Sequence
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
from service.dlq.revalidate import Event, revalidate
from service.postgres.schema import quote_identifier
from service.replay.command import replay
from service.replay.recompute import levels_of
from service.replay.span import ReplaySpan
from service.routes.matching import Router
from service.wiring import checkpoint_namespace

__all__ = ["ARCHIVE_PARTITION", "DlqSummary", "Step", "dlq_replay", "usable"]

log = logging.getLogger(__name__)

ARCHIVE_PARTITION = "dlq:redrive"  # no source partition is named so (Kafka's are numbers)
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
    problems = []
    if not config.archive.enabled:
        problems.append(
            "ARCHIVE_URL is not set: dlq replay adds the accepted events to the archive "
            "and recomputes their windows from it, where the windows' other events are "
            "(docs/dlq.md)"
        )
    if "postgres" not in config.outputs:
        problems.append(
            "STORAGE_TYPE has no postgres: dlq replay reads and marks the dead letters "
            "of PostgreSQL (the Kafka DLQ topic as a source is not supported yet)"
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
    err = err or sys.stderr
    summary = DlqSummary()
    table = config.postgres.dead_letter_table
    store = build_store(config.archive)
    conn: Any = await asyncpg.connect(config.postgres.dsn.value)
    try:
        await pg.prepare(conn, table)
        if not await pg.lock(conn, table):
            raise DlqBusy(f"another dlq replay is running on {table}; run this one after it")
        run = _Run(config, clock, err, step or _nothing, store, conn, summary)
        for pending in await pg.pending_runs(conn, table):
            summary.resumed += 1
            await run.finish(pending)
        await run.redrive(reason, since)
    finally:
        await conn.close()
        await store.close()
    return summary


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
        conn: Any,
        summary: DlqSummary,
    ) -> None:
        self.config, self.clock, self.err, self.step = config, clock, err, step
        self.store, self.conn, self.summary = store, conn, summary

    async def redrive(self, reason: str, since: float | None) -> None:
        cfg, agg, s = self.config, self.config.aggregation, self.summary
        table = cfg.postgres.dead_letter_table
        rows = await pg.select(self.conn, table, reason, since)
        s.selected = len(rows)
        s.skipped = await pg.count_replayed(self.conn, table, reason, since)
        if not rows:
            return
        limits, tags = self._limits()
        final_until = min(self.clock.now(), await self._through()) - agg.allowed_lateness_s
        outcomes: list[tuple[int, str]] = []
        ledger: Counter[str] = Counter()
        accepted: list[tuple[int, list[Event]]] = []
        for row in rows:
            got = revalidate(row.raw, row.reason, row.detail, limits, tags, self.clock)
            if got.accepted:
                end = max(self._last_end(ev[3]) for ev in got.accepted)
                if end > final_until:
                    s.deferred += 1
                    s.rerun_after = max(s.rerun_after, end + agg.allowed_lateness_s)
                    continue
                accepted.append((row.id, got.accepted))
            outcomes.append((row.id, got.label))
            s.events += len(got.accepted)
            s.accepted += not got.failed
            s.failed.update(got.failed)
            ledger["redriven"] += len(got.accepted) + sum(got.failed.values())
            ledger["redriven:accepted"] += len(got.accepted)
            for why, n in got.failed.items():
                ledger[f"redriven:rejected:{why}"] += n
        if not outcomes:
            return
        run_id = await pg.mark(
            self.conn,
            table,
            outcomes,
            +ledger,
            checkpoint_namespace(cfg),
            window_start(self.clock.now(), agg.interval_s),
            accepted,
        )
        self.step("marked")
        if run_id is not None:
            await self.finish(pg.PendingRun(run_id, accepted))

    async def finish(self, run: pg.PendingRun) -> None:
        """Steps 4 and 5 for one run; both may be repeated (a crash, a rerun)."""
        for dead_letter_id, events in run.events:
            await self._archive(dead_letter_id, events)
        self.step("archived")
        by_name: dict[str, list[float]] = {}
        for _, events in run.events:
            for ev in events:
                by_name.setdefault(ev[0], []).append(ev[3])
        longest = max(level.length for level in levels_of(self.config.aggregation))
        complete = True
        for name, times in sorted(by_name.items()):
            # every window of every level holding one of these events starts in it
            start = window_start(min(times), longest) - longest
            span = ReplaySpan(start, math.floor(max(times)) + 1.0, glob.escape(name))
            got = await replay(self.config, span, clock=self.clock, err=self.err, tty=False)
            s = self.summary
            s.windows += got.windows
            s.changed += got.changed
            s.new += got.new
            s.written.update(got.written)
            complete = complete and got.skipped_open == 0
        if complete:
            await pg.finish_run(self.conn, run.id)
        else:  # the service may still write one of them: a rerun recomputes it
            self.summary.pending += 1

    async def _archive(self, dead_letter_id: int, events: Sequence[Event]) -> None:
        rows = Rows()
        for ev in events:
            rows.add(*ev)
        position = (str(dead_letter_id), str(dead_letter_id + 1))
        for hour, data in by_hour(rows, ARCHIVE_PARTITION).items():
            await self.store.put(data_name(hour, ARCHIVE_PARTITION, *position), data)

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

    async def _through(self) -> float:
        """The latest window end the PostgreSQL outputs hold: the service's event time
        has passed it (as replay's ``final_until`` reads it)."""
        cfg = self.config
        tables: tuple[str, ...] = (cfg.postgres.table,)
        if cfg.routes:
            router = Router(
                cfg.routes,
                outputs=cfg.outputs,
                kafka_topic=cfg.kafka.topic,
                postgres_table=cfg.postgres.table,
            )
            tables = router.destinations("postgres")
        through = -math.inf
        for t in tables:
            latest = await self.conn.fetchval(
                f"SELECT extract(epoch FROM max(window_end))::float8 FROM {quote_identifier(t)}"
            )
            if latest is not None:
                through = max(through, float(latest))
        return through
