"""One input partition's share of the aggregator: open windows, event-time progress,
what it has emitted, and the idleness rule that decides whether it holds the watermark.

The idleness rule (docs/aggregation.md, "Worked example", shows it at work):

* A partition that has delivered events holds the watermark at its own largest event
  time minus the grace.
* It stops holding once the bus has *looked* at it and found nothing unread, at least
  ``idle_timeout`` after its last message of any kind (valid, invalid or late). Both
  times are the bus's, taken when it polled, so a stage held up by a slow output never
  mistakes the backlog for silence: while intake is blocked there are no fresh
  reports, and a partition keeps holding.
* Reading up to the high watermark of one fetch never releases it: that fetch carried
  a message, so the quiet period starts again.
* A partition that never delivered holds everything back while it has unread data (its
  event time is unknown) and never holds when it has nothing unread.

A partition of repartitioned input (``routed``) holds the watermark per input partition
instead, with the same rule applied where the input is read
(:mod:`service.aggregation.origins`).

Clock skew: an event more than ``AGGREGATION_MAX_WATERMARK_LEAD`` ahead of the service
clock when it is aggregated is *ahead*: it joins its window but does not move the
partition's event time (``max_ts`` is the largest event time that was not ahead), so one
bad producer clock cannot make every on-time event after it late. Its window closes
when the partition's event time reaches it (time catches up) or by the quiet rule; a
window the quiet rule emits above the partition's event time is remembered in
``ahead_closed`` (the emitted boundary stays where the on-time data is), so later events
for it are late while on-time events below it are not.

The emitted boundary (``closed_until``) belongs to the partition and travels in its
checkpoint, so a partition that moves to another instance is judged against its own
past, never against the boundary of the partitions it meets there.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final

import orjson

from service.aggregation import kept as kept_windows
from service.aggregation import rollups as rollup_partials
from service.aggregation.functions import FUNCTIONS, Acc, valid
from service.aggregation.kept import KeptWindows
from service.aggregation.origins import RoutedTime
from service.aggregation.panes import PackedPanes
from service.aggregation.percentiles import PERCENTILES, v13_layout
from service.aggregation.rollups import ROLLUP_STATE_FORMAT, RollupPartials
from service.aggregation.series import SeriesBudget, is_plain, valid_series
from service.aggregation.windows import is_idle
from service.bus.base import SourceBatch
from service.checkpoints.base import PartitionCheckpoint

__all__ = [
    "HOP_LATE_STATE_FORMAT",
    "HOP_STATE_FORMAT",
    "NEG_INF",
    "STATE_FORMAT",
    "V13_STATE_FORMAT",
    "WIDE_STATE_FORMAT",
    "Dropped",
    "PartitionState",
    "WindowKey",
]

STATE_FORMAT: Final = 1
"""Version 1 since the first release; ``closed_until`` has been per partition since
v1.2, older checkpoints carried the instance's boundary there, which is a safe (never
later) value for the partition too."""
WIDE_STATE_FORMAT: Final = 2
"""A state holding an accumulator in a layout added in v1.3 for values near the double
limit (a 4th element: ``sum``/``avg`` multiples of 2**1000, a scaled ``stddev``). Only
such states get it, so that a release before it, which would misread them, refuses them
(naming the format) and every other state stays readable by it."""
V13_STATE_FORMAT: Final = 3
"""A state holding what a release before 1.3 would misread: a DDSketch percentile state
(its layout looks like the older hand-written sketch's), or a series with tags (a key
``name + "\x1f" + tags``, see :mod:`service.aggregation.series`) that such a release
would emit as a name. Those releases refuse it; it reads wide accumulators too."""
HOP_STATE_FORMAT: Final = 4
"""A state holding panes of hopping windows (AGGREGATION_HOP, service.aggregation.hopping):
a release before them would read each pane as a tumbling window of the interval."""
HOP_LATE_STATE_FORMAT: Final = 5
"""A state of hopping windows holding kept panes or revisions of emitted windows
(AGGREGATION_ALLOWED_LATENESS with AGGREGATION_HOP, service.aggregation.hop_corrections):
a release before them would drop those and emit a correction as a new revision 1."""
READ_FORMATS: Final = frozenset(
    {
        STATE_FORMAT,
        WIDE_STATE_FORMAT,
        V13_STATE_FORMAT,
        HOP_STATE_FORMAT,
        ROLLUP_STATE_FORMAT,
        HOP_LATE_STATE_FORMAT,
    }
)
NEG_INF: Final = -math.inf

WindowKey = tuple[str, str]  # (series, agg_func) inside one window start (series.py)
_LATE_WINDOWS_KEPT: Final = 10_000  # per partition: late counts of the newest windows


@dataclass(slots=True)
class PartitionState:
    windows: dict[float, dict[WindowKey, Acc]] = field(default_factory=dict)
    max_ts: float | None = None  # largest event time accepted, ahead events aside
    ahead_ts: float | None = None  # largest event time of the ahead events (not in max_ts)
    # starts of windows above ``max_ts`` that the quiet rule emitted (ahead events' windows)
    ahead_closed: set[float] = field(default_factory=set)
    closed_until: float = NEG_INF  # windows ending at or before this were emitted
    position: str | None = None
    caught_up: bool = False  # at the last report, nothing was unread
    last_message_at: float = 0.0  # bus monotonic time of the last batch with messages
    reported_at: float = 0.0  # bus monotonic time of the last batch of any kind
    lag: int | None = None  # messages unread at the last report, when the bus knows
    # repartitioned input: the last (offset, element) delivered from each input partition
    origins: dict[str, tuple[int, int]] = field(default_factory=dict)
    # repartitioned input: event time held per input partition (None: a direct partition)
    routed: RoutedTime | None = None
    # the ledger (checkpointed, so it stays exact across restarts): cumulative counts,
    # the same per interval of receipt (the newest two kept here; older ones are final
    # and already written), and late events per emitted window
    totals: dict[str, int] = field(default_factory=dict)
    intervals: dict[float, dict[str, int]] = field(default_factory=dict)
    late_windows: dict[tuple[str, str, float], int] = field(default_factory=dict)
    # AGGREGATION_GROUP_BY set: the tag sets open per window and name (the series
    # budget), derived from ``windows`` on first use, so never checkpointed
    series: SeriesBudget | None = None
    # AGGREGATION_ALLOWED_LATENESS > 0: this partition's shares of emitted windows, kept
    # for corrections (service.aggregation.kept); windows starting before ``kept_from``
    # were emitted without being kept; late events applied as corrections per window
    kept: KeptWindows = field(default_factory=dict)
    kept_from: float = NEG_INF
    late_applied: dict[tuple[str, str, float], int] = field(default_factory=dict)
    # AGGREGATION_ROLLUPS set: this partition's partials of open rollup windows
    # (service.aggregation.rollups), checkpointed as ``rollups``
    rollups: RollupPartials = field(default_factory=dict)
    # and, with the allowed lateness above 0, its shares of emitted rollup windows
    kept_rollups: dict[float, KeptWindows] = field(default_factory=dict)
    # AGGREGATION_HOP: the panes the emitted boundary passed whose windows are not all
    # out, packed (service.aggregation.panes); ``windows`` holds the others
    packed: PackedPanes | None = None
    # and with the allowed lateness above 0: the panes whose windows are all out, kept
    # packed (same key table) for corrections, and the revision last emitted per
    # corrected window (service.aggregation.hop_corrections), both checkpointed
    kept_panes: PackedPanes | None = None
    hop_revisions: dict[tuple[float, WindowKey], int] = field(default_factory=dict)

    # -- the ledger ---------------------------------------------------------------------
    def count(
        self, interval_start: float, received: int, aggregated: int, rejects: dict[str, int]
    ) -> None:
        """Count one batch: events received, aggregated, late and rejected by reason."""
        bucket = self.intervals.get(interval_start)
        if bucket is None:
            bucket = self.intervals[interval_start] = {}
        for target in (self.totals, bucket):
            target["received"] = target.get("received", 0) + received
            target["aggregated"] = target.get("aggregated", 0) + aggregated
            for reason, n in rejects.items():
                key = "late" if reason == "late" else f"rejected:{reason}"
                target[key] = target.get(key, 0) + n

    def on_series_overflow(self, events: int) -> None:
        """``events`` of this batch were aggregated into an overflow series (a count
        within ``aggregated``, kept in the ledger for /status)."""
        self.totals["series_overflow"] = self.totals.get("series_overflow", 0) + events

    def on_emitted(self, keyed: dict[WindowKey, Acc]) -> None:
        self.on_emitted_events(sum(a[0] for a in keyed.values()))

    def on_emitted_events(self, events: int) -> None:
        self.totals["emitted"] = self.totals.get("emitted", 0) + events

    def on_corrected(
        self,
        interval_start: float,
        applied: dict[tuple[str, str, float], int],
        *,
        events: int | None = None,
        emitted: int | None = None,
    ) -> None:
        """Count late events applied to emitted windows (``late_applied``, per interval of
        receipt and per window). They are emitted once, with the revision they are in:
        ``emitted`` counts them, not the whole window again. Hopping windows
        (hop_corrections.py) give ``events`` (one event reaches several windows) and
        ``emitted``: those added to a pane still open are counted with it."""
        n = sum(applied.values()) if events is None else events
        bucket = self.intervals.setdefault(interval_start, {})
        for target in (self.totals, bucket):
            target["late_applied"] = target.get("late_applied", 0) + n
        self.totals["emitted"] = self.totals.get("emitted", 0) + (n if emitted is None else emitted)
        per_window = self.late_applied
        for key, c in applied.items():
            per_window[key] = per_window.get(key, 0) + c

    def ledger_totals(self) -> dict[str, int]:
        """Cumulative counts plus ``open``: the events in this partition's open windows."""
        view = dict(self.totals)
        view["open"] = sum(acc[0] for keyed in self.windows.values() for acc in keyed.values())
        if self.packed is not None:
            view["open"] += self.packed.events()
        return view

    def _ledger_body(self) -> dict[str, Any]:
        return {  # copies: the checkpoint must not see counts that come after it
            "totals": dict(self.totals),
            "intervals": {repr(k): dict(v) for k, v in self.intervals.items()},
            "late_windows": [[n, f, s, c] for (n, f, s), c in self.late_windows.items()],
            **(
                {"late_applied": [[n, f, s, c] for (n, f, s), c in self.late_applied.items()]}
                if self.late_applied
                else {}
            ),
        }

    def on_durable(self, ledger: Mapping[str, Any]) -> None:
        """A checkpoint of this partition with ``ledger`` is durable: forget what it
        wrote for good. Intervals older than its two newest are final (a replay counts
        into the interval it runs in); of the late counts, those beyond the newest
        ``_LATE_WINDOWS_KEPT`` windows. An entry that changed since is kept: the next
        checkpoint writes it again."""
        starts = sorted(float(k) for k in ledger.get("intervals", {}))
        for start in starts[:-2]:
            if self.intervals.get(start) == ledger["intervals"][repr(start)]:
                del self.intervals[start]
        for field_name, counts in (
            ("late_windows", self.late_windows),
            ("late_applied", self.late_applied),
        ):
            late = ledger.get(field_name, [])
            if len(late) > _LATE_WINDOWS_KEPT:
                for n, f, start, c in sorted(late, key=lambda e: e[2])[:-_LATE_WINDOWS_KEPT]:
                    if counts.get((n, f, start)) == c:
                        del counts[(n, f, start)]

    # -- the idleness rule ------------------------------------------------------------
    def idle(self, idle_timeout_s: float) -> bool:
        """Silent: nothing unread, and no message for ``idle_timeout_s`` when last seen."""
        return is_idle(self.caught_up, self.reported_at, self.last_message_at, idle_timeout_s)

    def holds(self, idle_timeout_s: float) -> bool:
        """Whether this partition holds the watermark back (see the module docstring)."""
        if self.routed is not None:
            return self.routed.holds(idle_timeout_s, self.reported_at)
        if self.max_ts is None:
            # no event time yet (events ahead of the clock say nothing of it): it holds
            # while it has unread data, which may be of any time; caught up it holds no
            # one back, or a producer whose clock is far ahead would stall every other
            # source's windows for as long as it sends (§12.8)
            return not self.caught_up
        return not self.idle(idle_timeout_s)

    def held_at(self, idle_timeout_s: float) -> float | None:
        """The event time at which it holds the watermark (when it does): its largest
        event time, or for repartitioned input the slowest input partition's; None while
        that is unknown, which holds everything back."""
        if self.routed is not None:
            return self.routed.limit(idle_timeout_s, self.reported_at)
        return self.max_ts

    def open_windows(self) -> int:
        packed = 0 if self.packed is None else self.packed.keys()
        return packed + sum(len(w) for w in self.windows.values())

    def open_starts(self) -> list[float]:
        """The starts of the open windows (or panes, packed ones too)."""
        starts = list(self.windows)
        return starts if self.packed is None else [*starts, *self.packed.panes]

    def view(self, idle_timeout_s: float, grace_s: float, now_mono: float) -> dict[str, Any]:
        """A JSON-able description for /status and the per-partition metrics."""
        holds = self.holds(idle_timeout_s)
        held = self.held_at(idle_timeout_s)
        if self.routed is not None:
            holding, expected, slowest = self.routed.slowest(idle_timeout_s, self.reported_at)
            why = f"{holding} of {expected} input partitions hold it"
            why += f", the slowest is {slowest}" if slowest is not None else ""
        elif self.max_ts is None and self.ahead_ts is not None:
            why = "delivered only events ahead of the clock (event time unknown)"
            why += ", unread data" if holds else ", nothing unread"
        elif self.max_ts is None:
            why = "unread data of unknown event time" if holds else "nothing delivered yet"
        elif holds:
            why = "delivering" if not self.caught_up else "caught up, not yet idle"
        else:
            why = f"no message for {self.reported_at - self.last_message_at:.1f}s"
        return {
            "position": self.position,
            "max_event_time": self.max_ts,
            "max_event_time_ahead": self.ahead_ts,
            "watermark": None if held is None else held - grace_s,
            "emitted_until": None if self.closed_until == NEG_INF else self.closed_until,
            "holds_watermark": holds,
            "idle": not holds and (self.max_ts is not None or self.ahead_ts is not None),
            "why": why,
            "caught_up": self.caught_up,
            "lag": self.lag,
            "seconds_since_message": max(0.0, now_mono - self.last_message_at),
            "open_windows": self.open_windows(),
            # emitted window keys kept for corrections (AGGREGATION_ALLOWED_LATENESS)
            "kept_windows": sum(len(keyed) for keyed in self.kept.values())
            + (0 if self.kept_panes is None else self.kept_panes.keys()),
            **self._series_view(),
        }

    def _series_view(self) -> dict[str, int]:
        """With AGGREGATION_GROUP_BY set: the series open (tag sets in open windows,
        overflow series aside) and the events put into overflow series so far."""
        if self.series is None:
            return {}
        return {
            "open_series": self.series.open_series(),
            "series_overflow": self.totals.get("series_overflow", 0),
        }

    # -- checkpoint format ------------------------------------------------------------
    def snapshot(
        self, partition: str, *, keeps: bool = False, panes: bool = False
    ) -> PartitionCheckpoint:
        """The checkpoint of this state; changes nothing, since a checkpoint can be given
        up before it is durable (:meth:`on_durable` follows when it is). ``keeps``: the
        allowed lateness is above 0, the kept windows are written; ``panes``: the
        windows are panes of hopping windows."""
        windows: list[list[Any]] = [
            [start, name, func, acc]
            for start, keyed in self.windows.items()
            for (name, func), acc in keyed.items()
        ]
        if self.packed is not None:  # unpacked: the same entries as before packing
            windows += [
                [start, name, func, acc]
                for start in self.packed.panes
                for (name, func), acc in self.packed.entries(start)
            ]
        wide = any(len(w[3]) > 3 for w in windows)
        v13 = any(not is_plain(w[1]) or (w[2] in PERCENTILES and v13_layout(w[3])) for w in windows)
        state_format = V13_STATE_FORMAT if v13 else WIDE_STATE_FORMAT if wide else STATE_FORMAT
        body = {
            "format": HOP_STATE_FORMAT if panes and windows else state_format,
            "max_ts": self.max_ts,
            "closed_until": None if self.closed_until == NEG_INF else self.closed_until,
            "ahead_ts": self.ahead_ts,
            "ahead_closed": sorted(self.ahead_closed),
            "origins": self.origins,
            "routed": None if self.routed is None else self.routed.to_json(),
            "ledger": (ledger := self._ledger_body()),
            "windows": windows,
        }
        if keeps:
            body.update(kept_windows.encode(self.kept, self.kept_from))
            if panes and (hop_body := self._hop_kept_body()):
                body.update(hop_body)
                body["format"] = HOP_LATE_STATE_FORMAT
        if self.rollups and (entries := rollup_partials.encode(self.rollups)):
            body["format"] = ROLLUP_STATE_FORMAT
            body["rollups"] = entries
        if keeps and (kept := rollup_partials.encode_kept(self.kept_rollups)):
            body["format"] = ROLLUP_STATE_FORMAT
            body["kept_rollups"] = kept
        return PartitionCheckpoint(partition, self.position, orjson.dumps(body), ledger=ledger)

    def _hop_kept_body(self) -> dict[str, Any]:
        """The kept panes (unpacked, as windows are) and revisions of hopping windows."""
        body: dict[str, Any] = {}
        kept = self.kept_panes
        if kept is not None and kept.panes:
            body["kept_panes"] = [
                [start, name, func, acc]
                for start in kept.panes
                for (name, func), acc in kept.entries(start)
            ]
        if self.hop_revisions:
            body["hop_revisions"] = [
                [start, name, func, revision]
                for (start, (name, func)), revision in self.hop_revisions.items()
            ]
        return body

    def _restore_hop_kept(self, body: dict[str, Any]) -> list[Dropped]:
        """Kept panes and revisions of hopping windows (absent before format 5: every
        window emitted before is final, ``kept_from``). A kept pane that cannot be used
        makes the windows covering it final."""
        dropped: list[Dropped] = []
        panes: dict[float, dict[WindowKey, Acc]] = {}
        for entry in body.get("kept_panes", ()):
            why = _invalid_window(entry)
            if why is None:
                start, name, func, acc = entry
                panes.setdefault(float(start), {})[(name, func)] = acc
                continue
            # its events were emitted: only the corrections of its windows are lost
            dropped.append(Dropped(None, None, None, 0, f"kept pane {_clip(entry)}: {why}"))
            self._final_through(entry)
        if panes:
            if self.packed is None:
                self.packed = PackedPanes()
            kept = self.kept_panes = PackedPanes(self.packed.table)
            for start, keyed in panes.items():
                kept.pack(start, keyed)
        for entry in body.get("hop_revisions", ()):
            if (
                type(entry) is list
                and len(entry) == 4
                and type(entry[0]) in (int, float)
                and math.isfinite(entry[0])
                and type(entry[1]) is str
                and entry[2] in FUNCTIONS
                and type(entry[3]) is int
                and entry[3] >= 1
            ):
                self.hop_revisions[(float(entry[0]), (entry[1], entry[2]))] = entry[3]
            else:  # its window must not be emitted again with a revision used before
                dropped.append(Dropped(None, None, None, 0, f"hop revision {_clip(entry)}"))
                self._final_through(entry)
        return dropped

    def _final_through(self, entry: Any) -> None:
        """The windows starting at or before an unusable entry's start (all of them when
        it has none) are final: no revision is emitted that lacks what it held."""
        at: Any = entry[0] if type(entry) is list and entry else None
        final = float(at) if type(at) in (int, float) and math.isfinite(at) else math.inf
        self.kept_from = max(self.kept_from, math.nextafter(final, math.inf))

    @classmethod
    def restored(
        cls, cp: PartitionCheckpoint, now_mono: float
    ) -> tuple[PartitionState, list[Dropped]]:
        """The state stored in ``cp``, and what of it could not be used; restored windows
        get a full idle period.

        A checkpoint is input too: a window whose entry is not a valid accumulator
        (``null`` written for an overflowed sum by releases before 1.3, wrong types, a
        count that does not match) is dropped and reported, never kept to fail at
        emission. A body that cannot be read at all restores the position alone (see
        docs/operations.md). A state format other than this release's raises: that is a
        downgrade, which needs the operator, not a guess.
        """
        p = cls(position=cp.position, last_message_at=now_mono, reported_at=now_mono)
        if not cp.state:
            return p, []
        try:
            body = orjson.loads(cp.state)
            state_format = body.get("format")
        except (orjson.JSONDecodeError, AttributeError) as exc:
            return p, [Dropped(None, None, None, 0, f"unreadable state: {exc}", whole=True)]
        if state_format not in READ_FORMATS:
            raise ValueError(
                f"checkpoint of {cp.partition!r} has state format {state_format!r}; "
                f"this version reads formats {sorted(READ_FORMATS)}"
            )
        try:
            p._restore_progress(body, now_mono)
            entries = body["windows"]
            if type(entries) is not list:
                raise TypeError(f"windows is a {type(entries).__name__}")
        except (KeyError, TypeError, ValueError, IndexError, AttributeError) as exc:
            fresh = cls(position=cp.position, last_message_at=now_mono, reported_at=now_mono)
            problem = f"unreadable state: {exc!r}"
            return fresh, [Dropped(None, None, None, 0, problem, whole=True)]
        dropped: list[Dropped] = []
        final_from = kept_windows.restored_from(p.closed_until, p.ahead_closed)
        try:
            kept = kept_windows.decode(body, final_from)
        except (TypeError, ValueError) as exc:
            kept = None
            dropped.append(Dropped(None, None, None, 0, f"kept windows unreadable: {exc!r}"))
        if kept is None:
            p.kept_from = final_from
        else:
            p.kept, p.kept_from, unusable = kept
            dropped.extend(Dropped(None, None, None, 0, why) for why in unusable)
        p.rollups, unusable = rollup_partials.decode(body.get("rollups"))
        p.kept_rollups, unkept = rollup_partials.decode_kept(body.get("kept_rollups"))
        dropped.extend(Dropped(None, None, None, 0, why) for why in unusable + unkept)
        if "kept_panes" in body or "hop_revisions" in body:
            try:
                dropped.extend(p._restore_hop_kept(body))
            except (TypeError, ValueError) as exc:
                p.kept_panes, p.hop_revisions = None, {}
                p.kept_from = max(p.kept_from, final_from)
                dropped.append(Dropped(None, None, None, 0, f"kept panes unreadable: {exc!r}"))
        for entry in entries:
            why = _invalid_window(entry)
            if why is None:
                start, name, func, acc = entry
                p.windows.setdefault(float(start), {})[(name, func)] = acc
            else:
                dropped.append(_dropped(entry, why))
        return p, dropped

    def _restore_progress(self, body: dict[str, Any], now_mono: float) -> None:
        """Everything but the windows; raises on what does not fit."""
        self.max_ts = _time_or_none(body["max_ts"])
        closed = _time_or_none(body["closed_until"])
        if closed is not None:
            self.closed_until = closed
        self.ahead_ts = _time_or_none(body.get("ahead_ts"))  # absent before the lead cap
        self.ahead_closed = {float(s) for s in body.get("ahead_closed", ())}
        self.origins = {str(k): (int(v[0]), int(v[1])) for k, v in body.get("origins", {}).items()}
        if body.get("routed") is not None:
            self.routed = RoutedTime.from_json(body["routed"], now_mono)
        ledger = body.get("ledger") or {}
        self.totals = {str(k): int(v) for k, v in ledger.get("totals", {}).items()}
        self.intervals = {
            float(k): {str(c): int(n) for c, n in v.items()}
            for k, v in ledger.get("intervals", {}).items()
        }
        self.late_windows = {
            (str(n), str(f), float(st)): int(c) for n, f, st, c in ledger.get("late_windows", [])
        }
        self.late_applied = {
            (str(n), str(f), float(st)): int(c) for n, f, st, c in ledger.get("late_applied", [])
        }

    def on_dropped(self, events: int, *, emitted: bool = False) -> None:
        """Account ``events`` of a window whose state could not be used (the ledger's
        ``dropped``); ``emitted`` when they had already been counted as emitted."""
        totals = self.totals
        totals["dropped"] = totals.get("dropped", 0) + events
        if emitted:
            totals["emitted"] = totals.get("emitted", 0) - events

    def on_merge_overflow(self, events: int) -> None:
        """This partition's share of a window could not be merged (the sum would leave
        the double range): its events count as rejected ``overflow``, not emitted."""
        totals = self.totals
        totals["emitted"] = totals.get("emitted", 0) - events
        totals["rejected:overflow"] = totals.get("rejected:overflow", 0) + events

    def drop_replayed(self, batch: SourceBatch) -> int:
        """Remove from ``batch`` the records this partition has delivered before (their
        origin is not after the last one seen from the same input partition); returns
        how many. The routing stage writes each input partition's records in order, so
        anything not newer is a replay after its crash or rebalance."""
        origins = batch.origins
        if origins is None:
            return 0
        seen = self.origins
        keep: list[int] = []
        for i, (source, offset, element) in enumerate(origins):
            mark = (offset, element)
            last = seen.get(source)
            if last is None or mark > last:
                seen[source] = mark
                keep.append(i)
        dropped = len(origins) - len(keep)
        if dropped:
            batch.records = [batch.records[i] for i in keep]
            if batch.offsets is not None:
                batch.offsets = [batch.offsets[i] for i in keep]
            batch.origins = [origins[i] for i in keep]
        return dropped


