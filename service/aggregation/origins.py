"""Event time of one internal partition of repartitioned input, held per input partition.

With ``repartition=true`` each internal partition receives the events of its names from
every input partition (its *origins*). If its event time were its own largest event time,
the input partitions would race: one that moves to another routing instance (a join, a
``kill -9``: seconds without records) would come back behind the others, and its valid
events would be late. So, as a Flink operator does with the watermarks of its input
channels, the partition's event time is the minimum over the origins that hold it, each
origin with the rule an input partition has on a direct bus
(:mod:`service.aggregation.partition`):

* The routing stage writes a progress report (:class:`~service.bus.base.Progress`) to
  every internal partition about once a second: for each input partition it reads, the
  largest valid event time it routed from there, whether it is caught up and how long it
  has been silent. In each internal partition, the records and reports of one input
  partition are in the order the routing stage read them.
* An origin holds at its largest event time, from its records here and its reports
  (minus the grace, like every partition). It stops holding when its router reports it
  caught up and silent for the idle timeout: the quiet rule, decided where the input is
  actually read.
* While an input partition changes routing instance nothing comes from it, and it keeps
  holding: its events come back within their grace. Only an origin that nothing at all
  was heard from for :func:`stale_after` (far above a hand-off, which takes about 1.5
  session timeouts) stops holding without a report: a safety net, not the rule.
* An internal partition learns from the first report how many input partitions there
  are. Before that, one with records holds everything back (their event time is
  unknown); after that, an input partition never heard from holds everything back too,
  until it reports or :func:`stale_after` passes.

Records and reports decide everything except the safety net, so a replay of an internal
partition from its checkpoint judges every event as the first run did; the one other
exception is clock skew: an event more than ``AGGREGATION_MAX_WATERMARK_LEAD`` ahead of
the clock moves no origin's event time (the windowing stage passes it without a time, and
the routing stage leaves it out of its reports), see docs/aggregation.md for why a replay
stays exact.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Final

from service.bus.base import Progress

__all__ = ["OriginTime", "RoutedTime", "stale_after"]

STALE_MIN_S: Final = 60.0


def stale_after(idle_timeout_s: float) -> float:
    """How long an origin that nothing was heard from keeps holding."""
    return max(idle_timeout_s, STALE_MIN_S)


@dataclass(slots=True)
class OriginTime:
    """One input partition, as seen in one internal partition."""

    max_ts: float | None = None
    caught_up: bool = False  # as its router last reported
    silent_for: float = 0.0  # as its router last reported
    heard_at: float = 0.0  # bus monotonic time of its last record or report here

    def holds(self, idle_s: float, now: float) -> bool:
        if now - self.heard_at >= stale_after(idle_s):
            return False
        # caught up and never delivered, or caught up and silent: the quiet rule
        return not (self.caught_up and (self.max_ts is None or self.silent_for >= idle_s))


@dataclass(slots=True)
class RoutedTime:
    """The origins of one internal partition (see the module docstring)."""

    origins: dict[str, OriginTime] = field(default_factory=dict)
    expected: tuple[str, int] | None = None  # (input topic, partitions) from the reports
    known_at: float = 0.0  # when ``expected`` was learnt (bus monotonic time)
    _names: list[str] = field(default_factory=list)  # the expected origins' names
    _limit: float | None = None  # the last computed limit (None: held back, unknown time)

    # -- the rule ---------------------------------------------------------------------
    def _expected_names(self) -> list[str]:
        return self._names if self.expected is not None else list(self.origins)

    def _expect(self, topic: str, count: int, now: float) -> None:
        self.expected = (topic, count)
        self._names = [f"{topic}:{i}" for i in range(count)]
        self.known_at = now

    def _state(self, name: str) -> OriginTime:
        s = self.origins.get(name)
        # never heard from: holds with unknown time from when the set was learnt
        return s if s is not None else OriginTime(heard_at=self.known_at)

    def holds(self, idle_s: float, now: float) -> bool:
        """Whether any origin holds the partition's event time."""
        return any(self._state(n).holds(idle_s, now) for n in self._expected_names())

    def limit(self, idle_s: float, now: float) -> float | None:
        """The partition's event time: the smallest largest-event-time over the origins
        that hold; None while one of them (or the set of origins) is unknown."""
        self._limit = None
        lowest = float("inf")
        for name in self._expected_names():
            s = self._state(name)
            if s.holds(idle_s, now):
                if s.max_ts is None or self.expected is None:
                    return None
                lowest = min(lowest, s.max_ts)
        self._limit = None if lowest == float("inf") else lowest
        return self._limit

    def slowest(self, idle_s: float, now: float) -> tuple[int, int, str | None]:
        """(origins holding, origins expected, the one that sets the limit) for /status."""
        names = self._expected_names()
        holding = [(n, self._state(n)) for n in names if self._state(n).holds(idle_s, now)]
        timed = [(s.max_ts, n) for n, s in holding if s.max_ts is not None]
        unknown = [n for n, s in holding if s.max_ts is None]
        setter = unknown[0] if unknown else (min(timed)[1] if timed else None)
        return len(holding), len(names), setter

    # -- what moves it ----------------------------------------------------------------
    def on_event(self, name: str, ts: float | None, now: float, idle_s: float) -> float | None:
        """An accepted event from origin ``name``, with its event time (None for an event
        ahead of the clock: it shows the origin delivering, but moves no time). Returns
        the new limit when it may have moved, None when it cannot have (or is unknown):
        the aggregator's hot loop asks for nothing more, so the common case is a
        dictionary lookup and a comparison."""
        s = self.origins.get(name)
        if s is None:
            s = self.origins[name] = OriginTime(heard_at=now)
            moved = True
        else:
            moved = not s.holds(idle_s, now)  # an origin that stopped holding is back
        s.heard_at = now
        s.caught_up = False  # it delivers: whatever its router said before
        s.silent_for = 0.0
        old = s.max_ts
        if ts is not None and (old is None or ts > old):
            s.max_ts = ts
            limit = self._limit
            moved = moved or old is None or limit is None or old <= limit
        return self.limit(idle_s, now) if moved else None

    def on_progress(self, progress: Progress, now: float) -> None:
        count = progress.partitions
        if self.expected is not None and self.expected[0] == progress.topic:
            # partitions are only ever added; a router that has not seen it yet lags
            count = max(count, self.expected[1])
        if (progress.topic, count) != self.expected:
            self._expect(progress.topic, count, now)
        for name, report in progress.origins.items():
            s = self.origins.get(name)
            if s is None:
                s = self.origins[name] = OriginTime()
            if report.max_ts is not None and (s.max_ts is None or report.max_ts > s.max_ts):
                s.max_ts = report.max_ts
            s.caught_up = report.caught_up
            s.silent_for = report.silent_for
            s.heard_at = now

    # -- checkpoint format ------------------------------------------------------------
    def to_json(self) -> dict[str, Any]:
        return {
            "expected": None if self.expected is None else list(self.expected),
            "origins": {n: [s.max_ts, s.caught_up, s.silent_for] for n, s in self.origins.items()},
        }

    @classmethod
    def from_json(cls, body: dict[str, Any], now: float) -> RoutedTime:
        """Restored origins get a full :func:`stale_after` period, like restored windows."""
        t = cls(known_at=now)
        if body.get("expected") is not None:
            topic, count = body["expected"]
            t._expect(str(topic), int(count), now)
        for name, (max_ts, caught_up, silent_for) in body.get("origins", {}).items():
            t.origins[name] = OriginTime(max_ts, bool(caught_up), float(silent_for), now)
        return t
