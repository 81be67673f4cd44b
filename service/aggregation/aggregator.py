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
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Final, cast

from service.aggregation.decode import (
    CANONICAL_FUNCS,
    Rejected,
    WireEvent,
    decode_fast,
    element_of,
    fast_ok,
    loads_message,
    name_fault,
    parse_event,
    raw_text,
)
from service.aggregation.functions import FUNCTIONS, SUM_PLAIN_LIMIT, Acc
from service.aggregation.origins import RoutedTime
from service.aggregation.partition import (
    NEG_INF,
    STATE_FORMAT,
    Dropped,
    PartitionState,
    WindowKey,
)
from service.aggregation.windows import closed_boundary
from service.bus.base import SourceBatch
from service.checkpoints.base import PartitionCheckpoint
from service.config import AggregationConfig
from service.core.clock import Clock
from service.core.events import Aggregate, DeadLetter
from service.metrics.collector import MetricsCollector
from service.pipeline.flow import Outputs

__all__ = ["STATE_FORMAT", "CloseError", "EventAggregator"]

log = logging.getLogger(__name__)

_NEG_INF: Final = NEG_INF
# Dead letters written one by one per message; its further rejects roll up, one dead
# letter per reason with their count (the ledger and metrics still count each element).
DEAD_LETTERS_PER_MESSAGE: Final = 100

_NEW: Final[dict[str, Callable[[float, float], Acc]]] = {k: f.new for k, f in FUNCTIONS.items()}
_ADD: Final[dict[str, Callable[[Acc, float, float], None]]] = {
    k: f.add for k, f in FUNCTIONS.items()
}
_RESULT: Final[dict[str, Callable[[Acc], float]]] = {k: f.result for k, f in FUNCTIONS.items()}


class CloseError(RuntimeError):
    """Closing windows raised after a batch was applied: no record of it is to blame
    (the stage does not set any aside for it)."""


def _raw_of(ev: WireEvent, evs: Sequence[WireEvent], raws: list[Any] | None, record: Any) -> Any:
    """The raw element behind ``ev`` (one of ``evs``, decoded from ``record``), for a
    dead letter. Found by identity: rejections are rare, the hot loop keeps no index."""
    j = next(i for i, e in enumerate(evs) if e is ev)
    return raws[j] if raws is not None else element_of(record, j)


class _RawOf:
    """:func:`_raw_of`, found only for a dead letter that is written: it costs a scan
    of the message, which thousands of rejects of one message must not each pay."""

    __slots__ = ("args",)

    def __init__(self, *args: Any) -> None:
        self.args = args

    def __call__(self) -> Any:
        return _raw_of(*self.args)


