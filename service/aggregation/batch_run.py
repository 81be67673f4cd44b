"""Applying one batch of a partition: the hot loop and the reference step it falls back on.

The reference step (:meth:`BatchRun.place`) applies one event by the rules as written:
:mod:`service.aggregation.windows` for its window, lateness, aheadness and the close
boundary, :data:`~service.aggregation.functions.FUNCTIONS` for its accumulator. The hot
loop (:meth:`BatchRun.run`) takes only the common event itself: in the window of the
event before it (which it caches), with an inlined accumulator or one of the reference
step's own (a new key: :meth:`BatchRun.new_key`), moving its partition's event time
without moving the close boundary (it caches when that can next move). Everything else
goes to the reference step, so a rule has one definition and the hot loop only caches of
it (``tests/unit/test_window_paths.py`` runs every event through the reference step and
checks that the outputs are the same).

Lateness must not depend on where batch boundaries fall (a replay after a crash batches
differently): the close boundary advances event by event, as if each event were its own
batch. Other partitions cannot move during a batch (only reports move their idleness).

With ``AGGREGATION_GROUP_BY`` set (``tags``), an event's ``name`` holds its series key
(:mod:`service.aggregation.series`) from decoding on, and its name was checked there:
the hot loop is the same, keyed by series. The series budget applies where a key opens
(:meth:`BatchRun.new_key`), so a series over it costs the reference step per event.

A batch of a source that a routing rule names (``marker``: service.aggregation.source_marks) marks
each event's series with its source rule, if it has one, as it is decoded, the name
checked first, as with tags: the hot loop is again the same.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Final, NamedTuple, cast

from service.aggregation.dead_letters import DeadLetters, RawOf, raw_of
from service.aggregation.decode import (
    CANONICAL_FUNCS,
    Rejected,
    WireEvent,
    decode_fast,
    fast_ok,
    loads_message,
    name_fault,
    parse_event,
)
from service.aggregation.functions import FUNCTIONS, SUM_PLAIN_LIMIT, Acc
from service.aggregation.hopping import covering, first_window
from service.aggregation.partition import NEG_INF, PartitionState, WindowKey
from service.aggregation.series import SeriesBudget, TagRule, name_of, series_key
from service.aggregation.windows import (
    close_index,
    event_time_limit,
    is_ahead,
    is_correctable,
    is_late,
    window_index,
)
from service.bus.base import SourceBatch

if TYPE_CHECKING:
    from service.aggregation.source_marks import Marker
    from service.pipeline.flow import Outputs

__all__ = ["BatchRun", "Correction", "Limits"]

# The accumulators by function, looked up at call time (tests wrap entries of them).
_NEW: Final[dict[str, Callable[[float, float], Acc]]] = {k: f.new for k, f in FUNCTIONS.items()}
_ADD: Final[dict[str, Callable[[Acc, float, float], None]]] = {
    k: f.add for k, f in FUNCTIONS.items()
}
_EMPTY: Final[dict[WindowKey, Acc]] = {}  # the window cache holds nothing
# bound at import for the hot loop
_CANON: Final = CANONICAL_FUNCS
_FUNCS: Final = tuple(CANONICAL_FUNCS[f] for f in ("sum", "avg", "min", "max"))  # inlined
_W: Final = SUM_PLAIN_LIMIT
_NW: Final = -SUM_PLAIN_LIMIT


def _checked(many: list[WireEvent]) -> list[WireEvent]:
    """A tagged run's list message: :meth:`BatchRun.fast_tagged` checked it."""
    return many


class Limits(NamedTuple):
    """The per-batch constants of a run (from the config and the clock)."""

    interval: float
    grace: float
    budget: int  # open windows (keys) at most
    max_ts: float  # the latest acceptable event time
    # Further ahead of the clock than this, an event is aggregated but moves no event
    # time ("ahead", service.aggregation.partition): one bad clock must not close the
    # windows that on-time events are still arriving for. The only clock-dependent
    # judgement here: a replay runs later, so it finds the same events ahead or
    # fewer, never more (docs/aggregation.md, "Replays stay exact").
    lead_cap: float
    max_bytes: int
    max_elements: int
    # The window length; ``interval`` is the pane's, which is shorter with
    # AGGREGATION_HOP (service.aggregation.hopping): a late event misses every window
    # covering its pane. Equal to ``interval`` for tumbling windows.
    reach: float


