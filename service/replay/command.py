"""The replay itself: read, recompute, compare, write, and say what happened.

Exit codes as for every sub-command: 0 done (even when nothing differed), 1 a failure
on the way (what was written stays written: a rerun finishes the job), 2 an invalid
range or no ARCHIVE_URL.
"""

from __future__ import annotations

import logging
import math
import sys
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TextIO

import orjson

from service.aggregation.source_marks import SourceMarks
from service.archive.stores import ArchiveStore, build_store
from service.config import AggregationConfig, Config
from service.core.clock import Clock, SystemClock
from service.core.events import Aggregate
from service.metrics.collector import MetricsCollector
from service.postgres.schema import quote_identifier
from service.replay.archived import Columns, hours_of, list_files, read
from service.replay.compare import Held, HeldKey, decide, held_key, tags_text
from service.replay.kafka_held import kafka_held
from service.replay.progress import Progress
from service.replay.recompute import (
    Windows,
    add_events,
    aggregates,
    levels_of,
    merged,
    partition_levels,
)
from service.replay.span import ReplaySpan
from service.routes.matching import Output, Router
from service.sinks.postgres import PostgresSink
from service.wiring import build_router

__all__ = ["Summary", "recomputed", "replay", "usable"]

log = logging.getLogger(__name__)

_WRITE_CHUNK = 5000  # aggregates per transaction: a crash loses at most a chunk's work


@dataclass(slots=True)
class Summary:
    files: int = 0
    events: int = 0
    windows: int = 0  # recomputed, starting in the range
    unchanged: int = 0
    changed: int = 0
    new: int = 0  # never written before (revision 1)
    skipped_open: int = 0  # still open or correctable by the service
    held_only: int = 0  # in the outputs, no event in the archive: left as they are
    written: Counter[str] = field(default_factory=Counter)  # per destination

    def lines(self) -> list[str]:
        out = [
            f"replay: {self.files} archive file(s), {self.events} event(s)",
            f"windows read {self.windows}: changed {self.changed}, new {self.new}, "
            f"unchanged {self.unchanged}, skipped (still open or correctable) "
            f"{self.skipped_open}",
        ]
        if self.held_only:
            out.append(
                f"held by the outputs without any archived event: {self.held_only} "
                "(left as they are: docs/replay.md)"
            )
        if self.written:
            out += [f"written to {d}: {n}" for d, n in sorted(self.written.items())]
        else:
            out.append("written: nothing")
        return out


def usable(config: Config) -> list[str]:
    """Why this configuration cannot be replayed (empty: it can)."""
    if not config.archive.enabled:
        return ["ARCHIVE_URL is not set: replay reads the archive"]
    return []


async def replay(
    config: Config,
    span: ReplaySpan,
    *,
    clock: Clock | None = None,
    err: TextIO | None = None,
    tty: bool | None = None,
) -> Summary:
    clock = clock or SystemClock()
    err = err or sys.stderr
    router = build_router(config)
    metrics = MetricsCollector()
    store = build_store(config.archive)
    sinks: dict[Output, Any] = {}
    try:
        if "postgres" in config.outputs:
            sinks["postgres"] = PostgresSink(config.postgres, metrics, clock, router=router)
        if "kafka" in config.outputs:
            from service.sinks.kafka import KafkaSink

            sinks["kafka"] = KafkaSink(config.kafka, metrics, clock, router=router)
        for sink in sinks.values():
            await sink.start()
        return await _replay(config, span, clock, err, tty, sinks, store, router)
    finally:
        for sink in sinks.values():
            await sink.stop()
        await store.close()