class EventAggregator:
    def __init__(
        self,
        cfg: AggregationConfig,
        metrics: MetricsCollector,
        clock: Clock,
        *,
        max_message_bytes: int = 1_048_576,
        max_events_per_message: int = 100_000,
    ) -> None:
        self._cfg = cfg
        self._interval = cfg.interval_s
        self._idle_s = cfg.effective_idle_timeout_s
        self._metrics = metrics
        self._clock = clock
        self._max_bytes = max_message_bytes
        self._max_elements = max_events_per_message
        # the message whose dead letters are being counted, how many it wrote, and its
        # roll-ups by reason: [count, first raw, its detail, source]
        self._dl_message: tuple[int, int] | None = None
        self._dl_written = 0
        self._rollups: dict[str, list[Any]] = {}
        self._parts: dict[str, PartitionState] = {}
        self._open = 0
        metrics.set_partition_view(self.partitions)
        metrics.set_ledger_view(self.ledger)

    # -- state ------------------------------------------------------------------------
    @property
    def open_windows(self) -> int:
        return self._open

    @property
    def oldest_window_start(self) -> float | None:
        """Start of the oldest window still open, for /status (None when none is)."""
        starts = [min(p.windows) for p in self._parts.values() if p.windows]
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
        (``dropped``: events of windows whose state could not be used)."""
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
        return [self._parts[k].snapshot(k) for k in keys]

    def on_durable(self, checkpoints: Iterable[PartitionCheckpoint]) -> None:
        """These checkpoints (of :meth:`snapshot`) are durable: drop what they covered."""
        for cp in checkpoints:
            part = self._parts.get(cp.partition)
            if part is not None and cp.ledger is not None:
                part.on_durable(cp.ledger)

    def restore(self, checkpoints: Sequence[PartitionCheckpoint]) -> None:
        """Adopt partitions (newly assigned), with their stored state when there is one."""
        now = self._clock.monotonic()
        for cp in checkpoints:
            old = self._parts.pop(cp.partition, None)
            if old is not None:
                self._open -= old.open_windows()
            p, dropped = PartitionState.restored(cp, now)
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
        for k in partitions:
            self._parts.pop(k, None)
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
        self._reject(out, rejects, batch, idx, batch.records[idx], reason, detail, now)
        part.count(math.floor(batch.received_at / self._interval) * self._interval, 1, 0, rejects)
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
            self._aggregate(part, batch, out)
        if batch.progress is not None and part.routed is not None:
            part.routed.on_progress(batch.progress, part.reported_at)
        if batch.next_position is not None:
            part.position = batch.next_position
        part.caught_up = batch.caught_up
        part.lag = batch.lag
        try:
            self._close_ready(out)
        except Exception as exc:
            raise CloseError(f"closing windows raised {exc!r}") from exc
        return out

    def _aggregate(self, part: PartitionState, batch: SourceBatch, out: Outputs) -> None:
        """The hot loop: no awaits, no logging, no per-event objects beyond the decoded
        event and its key, names bound to locals. Its results must equal the reference
        path's (``tests/unit/test_decode_fast.py`` compares them on generated input)."""
        if self._dl_message is not None:  # a batch that failed half-way: not its roll-ups
            self._rollups.clear()
            self._dl_message, self._dl_written = None, 0
        interval = self._interval
        grace = self._cfg.grace_s
        windows = part.windows
        # Lateness must not depend on where batch boundaries fall (a replay after a crash
        # batches differently): the close boundary advances event by event, as if each
        # event were its own batch. Other partitions cannot move during this batch.
        cap, blocked = self._others_limit(part)
        closed_until = part.closed_until
        budget = self._cfg.max_open_windows
        open_now = self._open
        now = self._clock.now()
        max_ts = now + self._cfg.max_future_s
        # Further ahead of the clock than this, an event is aggregated but moves no event
        # time ("ahead", service.aggregation.partition): one bad clock must not close the
        # windows that on-time events are still arriving for. The only clock-dependent
        # judgement here: a replay runs later, so it finds the same events ahead or
        # fewer, never more (docs/aggregation.md, "Replays stay exact").
        lead_cap = now + self._cfg.max_watermark_lead_s
        max_bytes = self._max_bytes
        part_max = _NEG_INF if part.max_ts is None else part.max_ts
        ahead_max = _NEG_INF if part.ahead_ts is None else part.ahead_ts
        ahead_closed = part.ahead_closed  # windows of ahead events the quiet rule emitted
        floor = math.floor
        new_acc = _NEW
        add_acc = _ADD
        canon = CANONICAL_FUNCS
        sum_, avg_, min_, max_ = canon["sum"], canon["avg"], canon["min"], canon["max"]
        wide = SUM_PLAIN_LIMIT
        nwide = -wide
        fast = decode_fast
        wire = WireEvent
        # The window of the previous event, as the range [q_lo, q_hi) of ts / interval
        # that floors to it: consecutive events mostly share one. Emptied whenever the
        # close boundary moves (it may have made that window late).
        q_lo = q_hi = 0.0
        keyed: dict[WindowKey, Acc] = {}
        start = 0.0
        # The close boundary is floor(x) * interval, x = (max event time - grace) /
        # interval; it cannot move until x reaches x_next.
        x_next = _NEG_INF
        # Repartitioned input: the event time that closes windows is the slowest input
        # partition's (service.aggregation.origins), moved by each event's origin.
        routed = part.routed
        if routed is not None:
            origin_of = batch.origins or []
            seen = part.reported_at
            idle_s = self._idle_s
            track = routed.on_event
            routed.limit(idle_s, seen)  # time and reports may have moved it
        accepted = late = received = ahead = 0
        rejects: dict[str, int] = {}
        late_windows = part.late_windows
        for idx, record in enumerate(batch.records):
            raws: list[Any] | None = None
            evs: Sequence[WireEvent] | None = None
            if type(record) is bytes:
                if len(record) > max_bytes:
                    detail = f"message of {len(record)} bytes exceeds {max_bytes}"
                    self._reject(out, rejects, batch, idx, record, "too_large", detail, now)
                    received += 1
                    continue
                try:
                    decoded = fast(record)
                except Exception:  # noqa: S110 - any refusal: the reference path decides
                    pass
                else:
                    if type(decoded) is wire:
                        t = decoded.timestamp  # fast_ok(), inlined
                        if type(t) is float and 0.0 <= t <= max_ts and decoded.agg_func in canon:
                            evs = (decoded,)
                    else:  # a JSON array: list[WireEvent]
                        many = cast(list[WireEvent], decoded)
                        if len(many) <= self._max_elements and all(
                            fast_ok(e, max_ts) for e in many
                        ):
                            evs = many
            if evs is None:
                evs, raws, held = self._reference(record, idx, batch, out, rejects, max_ts, now)
                received += held
            else:
                received += len(evs)
            for ev in evs:
                name = ev.name
                func = canon[ev.agg_func]
                value = ev.value
                ts: float = ev.timestamp  # type: ignore[assignment]  # a float by now
                q = ts / interval
                if not q_lo <= q < q_hi:
                    k = floor(q)
                    start = k * interval
                    if start + interval <= closed_until or (ahead_closed and start in ahead_closed):
                        if self._bad_name(ev, evs, raws, record, out, rejects, batch, idx, now):
                            continue
                        late += 1
                        late_key = (name, func, start)
                        late_windows[late_key] = late_windows.get(late_key, 0) + 1
                        raw = _RawOf(ev, evs, raws, record)
                        detail = f"window starting {start} was already emitted"
                        self._reject(out, rejects, batch, idx, raw, "late", detail, now)
                        continue
                    got = windows.get(start)
                    if got is None:
                        # never open a window for an event that is then refused: the
                        # reference path (which refused it before) would not have one
                        if self._bad_name(ev, evs, raws, record, out, rejects, batch, idx, now):
                            continue
                        got = windows[start] = {}
                    keyed = got
                    q_lo = float(k)
                    q_hi = q_lo + 1.0
                key = (name, func)
                acc = keyed.get(key)
                if acc is None:
                    # A name is checked when it first opens a window or a key (see
                    # fast_ok): an open key holds a checked name, so the common event
                    # pays nothing.
                    if self._bad_name(ev, evs, raws, record, out, rejects, batch, idx, now):
                        continue
                    if open_now >= budget:
                        raw = _RawOf(ev, evs, raws, record)
                        self._reject(
                            out,
                            rejects,
                            batch,
                            idx,
                            raw,
                            "cardinality_limit",
                            f"{budget} open windows reached",
                            now,
                        )
                        continue
                    keyed[key] = new_acc[func](value, ts)
                    open_now += 1
                elif func is sum_ or func is avg_:  # the common functions inlined
                    s = acc[1]
                    t = s + value
                    if t > wide or t < nwide:  # near the double limit: functions decide
                        try:
                            add_acc[func](acc, value, ts)
                        except OverflowError as exc:
                            raw = _raw_of(ev, evs, raws, record)
                            self._reject(out, rejects, batch, idx, raw, "overflow", str(exc), now)
                            continue
                    else:  # functions._sum_plain_add: count, Neumaier-compensated sum
                        acc[0] += 1
                        if (s if s >= 0.0 else -s) >= (value if value >= 0.0 else -value):
                            acc[2] += (s - t) + value
                        else:
                            acc[2] += (value - t) + s
                        acc[1] = t
                elif func is min_:
                    acc[0] += 1
                    if value < acc[1]:
                        acc[1] = value
                elif func is max_:
                    acc[0] += 1
                    if value > acc[1]:
                        acc[1] = value
                else:
                    try:
                        add_acc[func](acc, value, ts)
                    except OverflowError as exc:  # cannot happen with today's functions
                        raw = _raw_of(ev, evs, raws, record)
                        self._reject(out, rejects, batch, idx, raw, "overflow", str(exc), now)
                        continue
                # The close boundary follows the partition's own event time, or with
                # repartitioned input its slowest input partition's; the step is written
                # out for each, as the hot loop calls no function on the direct path.
                if ts > part_max:
                    if ts > lead_cap:
                        ahead += 1
                        if ts > ahead_max:
                            ahead_max = ts
                    elif routed is None and not blocked:
                        part_max = ts
                        x = ((ts if ts < cap else cap) - grace) / interval
                        if x >= x_next:
                            k = floor(x)
                            x_next = k + 1.0
                            edge = k * interval
                            if edge > closed_until:
                                closed_until = edge
                                q_lo = q_hi = 0.0
                    else:
                        part_max = ts
                if routed is not None:
                    # the slowest input partition's event time, when this event moved it
                    lim = track(origin_of[idx][0], ts if ts <= lead_cap else None, seen, idle_s)
                    if lim is not None and not blocked:
                        x = ((lim if lim < cap else cap) - grace) / interval
                        if x >= x_next:
                            k = floor(x)
                            x_next = k + 1.0
                            edge = k * interval
                            if edge > closed_until:
                                closed_until = edge
                                q_lo = q_hi = 0.0
                accepted += 1
        if self._dl_message is not None:
            self._flush_rollups(out)
        self._open = open_now
        if part_max != _NEG_INF:
            part.max_ts = part_max
        if ahead:
            part.ahead_ts = ahead_max
        part.count(floor(batch.received_at / interval) * interval, received, accepted, rejects)
        metrics = self._metrics
        metrics.on_events_aggregated(accepted)
        if ahead:
            metrics.on_events_ahead(ahead)
        for reason, n in rejects.items():
            if reason == "late":
                metrics.on_events_late(n)
            else:
                metrics.on_events_rejected(reason, n)

    def _reference(
        self,
        record: Any,
        idx: int,
        batch: SourceBatch,
        out: Outputs,
        rejects: dict[str, int],
        max_ts: float,
        now: float,
    ) -> tuple[list[WireEvent], list[Any], int]:
        """The reference path for one message: dead-letters what is invalid, with its
        exact reason, and returns the valid events, their raw elements and how many
        events the message held (the ledger's "received")."""
        if type(record) is bytes:
            try:
                decoded = loads_message(record)
            except Rejected as exc:
                self._reject(out, rejects, batch, idx, record, exc.reason, exc.detail, now)
                return [], [], 1
        else:
            decoded = record
        items = decoded if type(decoded) is list else [decoded]
        held = len(items)
        if held > self._max_elements:
            cap = self._max_elements
            detail = (
                f"{held - cap} elements past the first {cap} of a {held}-element message "
                "(VABUS_MAX_EVENTS_PER_MESSAGE); raw is the message"
            )
            self._reject(out, rejects, batch, idx, record, "too_large", detail, now, held - cap)
            items = items[:cap]
        evs: list[WireEvent] = []
        raws: list[Any] = []
        for item in items:
            try:
                name, func, value, ts = parse_event(item, max_ts)
            except Rejected as exc:
                self._reject(out, rejects, batch, idx, item, exc.reason, exc.detail, now)
                continue
            evs.append(WireEvent(name, value, ts, func))
            raws.append(item)
        return evs, raws, held

    def _reject_marked(
        self, part: PartitionState, batch: SourceBatch, out: Outputs, seen: float
    ) -> None:
        """Dead-letter the records the bus marked as unusable and take them out of the
        batch: received and rejected in the ledger, a message for the idle rule."""
        marked, batch.rejected = batch.rejected or {}, None
        now = self._clock.now()
        rejects: dict[str, int] = {}
        for idx, (reason, detail, n) in sorted(marked.items()):
            self._reject(out, rejects, batch, idx, batch.records[idx], reason, detail, now, n)
        if self._dl_message is not None:
            self._flush_rollups(out)
        keep = [i for i in range(len(batch.records)) if i not in marked]
        batch.records = [batch.records[i] for i in keep]
        if batch.offsets is not None:
            batch.offsets = [batch.offsets[i] for i in keep]
        if batch.origins is not None:
            batch.origins = [batch.origins[i] for i in keep]
        part.last_message_at = seen
        interval_start = math.floor(batch.received_at / self._interval) * self._interval
        part.count(interval_start, sum(rejects.values()), 0, rejects)
        for reason, n in rejects.items():
            self._metrics.on_events_rejected(reason, n)

    def _bad_name(
        self,
        ev: WireEvent,
        evs: Sequence[WireEvent],
        raws: list[Any] | None,
        record: Any,
        out: Outputs,
        rejects: dict[str, int],
        batch: SourceBatch,
        idx: int,
        now: float,
    ) -> bool:
        """Dead-letter ``ev`` as ``invalid_name`` if its name may not be stored (the
        fast path's share of :func:`parse_event`'s name rule), and say whether it did."""
        fault = name_fault(ev.name)
        if fault is None:
            return False
        raw = _raw_of(ev, evs, raws, record)
        self._reject(out, rejects, batch, idx, raw, "invalid_name", fault, now)
        return True

    def _reject(
        self,
        out: Outputs,
        counts: dict[str, int],
        batch: SourceBatch,
        idx: int,
        raw: Any,
        reason: str,
        detail: str,
        now: float,
        n: int = 1,
    ) -> None:
        """Count ``n`` rejected elements of message ``idx`` and write their dead letter;
        past :data:`DEAD_LETTERS_PER_MESSAGE` of one message, roll them up instead."""
        counts[reason] = counts.get(reason, 0) + n
        message = (id(batch), idx)
        if message != self._dl_message:
            if self._dl_message is not None:
                self._flush_rollups(out)
            self._dl_message = message
        if self._dl_written >= DEAD_LETTERS_PER_MESSAGE:
            rollup = self._rollups.get(reason)
            if rollup is None:
                raw = raw() if type(raw) is _RawOf else raw
                self._rollups[reason] = [n, raw, detail, self._source(batch, idx)]
            else:
                rollup[0] += n
            return
        self._dl_written += 1
        raw = raw() if type(raw) is _RawOf else raw
        source = self._source(batch, idx)
        out.dead_letters.append(DeadLetter(raw_text(raw), reason, detail, source, now))

    @staticmethod
    def _source(batch: SourceBatch, idx: int) -> str:
        if batch.offsets is None:
            return batch.source
        return f"{batch.source} offset={batch.offsets[idx]}"

    def _flush_rollups(self, out: Outputs) -> None:
        """One dead letter per reason for the rejects of the last message past its
        :data:`DEAD_LETTERS_PER_MESSAGE`."""
        now = self._clock.now()
        for reason, (n, raw, detail, source) in self._rollups.items():
            summary = (
                f"{n} more elements of this message rejected as {reason!r} (past the first "
                f"{DEAD_LETTERS_PER_MESSAGE} dead letters of one message); raw is the first "
                f"of them: {detail}"
            )
            out.dead_letters.append(DeadLetter(raw_text(raw), reason, summary, source, now))
            self._metrics.on_dead_letters_rolled_up(n)
        self._rollups.clear()
        self._dl_message = None
        self._dl_written = 0

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
            self._emit_through(closed_boundary(wm, self._interval), out)
        elif self._open and not any(p.holds(self._idle_s) for p in self._parts.values()):
            # every partition is silent: the quiet rule emits what is still open
            latest = max(s for p in self._parts.values() for s in p.windows)
            log.info("every partition is silent: flushing %d open window(s)", self._open)
            self._emit_through(latest + self._interval, out)

    def _emit_through(self, boundary: float, out: Outputs) -> None:
        """Emit every window ending at or before ``boundary``, merged over partitions.

        Each partition's emitted boundary only moves up (a partition adopted with an
        older history pulls the watermark back for a while; the others keep theirs).
        A holding partition's moves to ``boundary``, which is never above its own
        event time minus the grace. A silent one's moves only past the windows emitted
        for it, so when it speaks again it is judged by its own history.
        """
        interval = self._interval
        idle_s = self._idle_s
        ready: dict[float, dict[WindowKey, Acc]] = {}
        owner: dict[float, PartitionState] = {}  # who contributed each window first
        for p in self._parts.values():
            if p.closed_until >= boundary:
                continue
            starts = [s for s in p.windows if s + interval <= boundary]
            if p.holds(idle_s):
                p.closed_until = boundary
            elif starts:
                # The quiet rule: the emitted boundary moves past the windows of the
                # partition's event time only; those of ahead events, above it, are
                # remembered one by one, so on-time events below them stay on time.
                held = NEG_INF if p.max_ts is None else p.max_ts
                in_step = [s for s in starts if s <= held]
                if in_step:
                    p.closed_until = max(p.closed_until, max(in_step) + interval)
                p.ahead_closed.update(s for s in starts if s > held)
            if p.ahead_closed:
                p.ahead_closed = {s for s in p.ahead_closed if s + interval > p.closed_until}
            for start in starts:
                keyed = p.windows.pop(start)
                self._open -= len(keyed)
                p.on_emitted(keyed)
                into = ready.get(start)
                if into is None:
                    ready[start] = keyed
                    owner[start] = p
                    continue
                for key, acc in keyed.items():
                    mine = into.get(key)
                    if mine is None:
                        into[key] = acc
                        continue
                    try:
                        FUNCTIONS[key[1]].merge(mine, acc)
                    except OverflowError:
                        self._on_merge_overflow(p, key, start, acc[0])
        if not ready:
            return
        now = self._clock.now()
        emitted: list[Aggregate] = []
        append = emitted.append
        result_of = _RESULT
        for start in sorted(ready):
            end = start + interval
            for (name, func), acc in ready[start].items():
                try:
                    value = result_of[func](acc)
                    finite = value - value == 0.0  # inf - inf and nan - nan are nan
                except Exception:  # a broken state must not stop the stage: dropped
                    finite = False
                if finite:
                    append(Aggregate(name, func, value, acc[0], start, end, now))
                else:
                    self._on_unusable(owner[start], (name, func), start, acc)
        out.aggregates.extend(emitted)
        self._metrics.on_aggregates_emitted(emitted)
        self._metrics.set_open_windows(self._open)

    def _on_merge_overflow(
        self, p: PartitionState, key: WindowKey, start: float, events: int
    ) -> None:
        """A partition's share of a window would take the merged sum beyond the double
        range: the window keeps the value it had, that share counts as rejected."""
        log.error(
            "window %s of %r/%r: merging %d event(s) from another partition would make the "
            "sum non-finite; they are counted as rejected (overflow)",
            start,
            key[0],
            key[1],
            events,
        )
        p.on_merge_overflow(events)
        self._metrics.on_events_rejected("overflow", events)

    def _on_unusable(self, p: PartitionState, key: WindowKey, start: float, acc: Acc) -> None:
        """Never expected (state is validated when restored, every function stays finite),
        but no output may hold a value a consumer cannot parse, nor a stage crash-loop."""
        events = acc[0] if type(acc[0]) is int else 0
        log.error(
            "window %s of %r/%r has no finite result (state %.200r); dropped with %d event(s)",
            start,
            key[0],
            key[1],
            acc,
            events,
        )
        p.on_dropped(events, emitted=True)
        self._metrics.on_state_dropped("window")