class Correction(NamedTuple):
    """A late event within the allowed lateness of its emitted window, found by the run
    and applied after the batch's windows have closed (a window this batch closed is
    emitted first, then corrected: as if each record were its own batch), in record
    order (:mod:`service.aggregation.corrections`)."""

    idx: int  # its record (message) in the batch: one revision per record and key
    start: float  # its window's, or with hopping windows its pane's
    key: WindowKey
    event: WireEvent
    raw: RawOf  # for a dead letter (overflow)
    # hopping windows (hop_corrections.py): the partition's emitted boundary at the
    # event (the windows covering its pane that were out then get a revision)
    boundary: float = NEG_INF


class BatchRun:
    """One batch of one partition being applied; ``run()`` once, then read the results."""

    def __init__(
        self,
        part: PartitionState,
        batch: SourceBatch,
        out: Outputs,
        dead: DeadLetters,
        limits: Limits,
        *,
        now: float,
        open_now: int,
        others: tuple[float, bool],
        idle_s: float,
        tags: TagRule | None = None,
        lateness: float = 0.0,
        marker: Marker | None = None,
    ) -> None:
        self.part, self.batch, self.out, self.dead, self.limits = part, batch, out, dead, limits
        self.now = now
        self.open_now = open_now
        # (cap, blocked): the event time the other holding partitions allow, and
        # whether one of them holds everything back
        self.cap, self.blocked = others
        self.idle_s = idle_s
        self.closed_until = part.closed_until
        # The close boundary is floor(x) * interval, x = (event time - grace) / interval;
        # it cannot move until x reaches x_next.
        self.x_next = NEG_INF
        self.ahead = self.accepted = self.received = 0
        self.ahead_max = NEG_INF if part.ahead_ts is None else part.ahead_ts
        self.part_max = NEG_INF if part.max_ts is None else part.max_ts
        self.rejects: dict[str, int] = {}
        self.tags = tags
        self.overflowed = 0  # events aggregated into an overflow series
        if tags is not None:
            self.key_of = tags.fast_key
            self.wire, self.decode_tagged = tags.wire, tags.decode
            if part.series is None:
                part.series = SeriesBudget.of(part.windows)
        self.lateness = lateness  # AGGREGATION_ALLOWED_LATENESS
        self.marker = marker  # series -> its marked series (service.aggregation.source_marks)
        # hopping windows: new keys take the packed panes' equal key (panes.KeyTable)
        self.canon = None if part.packed is None else part.packed.table.canonical
        self.corrections: list[Correction] = []
        if part.routed is not None:
            part.routed.limit(idle_s, part.reported_at)  # time and reports may have moved it

    # -- the hot loop: names bound to locals; ``lo``, ``hi``, ``keyed``: the window cache
    def run(self) -> None:
        interval, grace, _, max_ts, lead_cap, max_bytes, _, _ = self.limits
        canon, big, nbig, sum_, avg_, min_, max_ = _CANON, _W, _NW, *_FUNCS
        place, cap, blocked, accepted, received = self.place, self.cap, self.blocked, 0, 0
        if self.tags is None:
            one: type[WireEvent] = WireEvent
            fast: Callable[[bytes], Any] = decode_fast
            fast_all: Callable[[list[WireEvent]], list[WireEvent] | None] = self.fast_all
        else:  # names checked and series keys made by fast_tagged
            one, fast, fast_all = self.tags.wire, self.fast_tagged, _checked
        if self.marker is not None:  # names checked and series marked by fast_marked
            fast, fast_all = self.fast_marked, _checked
        keyed, lo, hi, part_max, x_next = _EMPTY, 0.0, 0.0, self.part_max, self.x_next
        for idx, record in enumerate(self.batch.records):
            evs: Sequence[WireEvent] | None = None
            raws: list[Any] | None = None
            if type(record) is bytes and len(record) <= max_bytes:
                try:
                    d = fast(record)
                except Exception:  # any refusal: the reference decoder decides
                    d = None
                if type(d) is one:  # fast_ok(), inlined but for the name (see it)
                    t = d.timestamp
                    if type(t) is float and 0.0 <= t <= max_ts and d.agg_func in canon:
                        evs = (d,)
                elif d is not None:
                    evs = fast_all(cast(list[WireEvent], d))
            if evs is None:
                evs, raws = self.decode(idx, record)
            else:
                received += len(evs)
            for ev in evs:
                ts: float = ev.timestamp  # type: ignore[assignment]  # a float by now
                q = ts / interval
                func = canon[ev.agg_func]
                if not lo <= q < hi:  # another window, or routed input (never cached)
                    part_max, x_next, lo, hi, keyed = place(idx, record, evs, raws, ev, part_max)
                    continue
                value = ev.value
                acc = keyed.get((ev.name, func))
                if acc is None:
                    if not self.new_key(idx, record, evs, raws, ev, keyed):
                        continue
                elif (func is sum_ or func is avg_) and nbig <= (u := (s := acc[1]) + value) <= big:
                    acc[0] += 1  # functions._sum_plain_add, inlined: not near the limit
                    if (s if s >= 0.0 else -s) >= (value if value >= 0.0 else -value):
                        acc[2] += (s - u) + value
                    else:
                        acc[2] += (value - u) + s
                    acc[1] = u
                elif func is min_ or func is max_:
                    acc[0] += 1
                    if (value < acc[1]) if func is min_ else (value > acc[1]):
                        acc[1] = value
                elif not self.add(idx, record, evs, raws, ev, acc):
                    continue
                accepted += 1
                if part_max < ts <= lead_cap:  # moves the event time (windows.is_ahead)
                    part_max = ts
                    if not blocked and ((ts if ts < cap else cap) - grace) / interval >= x_next:
                        x_next, moved = self.close_with(ts)
                        if moved:
                            lo = hi = 0.0
                elif ts > part_max:
                    self.on_ahead(ts)
        self.done(part_max, x_next, accepted, received)

    def run_reference(self) -> None:
        """What :meth:`run` must equal: every message through the reference decoder and
        every event through the reference step (``tests/unit/test_window_paths.py``)."""
        part_max = self.part_max
        for idx, record in enumerate(self.batch.records):
            evs, raws = self.decode(idx, record)
            for ev in evs:
                part_max = self.place(idx, record, evs, raws, ev, part_max)[0]
        self.part_max = part_max

    def done(self, part_max: float, x_next: float, accepted: int, received: int) -> None:
        """The hot loop's locals back into the run."""
        self.part_max, self.x_next = part_max, x_next
        self.accepted += accepted
        self.received += received

    def fast_all(self, many: list[WireEvent]) -> list[WireEvent] | None:
        """A fast-decoded array message, when every element passes :func:`fast_ok`."""
        lim = self.limits
        if len(many) <= lim.max_elements and all(fast_ok(e, lim.max_ts) for e in many):
            return many
        return None

    def fast_tagged(self, record: bytes) -> Any:
        """The fast decoder of a tagged run (decode.tagged_decoder): each event's name
        checked and replaced by its series key; None (or a raise) when the reference
        decoder must decide. A list has passed :meth:`fast_all` (a single event gets the
        hot loop's checks)."""
        d = self.decode_tagged(record)
        key_of = self.key_of
        if type(d) is self.wire:
            series = key_of(d.name, d.tags)  # type: ignore[attr-defined]  # the tagged type
            if series is None:
                return None
            d.name = series
            return d
        many = self.fast_all(cast(list[WireEvent], d))
        if many is None:
            return None
        keys = [key_of(e.name, e.tags) for e in many]  # type: ignore[attr-defined]
        if None in keys:
            return None
        for e, key in zip(many, keys, strict=True):
            e.name = cast(str, key)
        return many

    def fast_marked(self, record: bytes) -> Any:
        """The fast decoder of a run with a ``marker``: each event's series marked,
        its name checked before (a marked name holds a control character); None when
        the reference decoder must decide. A list has passed :meth:`fast_all`."""
        marker = cast("Marker", self.marker)
        known = marker.known  # a series seen before: its name was checked then
        if self.tags is not None:
            d = self.fast_tagged(record)  # names checked, series keys made
            if d is None:
                return None
            if type(d) is self.wire:
                d.name = known(d.name) or marker(d.name)
                return d
        else:
            d = decode_fast(record)
            if type(d) is WireEvent:
                name = d.name
                got = known(name)
                if got is None:
                    if not name.isprintable() and name_fault(name) is not None:
                        return None
                    got = marker(name)
                d.name = got
                return d
            d = self.fast_all(cast(list[WireEvent], d))
            if d is None or any(
                not e.name.isprintable() and name_fault(e.name) is not None for e in d
            ):
                return None
        for e in d:
            e.name = known(e.name) or marker(e.name)
        return d

    # -- the reference step -------------------------------------------------------------
    def place(
        self,
        idx: int,
        record: Any,
        evs: Sequence[WireEvent],
        raws: list[Any] | None,
        ev: WireEvent,
        part_max: float,
    ) -> tuple[float, float, float, float, dict[WindowKey, Acc]]:
        """Apply one event by the rules as written. Takes the hot loop's event time and
        returns its state: event time, x_next and the window cache (the event's window,
        or none when it was refused, the close boundary moved or the input is routed:
        there every event moves the slowest input partition's event time)."""
        ts: float = ev.timestamp  # type: ignore[assignment]  # a float by now
        k = window_index(ts, self.limits.interval)
        keyed = self._accumulate(idx, record, evs, raws, ev, k * self.limits.interval, part_max)
        if keyed is None:
            return part_max, self.x_next, 0.0, 0.0, _EMPTY
        self.accepted += 1
        closed_until = self.closed_until
        part_max = self._advance(idx, ts, part_max)
        if self.closed_until != closed_until or self.part.routed is not None:
            return part_max, self.x_next, 0.0, 0.0, _EMPTY
        return part_max, self.x_next, float(k), k + 1.0, keyed

    def _accumulate(
        self,
        idx: int,
        record: Any,
        evs: Sequence[WireEvent],
        raws: list[Any] | None,
        ev: WireEvent,
        start: float,
        part_max: float,
    ) -> dict[WindowKey, Acc] | None:
        """Add the event to the accumulator of its window (which starts at ``start``);
        returns that window, or None when the event was refused (dead-lettered). A name
        is checked when its event would open a window or a key, or be refused, before
        any state changes (see decode.fast_ok): an open key holds a checked name, so
        the common event pays nothing."""
        ts: float = ev.timestamp  # type: ignore[assignment]  # a float by now
        windows = self.part.windows
        if is_late(start, self.limits.interval, self.closed_until, self.part.ahead_closed):
            if not self._bad_name(idx, record, evs, raws, ev):
                self._late(idx, record, evs, raws, ev, start, part_max)
            return None
        keyed = windows.get(start)
        if keyed is None:
            # never open a window for an event that is then refused: the reference
            # decoder (which refuses it before) would not have one
            if self._bad_name(idx, record, evs, raws, ev):
                return None
            keyed = windows[start] = {}
        func = CANONICAL_FUNCS[ev.agg_func]
        key = (ev.name, func)
        acc = keyed.get(key)
        if acc is not None:
            try:
                _ADD[func](acc, ev.value, ts)
            except OverflowError as exc:
                self.overflow(idx, record, evs, raws, ev, exc)
                return None
            return keyed
        return keyed if self.new_key(idx, record, evs, raws, ev, keyed) else None

    def new_key(
        self,
        idx: int,
        record: Any,
        evs: Sequence[WireEvent],
        raws: list[Any] | None,
        ev: WireEvent,
        keyed: dict[WindowKey, Acc],
    ) -> bool:
        """Open the event's key in its window (on time, open): False when refused. A
        series over its name's budget goes to the name's overflow series instead."""
        if self._bad_name(idx, record, evs, raws, ev):
            return False
        func = CANONICAL_FUNCS[ev.agg_func]
        series = ev.name
        if self.tags is not None:
            start = window_index(ev.timestamp, self.limits.interval) * self.limits.interval  # type: ignore[arg-type]  # a float by now
            budget = cast(SeriesBudget, self.part.series)
            series = budget.admit(start, series, self.tags.max_series, self.tags.group_by)
            if series is not ev.name:
                acc = keyed.get((series, func))
                if acc is not None:
                    if not self.add(idx, record, evs, raws, ev, acc):
                        return False
                    self.overflowed += 1
                    return True
        if self.open_now >= self.limits.budget:
            detail = f"{self.limits.budget} open windows reached"
            self._reject(idx, RawOf(ev, evs, raws, record), "cardinality_limit", detail)
            return False
        key = (series, func) if self.canon is None else self.canon((series, func))
        keyed[key] = _NEW[func](ev.value, ev.timestamp)  # type: ignore[arg-type]
        self.open_now += 1
        if series is not ev.name:
            self.overflowed += 1
        elif self.tags is not None:
            # counted once its key is open: the budget state is what the windows hold,
            # so a restart from a checkpoint derives the same one
            budget.record(start, series)
        return True

    def _advance(self, idx: int, ts: float, part_max: float) -> float:
        """The event-time step: the partition's own event time (or with repartitioned
        input its slowest input partition's) moves the close boundary."""
        lead_cap = self.limits.lead_cap
        routed = self.part.routed
        if ts > part_max:
            if is_ahead(ts, lead_cap):
                self.on_ahead(ts)
            else:
                part_max = ts
                if routed is None and not self.blocked:
                    self.close_with(ts)
        if routed is not None:
            origins = self.batch.origins or []
            on_time = None if is_ahead(ts, lead_cap) else ts
            slowest = routed.on_event(origins[idx][0], on_time, self.part.reported_at, self.idle_s)
            if slowest is not None and not self.blocked:
                self.close_with(slowest)
        return part_max

    def close_with(self, event_time: float) -> tuple[float, bool]:
        """Move the close boundary to what ``event_time`` allows; returns x_next and
        whether the boundary moved."""
        lim = self.limits
        k = close_index(event_time_limit(event_time, self.cap), lim.grace, lim.interval)
        if k + 1.0 > self.x_next:
            self.x_next = k + 1.0
        edge = k * lim.interval
        if edge > self.closed_until:
            self.closed_until = edge
            return self.x_next, True
        return self.x_next, False

    def on_ahead(self, ts: float) -> None:
        self.ahead += 1
        if ts > self.ahead_max:
            self.ahead_max = ts

    # -- decoding and refusals ----------------------------------------------------------
    def decode(self, idx: int, record: Any) -> tuple[Sequence[WireEvent], list[Any] | None]:
        """The reference decoder for one message: dead-letters what is invalid, with its
        exact reason, and returns the valid events and their raw elements; counts the
        events the message held (the ledger's "received")."""
        lim = self.limits
        if type(record) is bytes:
            if len(record) > lim.max_bytes:
                detail = f"message of {len(record)} bytes exceeds {lim.max_bytes}"
                self._reject(idx, record, "too_large", detail)
                self.received += 1
                return (), None
            try:
                decoded = loads_message(record)
            except Rejected as exc:
                self._reject(idx, record, exc.reason, exc.detail)
                self.received += 1
                return (), None
        else:
            decoded = record
        items = decoded if type(decoded) is list else [decoded]
        self.received += len(items)
        if len(items) > lim.max_elements:
            cap, held = lim.max_elements, len(items)
            detail = (
                f"{held - cap} elements past the first {cap} of a {held}-element message "
                "(VABUS_MAX_EVENTS_PER_MESSAGE); raw is the message"
            )
            self._reject(idx, record, "too_large", detail, held - cap)
            items = items[:cap]
        evs: list[WireEvent] = []
        raws: list[Any] = []
        tags = self.tags
        for item in items:
            try:
                name, func, value, ts = parse_event(item, lim.max_ts)
                if tags is not None:  # the event's name becomes its series key
                    name = series_key(name, item.get("tags"), tags.group_by)
                if self.marker is not None:
                    name = self.marker(name)
            except Rejected as exc:
                self._reject(idx, item, exc.reason, exc.detail)
                continue
            evs.append(WireEvent(name, value, ts, func))
            raws.append(item)
        return evs, raws

    def add(
        self,
        idx: int,
        record: Any,
        evs: Sequence[WireEvent],
        raws: list[Any] | None,
        ev: WireEvent,
        acc: Acc,
    ) -> bool:
        """An accumulator the hot loop does not inline; False when it refused the event."""
        try:
            _ADD[CANONICAL_FUNCS[ev.agg_func]](acc, ev.value, ev.timestamp)  # type: ignore[arg-type]  # a float by now
        except OverflowError as exc:
            self.overflow(idx, record, evs, raws, ev, exc)
            return False
        return True

    def overflow(
        self,
        idx: int,
        record: Any,
        evs: Sequence[WireEvent],
        raws: list[Any] | None,
        ev: WireEvent,
        exc: OverflowError,
    ) -> None:
        self._reject(idx, raw_of(ev, evs, raws, record), "overflow", str(exc))

    def _late(
        self,
        idx: int,
        record: Any,
        evs: Sequence[WireEvent],
        raws: list[Any] | None,
        ev: WireEvent,
        start: float,
        part_max: float,
    ) -> None:
        """An event for an emitted window: a correction while the window is correctable
        by its partition's watermark at this event (event by event, so the same records
        give the same decisions however they are batched), else dead-lettered."""
        lim = self.limits
        # hopping windows (hop_corrections.py): the pane's first window decides, the one
        # whose correction time ends first, so that a pane holds no event that one of
        # the windows covering it must lack
        hop = lim.reach != lim.interval
        judged = first_window(start, lim.interval, lim.reach) if hop else start
        if self.lateness and is_correctable(
            judged, lim.reach, part_max - lim.grace, self.lateness, self.part.kept_from
        ):
            key = (ev.name, CANONICAL_FUNCS[ev.agg_func])
            raw = RawOf(ev, evs, raws, record)
            self.corrections.append(Correction(idx, start, key, ev, raw, self.closed_until))
            return
        self._late_for(ev, start)
        detail = f"window starting {start} was already emitted"
        self._reject(idx, RawOf(ev, evs, raws, record), "late", detail)

    def _late_for(self, ev: WireEvent, start: float) -> None:
        """Count ``ev`` late, per name, for each window it misses: its window, or with
        hopping windows each window covering its pane (``start``; hopping.py)."""
        name, func = name_of(ev.name), CANONICAL_FUNCS[ev.agg_func]
        late_windows = self.part.late_windows
        for s in covering(start, self.limits.interval, self.limits.reach):
            late_windows[(name, func, s)] = late_windows.get((name, func, s), 0) + 1

    def _bad_name(
        self,
        idx: int,
        record: Any,
        evs: Sequence[WireEvent],
        raws: list[Any] | None,
        ev: WireEvent,
    ) -> bool:
        """Dead-letter ``ev`` as ``invalid_name`` if its name may not be stored (the
        fast path's share of :func:`parse_event`'s name rule), and say whether it did.
        A tagged or marking run checked every name when it made the series key."""
        if self.tags is not None or self.marker is not None:
            return False
        fault = name_fault(ev.name)
        if fault is None:
            return False
        self._reject(idx, raw_of(ev, evs, raws, record), "invalid_name", fault)
        return True

    def _reject(self, idx: int, raw: Any, reason: str, detail: str, n: int = 1) -> None:
        self.dead.reject(self.out, self.rejects, self.batch, idx, raw, reason, detail, self.now, n)