async def _replay(
    config: Config,
    span: ReplaySpan,
    clock: Clock,
    err: TextIO,
    tty: bool | None,
    sinks: dict[Output, Any],
    store: ArchiveStore,
    router: Router | None,
) -> Summary:
    agg = config.aggregation
    summary = Summary()
    now = clock.now()
    marks = SourceMarks(config.routes)  # rules with source: marked as the service does
    fresh = await recomputed(store, agg, span, now, summary, Progress(err, tty), marks)
    summary.windows = len(fresh)
    held: dict[tuple[str, HeldKey], Held] = {}  # (output:destination, key)
    through = -math.inf
    for output, sink in sinks.items():
        if output == "postgres":
            got, latest = await _held(sink, _destinations(config, router, output), span)
        else:
            since = span.start - agg.max_future_s
            topics = _destinations(config, router, output)
            got, latest = await kafka_held(config.kafka, topics, span, since)
        held.update({(f"{output}:{d}", key): h for (d, key), h in got.items()})
        through = max(through, latest)
    # the service may still emit or correct a window until its watermark passes the
    # window's end plus the allowed lateness; it has passed the end of every window it
    # wrote, so the latest end written bounds it from below
    final_until = min(now, through) - agg.allowed_lateness_s
    writes: dict[Output, list[Aggregate]] = {output: [] for output in sinks}
    seen: set[tuple[str, HeldKey]] = set()
    for output in sinks:
        default = config.kafka.topic if output == "kafka" else config.postgres.table
        for dest, aggs in _destined(fresh, router, output, default):
            where = f"{output}:{dest}"
            for a in aggs:
                key = held_key(a)
                seen.add((where, key))
                if a.window_end > final_until:
                    summary.skipped_open += 1
                    continue
                held_row = held.get((where, key))
                out = decide(a, held_row)
                if out is None:
                    summary.unchanged += 1
                    continue
                if held_row is None:
                    summary.new += 1
                else:
                    summary.changed += 1
                writes[output].append(out)
                summary.written[where] += 1
    summary.held_only = sum(
        1 for k in held if k not in seen and span.wants(k[1][0]) and k[1][4] <= final_until
    )
    for output, aggs in writes.items():
        for i in range(0, len(aggs), _WRITE_CHUNK):
            await sinks[output].write(aggs[i : i + _WRITE_CHUNK], ())
    return summary


async def recomputed(
    store: ArchiveStore,
    agg: AggregationConfig,
    span: ReplaySpan,
    now: float,
    summary: Summary,
    progress: Progress,
    marks: SourceMarks | None = None,
) -> list[Aggregate]:
    """Every window of every level starting in the span, from the archive's hours
    ``[start, end + the longest window)``, as the service computes it (``marks``: the
    routing rules' source marks, read from each file's ``partition`` column)."""
    levels = levels_of(agg)
    longest = max(level.length for level in levels)
    hours = hours_of(span.start, span.end + longest)
    parts = await list_files(store, hours)
    progress.expect(hours, [name for part in parts for name in part.files])
    shares: list[list[Windows]] = []
    for part in parts:  # one partition at a time, its files in position order
        panes: Windows = {}
        for name in part.files:
            table = await read(store, name)
            if table is not None:
                cols = Columns()
                cols.extend(table)
                marker = _marker(marks, table)
                summary.events += add_events(panes, cols, agg.pane_s, span, marker)
                summary.files += 1
            progress.done(name)
        shares.append(partition_levels(panes, levels))
    progress.finish()
    fresh: list[Aggregate] = []
    for i, level in enumerate(levels):
        windows = merged(share[i] for share in shares)
        fresh += aggregates(windows, level.length, span, now, tagged=bool(agg.group_by))
    return fresh


def _marker(marks: SourceMarks | None, table: Any) -> Callable[[str], str] | None:
    """The source marks of the partition a file holds (one per file: its slice's)."""
    if not marks or table.num_rows == 0:
        return None
    return marks.for_partition(table.column("partition")[0].as_py())


def _destinations(config: Config, router: Router | None, output: Output) -> tuple[str, ...]:
    if router is not None:
        return router.destinations(output)
    return (config.kafka.topic if output == "kafka" else config.postgres.table,)


def _destined(
    fresh: Sequence[Aggregate], router: Router | None, output: Output, default: str
) -> list[tuple[str, Sequence[Aggregate]]]:
    if router is None:
        return [(default, fresh)]
    return [(dest, aggs) for _, dest, aggs in router.split(fresh, output)]


async def _held(
    sink: PostgresSink, tables: Sequence[str], span: ReplaySpan
) -> tuple[dict[tuple[str, HeldKey], Held], float]:
    """The rows of the range per table, and the latest window end written from the
    range's start on (the service's watermark has passed it)."""
    held: dict[tuple[str, HeldKey], Held] = {}
    through = float("-inf")
    async with sink.pool.acquire() as conn:
        for table in tables:
            q = quote_identifier(table)  # validated: letters, digits, _
            rows: list[Any] = await conn.fetch(
                f"""SELECT name, tags::text AS tags, agg_func,
                       extract(epoch FROM window_start)::float8 AS ws,
                       extract(epoch FROM window_end)::float8 AS we,
                       value, count, revision
                FROM {q}
                WHERE window_start >= to_timestamp($1) AND window_start < to_timestamp($2)""",
                span.start,
                span.end,
            )
            for r in rows:
                tags = tags_text(orjson.loads(r["tags"])) if r["tags"] else "{}"
                key = (r["name"], tags, r["agg_func"], r["ws"], r["we"])
                held[(table, key)] = Held(r["value"], r["count"], r["revision"])
            latest = await conn.fetchval(
                f"SELECT extract(epoch FROM max(window_end))::float8 FROM {q} "
                "WHERE window_start >= to_timestamp($1)",
                span.start,
            )
            if latest is not None:
                through = max(through, float(latest))
    return held, through
