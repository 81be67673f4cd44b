"""EventAggregator: decodes source batches, windows them, emits closed windows.

State is kept per source partition (so it can be checkpointed and handed over on a
rebalance), while the watermark is global: the minimum over the partitions that still
carry data (contract §3/§10). Windows of one key spread over several partitions are
merged when they close. Everything here is synchronous and CPU-only; the caller owns
I/O and time (the clock is injected).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, cast

import orjson

from service.aggregation.decode import (
    CANONICAL_FUNCS,
    Rejected,
    WireEvent,
    decode_fast,
    element_of,
    fast_ok,
    loads_message,
    parse_event,
    raw_text,
)
from service.aggregation.functions import FUNCTIONS, Acc
from service.aggregation.windows import closed_boundary
from service.bus.base import PartitionCheckpoint, SourceBatch
from service.clock import Clock
from service.config import AggregationConfig
from service.events import Aggregate, DeadLetter
from service.metrics import MetricsCollector

__all__ = ["STATE_FORMAT", "EventAggregator", "Outputs"]

log = logging.getLogger(__name__)

STATE_FORMAT: Final = 1
_NEG_INF: Final = -math.inf

WindowKey = tuple[str, str]  # (name, agg_func) inside one window start
_NEW: Final[dict[str, Callable[[float, float], Acc]]] = {k: f.new for k, f in FUNCTIONS.items()}
_ADD: Final[dict[str, Callable[[Acc, float, float], None]]] = {
    k: f.add for k, f in FUNCTIONS.items()
}


@dataclass(slots=True)
class Outputs:
    """What one step of the aggregator produced for the outputs."""

    aggregates: list[Aggregate] = field(default_factory=list)
    dead_letters: list[DeadLetter] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.aggregates or self.dead_letters)

    def extend(self, other: Outputs) -> None:
        self.aggregates.extend(other.aggregates)
        self.dead_letters.extend(other.dead_letters)


@dataclass(slots=True)
class _Partition:
    windows: dict[float, dict[WindowKey, Acc]] = field(default_factory=dict)
    max_ts: float | None = None
    position: str | None = None
    caught_up: bool = False


def _raw_of(ev: WireEvent, evs: Sequence[WireEvent], raws: list[Any] | None, record: Any) -> Any:
    """The raw element behind ``ev`` (one of ``evs``, decoded from ``record``), for a
    dead letter. Found by identity: rejections are rare, the hot loop keeps no index."""
    j = next(i for i, e in enumerate(evs) if e is ev)
    return raws[j] if raws is not None else element_of(record, j)


class EventAggregator:
    def __init__(
        self,
        cfg: AggregationConfig,
        metrics: MetricsCollector,
        clock: Clock,
        *,
        max_message_bytes: int = 1_048_576,
    ) -> None:
        self._cfg = cfg
        self._interval = cfg.interval_s
        self._metrics = metrics
        self._clock = clock
        self._max_bytes = max_message_bytes
        self._parts: dict[str, _Partition] = {}
        self._closed_until = _NEG_INF  # windows ending at or before this were emitted
        self._open = 0
        self._last_message = clock.monotonic()

    # -- state ------------------------------------------------------------------------
    @property
    def open_windows(self) -> int:
        return self._open

    @property
    def watermark(self) -> float | None:
        """Global event-time watermark (grace applied), or None while unknown."""
        held: list[float] = []
        seen: list[float] = []
        for p in self._parts.values():
            if p.max_ts is None:
                if not p.caught_up:
                    return None  # unread data of unknown time: hold everything back
                continue
            seen.append(p.max_ts)
            if not p.caught_up:
                held.append(p.max_ts)
        if held:
            return min(held) - self._cfg.grace_s
        if seen:  # every partition is caught up: none holds the others back
            return max(seen) - self._cfg.grace_s
        return None

    def positions(self) -> dict[str, str]:
        return {k: p.position for k, p in self._parts.items() if p.position is not None}

    def partitions(self) -> dict[str, dict[str, Any]]:
        """A JSON-able view for /status."""
        return {
            k: {
                "position": p.position,
                "max_event_time": p.max_ts,
                "caught_up": p.caught_up,
                "open_windows": sum(len(w) for w in p.windows.values()),
            }
            for k, p in self._parts.items()
        }

    def snapshot(self, partitions: Iterable[str] | None = None) -> list[PartitionCheckpoint]:
        """Serialise the state of these partitions (all by default) for a checkpoint."""
        keys = (
            list(self._parts) if partitions is None else [k for k in partitions if k in self._parts]
        )
        out = []
        for k in keys:
            p = self._parts[k]
            body = {
                "format": STATE_FORMAT,
                "max_ts": p.max_ts,
                "closed_until": None if self._closed_until == _NEG_INF else self._closed_until,
                "windows": [
                    [start, name, func, acc]
                    for start, keyed in p.windows.items()
                    for (name, func), acc in keyed.items()
                ],
            }
            out.append(PartitionCheckpoint(k, p.position, orjson.dumps(body)))
        return out

    def restore(self, checkpoints: Sequence[PartitionCheckpoint]) -> None:
        """Adopt partitions (newly assigned), with their stored state when there is one."""
        # restored windows get a full idle period before the quiet rule may flush them
        self._last_message = self._clock.monotonic()
        for cp in checkpoints:
            old = self._parts.pop(cp.partition, None)
            if old is not None:
                self._open -= sum(len(w) for w in old.windows.values())
            p = _Partition(position=cp.position)
            if cp.state:
                body = orjson.loads(cp.state)
                if body.get("format") != STATE_FORMAT:
                    raise ValueError(
                        f"checkpoint of {cp.partition!r} has state format {body.get('format')!r}; "
                        f"this version reads format {STATE_FORMAT}"
                    )
                p.max_ts = body["max_ts"]
                if body["closed_until"] is not None:
                    self._closed_until = max(self._closed_until, body["closed_until"])
                for start, name, func, acc in body["windows"]:
                    p.windows.setdefault(start, {})[(name, func)] = acc
                    self._open += 1
            self._parts[cp.partition] = p
        self._metrics.set_open_windows(self._open)

    def release(self, partitions: Iterable[str]) -> list[PartitionCheckpoint]:
        """Give partitions up (revoked): return their final snapshot and forget them."""
        keys = [k for k in partitions if k in self._parts]
        snap = self.snapshot(keys)
        for k in keys:
            p = self._parts.pop(k)
            self._open -= sum(len(w) for w in p.windows.values())
        self._metrics.set_open_windows(self._open)
        return snap

    # -- processing -------------------------------------------------------------------
    def process(self, batch: SourceBatch) -> Outputs:
        """Aggregate one batch; returns dead letters and any windows it closed."""
        part = self._parts.get(batch.partition)
        if part is None:
            part = self._parts[batch.partition] = _Partition()
        out = Outputs()
        if batch.records:
            self._last_message = self._clock.monotonic()
            self._aggregate(part, batch, out)
        if batch.next_position is not None:
            part.position = batch.next_position
        part.caught_up = batch.caught_up
        self._close_ready(out)
        return out

    def tick(self) -> Outputs:
        """Called about once a second: flushes every open window after a quiet period
        of ``idle_timeout`` (no message at all received), so idle streams still emit."""
        out = Outputs()
        quiet = self._clock.monotonic() - self._last_message
        if self._open and quiet >= self._cfg.effective_idle_timeout_s:
            latest = max(s for p in self._parts.values() for s in p.windows)
            log.info("no message for %.1fs: flushing %d open window(s)", quiet, self._open)
            self._emit_through(latest + self._interval, out)
        return out

    def _aggregate(self, part: _Partition, batch: SourceBatch, out: Outputs) -> None:
        """The hot loop: no awaits, no logging, no per-event objects beyond the decoded
        event and its key, names bound to locals. Its results must equal the reference
        path's (``tests/unit/test_decode_fast.py`` compares them on generated input)."""
        interval = self._interval
        grace = self._cfg.grace_s
        windows = part.windows
        # Lateness must not depend on where batch boundaries fall (a replay after a crash
        # batches differently): the close boundary advances event by event, as if each
        # event were its own batch. Other partitions cannot move during this batch.
        cap, blocked = self._others_limit(part)
        closed_until = self._closed_until
        budget = self._cfg.max_open_windows
        open_now = self._open
        now = self._clock.now()
        max_ts = now + self._cfg.max_future_s
        max_bytes = self._max_bytes
        part_max = _NEG_INF if part.max_ts is None else part.max_ts
        floor = math.floor
        new_acc = _NEW
        add_acc = _ADD
        canon = CANONICAL_FUNCS
        sum_, avg_, min_, max_ = canon["sum"], canon["avg"], canon["min"], canon["max"]
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
        accepted = late = 0
        rejects: dict[str, int] = {}
        for idx, record in enumerate(batch.records):
            raws: list[Any] | None = None
            evs: Sequence[WireEvent] | None = None
            if type(record) is bytes:
                if len(record) > max_bytes:
                    detail = f"message of {len(record)} bytes exceeds {max_bytes}"
                    self._reject(out, rejects, batch, idx, record, "too_large", detail, now)
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
                        if all(fast_ok(e, max_ts) for e in many):
                            evs = many
            if evs is None:
                evs, raws = self._reference(record, idx, batch, out, rejects, max_ts, now)
            for ev in evs:
                name = ev.name
                func = canon[ev.agg_func]
                value = ev.value
                ts: float = ev.timestamp  # type: ignore[assignment]  # a float by now
                q = ts / interval
                if not q_lo <= q < q_hi:
                    k = floor(q)
                    start = k * interval
                    if start + interval <= closed_until:
                        late += 1
                        raw = _raw_of(ev, evs, raws, record)
                        detail = f"window starting {start} was already emitted"
                        self._reject(out, rejects, batch, idx, raw, "late", detail, now)
                        continue
                    got = windows.get(start)
                    if got is None:
                        got = windows[start] = {}
                    keyed = got
                    q_lo = float(k)
                    q_hi = q_lo + 1.0
                key = (name, func)
                acc = keyed.get(key)
                if acc is None:
                    if open_now >= budget:
                        raw = _raw_of(ev, evs, raws, record)
                        self._reject(out, rejects, batch, idx, raw, "cardinality_limit",
                                     f"{budget} open windows reached", now)  # fmt: skip
                        continue
                    keyed[key] = new_acc[func](value, ts)
                    open_now += 1
                elif func is sum_ or func is avg_:  # the common functions inlined
                    # functions._sum_add: count, Neumaier-compensated sum
                    acc[0] += 1
                    s = acc[1]
                    t = s + value
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
                    add_acc[func](acc, value, ts)
                if ts > part_max:
                    part_max = ts
                    if not blocked:
                        x = ((ts if ts < cap else cap) - grace) / interval
                        if x >= x_next:
                            k = floor(x)
                            x_next = k + 1.0
                            edge = k * interval
                            if edge > closed_until:
                                closed_until = edge
                                q_lo = q_hi = 0.0
                accepted += 1
        self._open = open_now
        if part_max != _NEG_INF:
            part.max_ts = part_max
        metrics = self._metrics
        metrics.on_events_aggregated(accepted)
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
    ) -> tuple[list[WireEvent], list[Any]]:
        """The reference path for one message: dead-letters what is invalid, with its
        exact reason, and returns the valid events and their raw elements."""
        if type(record) is bytes:
            try:
                decoded = loads_message(record)
            except Rejected as exc:
                self._reject(out, rejects, batch, idx, record, exc.reason, exc.detail, now)
                return [], []
        else:
            decoded = record
        items = decoded if type(decoded) is list else [decoded]
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
        return evs, raws

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
    ) -> None:
        counts[reason] = counts.get(reason, 0) + 1
        source = batch.source
        if batch.offsets is not None:
            source = f"{source} offset={batch.offsets[idx]}"
        out.dead_letters.append(DeadLetter(raw_text(raw), reason, detail, source, now))

    def _others_limit(self, part: _Partition) -> tuple[float, bool]:
        """(cap, blocked): the watermark the other partitions allow while ``part``
        delivers, and whether one of them holds everything back."""
        cap = math.inf
        for q in self._parts.values():
            if q is part or q.caught_up:
                continue
            if q.max_ts is None:
                return cap, True
            cap = min(cap, q.max_ts)
        return cap, False

    def _close_ready(self, out: Outputs) -> None:
        wm = self.watermark
        if wm is not None:
            self._metrics.set_watermark(wm)
            boundary = closed_boundary(wm, self._interval)
            if boundary > self._closed_until:
                self._emit_through(boundary, out)

    def _emit_through(self, boundary: float, out: Outputs) -> None:
        """Emit every window ending at or before ``boundary``, merged over partitions."""
        interval = self._interval
        ready: dict[float, dict[WindowKey, Acc]] = {}
        for p in self._parts.values():
            for start in [s for s in p.windows if s + interval <= boundary]:
                keyed = p.windows.pop(start)
                self._open -= len(keyed)
                into = ready.get(start)
                if into is None:
                    ready[start] = keyed
                    continue
                for key, acc in keyed.items():
                    mine = into.get(key)
                    if mine is None:
                        into[key] = acc
                    else:
                        FUNCTIONS[key[1]].merge(mine, acc)
        self._closed_until = max(self._closed_until, boundary)
        if not ready:
            return
        now = self._clock.now()
        emitted = [
            Aggregate(name, func, FUNCTIONS[func].result(acc), acc[0], start, start + interval, now)
            for start in sorted(ready)
            for (name, func), acc in ready[start].items()
        ]
        out.aggregates.extend(emitted)
        self._metrics.on_aggregates_emitted(emitted)
        self._metrics.set_open_windows(self._open)
