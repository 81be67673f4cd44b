"""EventAggregator: decodes source batches, windows them, emits closed windows.

State is kept per source partition (:mod:`service.aggregation.partition`: windows,
event-time progress, the emitted boundary and the idleness rule), so it can be
checkpointed and handed over on a rebalance. The watermark is the minimum over the
partitions that hold it (their own largest event time minus the grace); windows of one
key spread over several partitions are merged when they close. When no partition holds
it any more (every one silent), every open window is emitted: the quiet rule.
Everything here is synchronous and CPU-only; the caller owns I/O and time (the clock
is injected).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

from service.aggregation.archived_run import CapturingRun, Refusals, add_corrections, capture
from service.aggregation.batch_run import BatchRun, Correction, Limits
from service.aggregation.corrections import apply_corrections
from service.aggregation.dead_letters import DEAD_LETTERS_PER_MESSAGE, DeadLetters
from service.aggregation.emission import aggregates_of, take_through
from service.aggregation.hop_corrections import HopCorrector, drop_hop_kept, expire_hop_kept
from service.aggregation.hopping import take_panes
from service.aggregation.kept import expire
from service.aggregation.origins import RoutedTime
from service.aggregation.partition import NEG_INF, STATE_FORMAT, Dropped, PartitionState
from service.aggregation.rollups import expire_kept, keep_configured, partial_keys
from service.aggregation.series import SeriesBudget, TagRule
from service.aggregation.windows import closed_boundary, window_start
from service.archive.rows import ArchiveSlice, ArchiveTap
from service.bus.base import SourceBatch
from service.checkpoints.base import PartitionCheckpoint
from service.config import AggregationConfig
from service.core.clock import Clock
from service.metrics.collector import MetricsCollector
from service.pipeline.flow import Outputs

if TYPE_CHECKING:  # the routes package is the outputs' (and imports YAML): not needed here
    from service.aggregation.source_marks import SourceMarks

__all__ = [
    "DEAD_LETTERS_PER_MESSAGE",
    "STATE_FORMAT",
    "CloseError",
    "EventAggregator",
]

log = logging.getLogger(__name__)


class CloseError(RuntimeError):
    """Closing windows raised after a batch was applied: no record of it is to blame
    (the stage does not set any aside for it)."""


class EventAggregator:
    def __init__(
        self,
        cfg: AggregationConfig,
        metrics: MetricsCollector,
        clock: Clock,
        *,
        max_message_bytes: int = 1_048_576,
        max_events_per_message: int = 100_000,
        archive: bool = False,
        marks: SourceMarks | None = None,
    ) -> None:
        self._cfg = cfg
        self._interval = cfg.interval_s
        # AGGREGATION_HOP below the interval: state per hop-sized pane (hopping.py)
        self._pane = cfg.pane_s
        self._hopping = self._pane < self._interval
        self._idle_s = cfg.effective_idle_timeout_s
        self._lateness = cfg.allowed_lateness_s  # 0: emitted windows are not kept
        self._rollups = cfg.rollups_s  # (): no rollups (service.aggregation.rollups)
        self._metrics = metrics
        self._clock = clock
        self._max_bytes = max_message_bytes
        self._max_elements = max_events_per_message
        self._dead = DeadLetters(metrics, clock)
        self._parts: dict[str, PartitionState] = {}
        self._open = 0
        # AGGREGATION_GROUP_BY set: series keys and the series budget (docs/series.md)
        self._tags = TagRule(cfg.group_by, cfg.max_series_per_name) if cfg.group_by else None
        # ARCHIVE_URL set: accepted events kept per partition until their checkpoint
        self._archive = ArchiveTap() if archive else None
        # routing rules with source, several sources: marks per batch (aggregation/source_marks.py)
        self._marks = marks or None
        metrics.set_partition_view(self.partitions)
        metrics.set_ledger_view(self.ledger)

    # -- state ------------------------------------------------------------------------
    @property
    def open_windows(self) -> int:
        return self._open

    @property
    def resolutions(self) -> list[float]:
        """Window lengths written, in seconds: the interval, then each rollup's."""
        return [self._interval, *self._rollups]

    @property
    def rollup_partials(self) -> int:
        """Open rollup window keys (one accumulator each) over the partitions held."""
        return sum(partial_keys(p.rollups) for p in self._parts.values())

    @property
    def oldest_window_start(self) -> float | None:
        """Start of the oldest window still open, for /status (None when none is)."""
        starts = [min(s) for p in self._parts.values() if (s := p.open_starts())]
        return min(starts) if starts else None

    @property
    def watermark(self) -> float | None:
        """Event-time watermark (grace applied): the minimum over the partitions that
        hold it; None while one holds with unknown event time, or none holds."""
        held = math.inf
        idle_s = self._idle_s
        for p in self._parts.values():
            if p.holds(idle_s):
                at = p.held_at(idle_s)
                if at is None:
                    return None  # unread data of unknown time: hold everything back
                held = min(held, at)
        return None if held == math.inf else held - self._cfg.grace_s

    def ledger(self) -> dict[str, int]:
        """The ledger of the partitions held here, summed: cumulative counts (across
        restarts: they are checkpointed) and ``open`` (events in open windows) and
        ``imbalance`` = received - (emitted + open + late + rejected + dropped), which is 0
        (``dropped``: events of windows whose state could not be used). ``late_applied``
        (corrections, once there are any) counts among aggregated and emitted."""
        total: dict[str, int] = {}
        for p in self._parts.values():
            for key, n in p.ledger_totals().items():
                total[key] = total.get(key, 0) + n
        for key in ("received", "aggregated", "emitted", "late", "open", "dropped"):
            total.setdefault(key, 0)
        rejected = sum(n for k, n in total.items() if k.startswith("rejected:"))
        total["rejected"] = rejected
        total["imbalance"] = total["received"] - (
            total["emitted"] + total["open"] + total["late"] + rejected + total["dropped"]
        )
        return total

    def positions(self) -> dict[str, str]:
        return {k: p.position for k, p in self._parts.items() if p.position is not None}

    def partitions(self) -> dict[str, dict[str, Any]]:
        """A JSON-able view for /status and the per-partition metrics."""
        now = self._clock.monotonic()
        grace = self._cfg.grace_s
        return {k: p.view(self._idle_s, grace, now) for k, p in self._parts.items()}

    def snapshot(self, partitions: Iterable[str] | None = None) -> list[PartitionCheckpoint]:
        """Serialise the state of these partitions (all by default) for a checkpoint."""
        keys = (
            list(self._parts) if partitions is None else [k for k in partitions if k in self._parts]
        )
        keeps, panes = self._lateness > 0, self._hopping
        return [self._parts[k].snapshot(k, keeps=keeps, panes=panes) for k in keys]

    def archived(
        self, checkpoints: Sequence[PartitionCheckpoint], *, released: bool = False
    ) -> list[ArchiveSlice] | None:
        """The accepted events these checkpoints (of :meth:`snapshot`, or of
        :meth:`release` when ``released``) cover, for the archive; None without one."""
        if self._archive is None:
            return None
        slices = self._archive.take(checkpoints)
        if released:
            self._archive.release(c.partition for c in checkpoints)
        return slices

    def on_durable(self, checkpoints: Iterable[PartitionCheckpoint]) -> None:
        """These checkpoints (of :meth:`snapshot`) are durable: drop what they covered."""
        for cp in checkpoints:
            part = self._parts.get(cp.partition)
            if part is not None and cp.ledger is not None:
                part.on_durable(cp.ledger)

    def restore(self, checkpoints: Sequence[PartitionCheckpoint]) -> None:
        """Adopt partitions (newly assigned), with their stored state when there is one."""
        now = self._clock.monotonic()
        if self._archive is not None:
            self._archive.restore(checkpoints)
        for cp in checkpoints:
            old = self._parts.pop(cp.partition, None)
            if old is not None:
                self._open -= old.open_windows()
            p, dropped = PartitionState.restored(cp, now)
            if self._tags is not None:  # the series budget, derived from the windows
                p.series = SeriesBudget.of(p.windows)
            for why in keep_configured(p, self._rollups):
                log.warning("checkpoint of partition %s: dropped %s", cp.partition, why)
            if not self._lateness:  # nothing frees them, and nothing corrects them
                p.kept_rollups.clear()
                drop_hop_kept(p)
            self._parts[cp.partition] = p
            self._open += p.open_windows()
            for d in dropped:
                self._on_restore_dropped(cp.partition, p, d)
        self._metrics.set_open_windows(self._open)

    def _on_restore_dropped(self, partition: str, p: PartitionState, d: Dropped) -> None:
        """A checkpoint entry that cannot be used: dropped, never kept to fail later."""
        if d.whole:
            log.error(
                "checkpoint of partition %s: %s; its open windows and ledger are lost, "
                "reading resumes at its stored position %r",
                partition,
                d.why,
                p.position,
            )
            self._metrics.on_state_dropped("partition")
            return
        log.error(
            "checkpoint of partition %s: window %r of %r/%r dropped (%d event(s)): %s",
            partition,
            d.start,
            d.name,
            d.func,
            d.events,
            d.why,
        )
        p.on_dropped(d.events)
        self._metrics.on_state_dropped("window")

    def release(self, partitions: Iterable[str]) -> list[PartitionCheckpoint]:
        """Give partitions up (revoked): return their final snapshot and forget them."""
        keys = [k for k in partitions if k in self._parts]
        snap = self.snapshot(keys)
        for k in keys:
            self._open -= self._parts.pop(k).open_windows()
        self._metrics.set_open_windows(self._open)
        return snap

    def partition_ids(self) -> list[str]:
        return list(self._parts)

    def discard(self, partitions: Iterable[str]) -> None:
        """Forget partitions without a snapshot: their state is not trusted (applying a
        batch raised half-way); the stage has them delivered again from a checkpoint."""
        partitions = list(partitions)
        for k in partitions:
            self._parts.pop(k, None)
        if self._archive is not None:
            self._archive.discard(partitions)
        # a batch that raised never stored its count of new windows: count them again
        self._open = sum(p.open_windows() for p in self._parts.values())
        self._metrics.set_open_windows(self._open)
        self._metrics.on_stage_rewind()

    def reject_record(self, batch: SourceBatch, idx: int, reason: str, detail: str) -> Outputs:
        """Dead-letter record ``idx`` of ``batch`` whole, without applying it; counted
        in the ledger as one event received and rejected (like ``too_large``)."""
        part = self._parts.get(batch.partition)
        if part is None:
            part = self._parts[batch.partition] = PartitionState()
        seen = self._clock.monotonic() if batch.polled_at is None else batch.polled_at
        part.reported_at = max(part.reported_at, seen)
        part.last_message_at = seen
        out = Outputs()
        rejects: dict[str, int] = {}
        now = self._clock.now()
        self._dead.reject(out, rejects, batch, idx, batch.records[idx], reason, detail, now)
        part.count(window_start(batch.received_at, self._interval), 1, 0, rejects)
        self._metrics.on_events_rejected(reason)
        return out

    # -- processing -------------------------------------------------------------------
    def process(self, batch: SourceBatch) -> Outputs:
        """Aggregate one batch; returns dead letters and any windows it closed.

        A batch without records is the bus's report on a partition (caught up or not):
        it moves only the idleness clock, never the partition's event time.
        """
        part = self._parts.get(batch.partition)
        if part is None:
            part = self._parts[batch.partition] = PartitionState()
        seen = self._clock.monotonic() if batch.polled_at is None else batch.polled_at
        out = Outputs()
        corrections: list[Correction] = []
        if batch.origins is not None:
            if part.routed is None:
                part.routed = RoutedTime(known_at=seen)
            if batch.rejected:
                self._reject_marked(part, batch, out, seen)
            if replayed := part.drop_replayed(batch):
                self._metrics.on_replays_dropped(replayed)
        part.reported_at = max(part.reported_at, seen)
        if batch.records:
            part.last_message_at = seen
            corrections = self._aggregate(part, batch, out)
        if batch.progress is not None and part.routed is not None:
            part.routed.on_progress(batch.progress, part.reported_at)
        if batch.next_position is not None:
            part.position = batch.next_position
        part.caught_up = batch.caught_up
        part.lag = batch.lag
        if corrections and self._hopping:  # before the close: hop_corrections.py
            self._correct(part, batch, corrections, out)
            corrections = []
        try:
            self._close_ready(out)
        except Exception as exc:
            raise CloseError(f"closing windows raised {exc!r}") from exc
        if self._lateness:
            if corrections:  # after the close: a window this batch closed is emitted first
                self._correct(part, batch, corrections, out)
            self._free_kept()
        return out

    def _aggregate(
        self, part: PartitionState, batch: SourceBatch, out: Outputs
    ) -> list[Correction]:
        """Apply the batch's records (:mod:`service.aggregation.batch_run`), then count
        them in the ledger and the metrics; returns the corrections it found."""
        self._dead.forget()  # a batch that failed half-way: not its roll-ups
        run = self._start_run(part, batch, out)
        run.run()
        if type(run) is CapturingRun and self._archive is not None:  # archived_run.py
            capture(run, self._archive.rows_for(batch.partition))
        self._dead.finish(out)
        self._finish_run(part, batch, run)
        return run.corrections

    def _correct(
        self, part: PartitionState, batch: SourceBatch, found: list[Correction], out: Outputs
    ) -> None:
        """Apply a batch's corrections (:mod:`service.aggregation.corrections`)."""
        dead = self._dead if self._archive is None else Refusals(self._dead)
        if self._hopping:
            hop = HopCorrector(
                part,
                self._parts.values(),
                pane=self._pane,
                interval=self._interval,
                lateness=self._lateness,
                now=self._clock.now(),
                metrics=self._metrics,
                tags=self._tags,
                emit_through=self._emit_through,
            )
            hop.apply(batch, found, out, dead)
            self._open += hop.opened
            self._metrics.set_open_windows(self._open)
        else:
            apply_corrections(
                part,
                self._parts.values(),
                batch,
                found,
                out,
                dead,
                interval=self._interval,
                now=self._clock.now(),
                metrics=self._metrics,
                tags=self._tags,
                rollups=self._rollups,
            )
        if type(dead) is Refusals and self._archive is not None:
            rows = self._archive.rows_for(batch.partition)
            add_corrections(rows, found, dead, self._tags is not None)

    def _free_kept(self) -> None:
        """Free the kept windows whose partition's watermark passed their end plus the
        allowed lateness (a partition's event time moves only with its own batches, but
        the windows it keeps are emitted when the slowest partition allows)."""
        grace, interval, lateness = self._cfg.grace_s, self._interval, self._lateness
        for p in self._parts.values():
            if p.kept and p.max_ts is not None:
                expire(p.kept, p.max_ts - grace, interval, lateness)
            if p.kept_rollups and p.max_ts is not None:
                expire_kept(p, p.max_ts - grace, lateness)
            if (p.kept_panes is not None or p.hop_revisions) and p.max_ts is not None:
                expire_hop_kept(p, p.max_ts - grace, interval, lateness)

    def _start_run(self, part: PartitionState, batch: SourceBatch, out: Outputs) -> BatchRun:
        cfg = self._cfg
        now = self._clock.now()
        limits = Limits(
            interval=self._pane,
            grace=cfg.grace_s,
            budget=cfg.max_open_windows,
            max_ts=now + cfg.max_future_s,
            lead_cap=now + cfg.max_watermark_lead_s,
            max_bytes=self._max_bytes,
            max_elements=self._max_elements,
            reach=self._interval,
        )
        others = self._others_limit(part)
        kind = BatchRun if self._archive is None else CapturingRun  # ARCHIVE_URL
        return kind(
            part,
            batch,
            out,
            self._dead,
            limits,
            now=now,
            open_now=self._open,
            others=others,
            idle_s=self._idle_s,
            tags=self._tags,
            lateness=self._lateness,
            marker=None if self._marks is None else self._marks.for_partition(batch.partition),
        )

    def _finish_run(self, part: PartitionState, batch: SourceBatch, run: BatchRun) -> None:
        self._open = run.open_now
        if run.part_max != NEG_INF:
            part.max_ts = run.part_max
        if run.ahead:
            part.ahead_ts = run.ahead_max
        received_in = window_start(batch.received_at, self._interval)
        part.count(received_in, run.received, run.accepted, run.rejects)
        metrics = self._metrics
        metrics.on_events_aggregated(run.accepted)
        if run.overflowed:
            part.on_series_overflow(run.overflowed)
            metrics.on_series_overflow(run.overflowed)
        if run.ahead:
            metrics.on_events_ahead(run.ahead)
        for reason, n in run.rejects.items():
            if reason == "late":
                metrics.on_events_late(n)
            else:
                metrics.on_events_rejected(reason, n)

    def _reject_marked(
        self, part: PartitionState, batch: SourceBatch, out: Outputs, seen: float
    ) -> None:
        """Dead-letter the records the bus marked as unusable and take them out of the
        batch: received and rejected in the ledger, a message for the idle rule."""
        marked, batch.rejected = batch.rejected or {}, None
        now = self._clock.now()
        rejects: dict[str, int] = {}
        for idx, (reason, detail, n) in sorted(marked.items()):
            raw = batch.records[idx]
            self._dead.reject(out, rejects, batch, idx, raw, reason, detail, now, n)
        self._dead.finish(out)
        keep = [i for i in range(len(batch.records)) if i not in marked]
        batch.records = [batch.records[i] for i in keep]
        if batch.offsets is not None:
            batch.offsets = [batch.offsets[i] for i in keep]
        if batch.origins is not None:
            batch.origins = [batch.origins[i] for i in keep]
        part.last_message_at = seen
        received_in = window_start(batch.received_at, self._interval)
        part.count(received_in, sum(rejects.values()), 0, rejects)
        for reason, n in rejects.items():
            self._metrics.on_events_rejected(reason, n)

    def _others_limit(self, part: PartitionState) -> tuple[float, bool]:
        """(cap, blocked): the event time the other holding partitions allow while
        ``part`` delivers, and whether one of them holds everything back. Only reports
        move other partitions' idleness, so neither changes during this batch."""
        cap = math.inf
        idle_s = self._idle_s
        for q in self._parts.values():
            if q is part or not q.holds(idle_s):
                continue
            at = q.held_at(idle_s)
            if at is None:
                return cap, True
            cap = min(cap, at)
        return cap, False

    def _close_ready(self, out: Outputs) -> None:
        wm = self.watermark
        if wm is not None:
            self._metrics.set_watermark(wm)
            self._emit_through(closed_boundary(wm, self._pane), out)
        elif self._open and not any(p.holds(self._idle_s) for p in self._parts.values()):
            # every partition is silent: the quiet rule emits what is still open
            latest = max(s for p in self._parts.values() for s in p.open_starts())
            log.info("every partition is silent: flushing %d open window(s)", self._open)
            self._emit_through(latest + self._interval, out)

    def _emit_through(self, boundary: float, out: Outputs) -> None:
        """Emit every window ending at or before ``boundary``, merged over partitions
        (:mod:`service.aggregation.emission`; hopping: from panes, hopping.py)."""
        if self._hopping:
            taken = take_panes(
                self._parts.values(),
                boundary,
                self._pane,
                self._interval,
                self._idle_s,
                keep=self._lateness > 0,
            )
        else:
            taken = take_through(
                self._parts.values(),
                boundary,
                self._interval,
                self._idle_s,
                self._metrics,
                keep=self._lateness > 0,
                rollups=self._rollups,
            )
        self._open -= taken.keys
        if not taken.ready and not taken.levels:
            return
        now, tagged = self._clock.now(), self._tags is not None
        emitted = aggregates_of(taken, self._interval, now, self._metrics, tagged=tagged)
        for length, level in taken.levels:  # after the base windows that completed them
            emitted.extend(aggregates_of(level, length, now, self._metrics, tagged=tagged))
        out.aggregates.extend(emitted)
        self._metrics.on_aggregates_emitted(emitted)
        self._metrics.set_open_windows(self._open)