@dataclass(frozen=True, slots=True)
class Dropped:
    """A window of a checkpoint that was dropped, or (``whole``) its unreadable body."""

    start: Any
    name: Any
    func: Any
    events: int  # as far as the entry tells (0 when it does not)
    why: str
    whole: bool = False


def _time_or_none(x: Any) -> float | None:
    if x is None:
        return None
    if type(x) not in (int, float) or not math.isfinite(x):
        raise ValueError(f"{x!r} is not a time")
    return float(x)


def _invalid_window(entry: Any) -> str | None:
    """Why a checkpoint's window entry ``[start, name, func, acc]`` cannot be used, or None."""
    if type(entry) is not list or len(entry) != 4:
        return "not a [start, name, func, state] entry"
    start, name, func, acc = entry
    if type(start) not in (int, float) or not math.isfinite(start):
        return f"window start {start!r} is not a time"
    if type(name) is not str or type(func) is not str or func not in FUNCTIONS:
        return f"name {name!r} or function {func!r} is not valid"
    if not is_plain(name) and not valid_series(name):
        return f"series {_clip(name)} is not a name, its tags and its route"
    if not valid(func, acc):
        return f"state {_clip(acc)} is not a valid {func} accumulator"
    return None


def _dropped(entry: Any, why: str) -> Dropped:
    start = name = func = None
    events = 0
    if type(entry) is list and len(entry) == 4:
        start, name, func, acc = entry
        if type(acc) is list and acc and type(acc[0]) is int and acc[0] > 0:
            events = acc[0]
    return Dropped(start, name, func, events, why)


def _clip(x: Any) -> str:
    text = repr(x)
    return text if len(text) <= 200 else text[:200] + "..."
