"""Repartitioned input: an internal partition's event time follows its slowest input
partition (service.aggregation.origins), moved by records and the routing stage's
progress reports, so an input partition that pauses (it is changing routing instance)
comes back within its grace instead of late."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from service.aggregation.aggregator import EventAggregator
from service.aggregation.origins import STALE_MIN_S
from service.bus.base import Origin, OriginReport, Progress, SourceBatch
from service.config import AggregationConfig
from service.core.clock import ManualClock
from service.metrics.collector import MetricsCollector
from service.pipeline.flow import Outputs

NOW = 1_700_000_000.0
T0 = 1_699_990_020.0  # a window start (interval 10)
GRACE = 2.0
IDLE = 12.0  # interval + grace, the default idle timeout


class Internal:
    """One internal partition ``r:0`` fed with routed records and reports, in order."""

    def __init__(self, agg: EventAggregator, clock: ManualClock, partition: str = "r:0") -> None:
        self.agg, self.clock, self.partition = agg, clock, partition
        self.offset = 0
        self.next_input_offset: dict[str, int] = {}
        self.dead: list[Any] = []
        self.emitted: dict[tuple[str, float], tuple[float, int]] = {}

    def events(self, *items: tuple[str, str, float, float]) -> Outputs:
        """(origin, name, value, ts) records, in one batch."""
        records, origins = [], []
        for origin, name, value, ts in items:
            records.append(orjson.dumps({"name": name, "value": value, "timestamp": ts}))
            n = self.next_input_offset.get(origin, 0)
            self.next_input_offset[origin] = n + 1
            origins.append((origin, n, 0))
        return self._process(records, origins, None)

    def progress(self, partitions: int = 2, **reports: tuple[float | None, bool, float]) -> Outputs:
        """A routing stage's report: origin "in_k" (keyword) -> (max_ts, caught_up, silent_for)."""
        origins = {k.replace("_", ":"): OriginReport(*v) for k, v in reports.items()}
        return self._process([], [], Progress("in", partitions, origins))

    def _process(
        self, records: list[Any], origins: list[Origin], progress: Progress | None
    ) -> Outputs:
        self.offset += len(records) + (progress is not None)
        out = self.agg.process(
            SourceBatch(
                self.partition,
                records,
                f"kafka r/{self.partition}",
                str(self.offset),
                NOW,
                offsets=list(range(self.offset - len(records), self.offset)),
                polled_at=self.clock.monotonic(),
                origins=origins,
                progress=progress,
            )
        )
        self.dead.extend(out.dead_letters)
        for a in out.aggregates:
            self.emitted[(a.name, a.window_start)] = (a.value, a.count)
        return out


def make(**cfg: Any) -> tuple[EventAggregator, ManualClock]:
    clock = ManualClock(NOW)
    conf = AggregationConfig(**{"interval_s": 10.0, "grace_s": GRACE, **cfg})
    return EventAggregator(conf, MetricsCollector(clock), clock), clock


def test_a_paused_input_partition_holds_the_internal_partition_back() -> None:
    """in:1 pauses (its routing instance died) while in:0 runs 60 s ahead: in:1's events
    then come back within its own grace and are counted, none is late."""
    agg, clock = make()
    p = Internal(agg, clock)
    p.progress(in_0=(None, False, 0.0), in_1=(None, False, 0.0))
    p.events(("in:0", "a", 1, T0 + 1), ("in:1", "a", 10, T0 + 2))
    for k in range(60):  # in:0 alone, a minute of event time; in:1 says nothing
        p.events(("in:0", "a", 1, T0 + 3 + k))
        clock.advance(0.1)
    assert p.emitted == {}  # nothing closes while in:1 holds at T0 + 2
    assert agg.watermark == T0 + 2 - GRACE
    p.events(("in:1", "a", 100, T0 + 1))  # back, out of order but within its grace
    assert p.dead == []
    p.events(("in:1", "a", 1000, T0 + 40))  # in:1 catches up: the windows close
    assert p.emitted[("a", T0)] == (1 + 10 + 100 + 7 * 1, 10)
    assert p.dead == []


def test_without_the_slow_origin_its_events_would_be_late() -> None:
    """The same stream on a direct partition (no origins): the late events show that the
    previous test depends on the per-origin rule, not on luck."""
    agg, _ = make()
    records = [{"name": "a", "value": 1, "timestamp": T0 + 3 + k} for k in range(60)]
    records.append({"name": "a", "value": 100, "timestamp": T0 + 1})
    out = agg.process(
        SourceBatch("p0", [orjson.dumps(r) for r in records], "t", "1", NOW, polled_at=0.0)
    )
    assert [d.reason for d in out.dead_letters] == ["late"]


def test_a_report_moves_event_time_for_names_this_partition_does_not_see() -> None:
    """Each internal partition holds only some names; an input partition's progress comes
    to it in the reports, so its windows close without events of every input."""
    agg, clock = make()
    p = Internal(agg, clock)
    p.events(("in:0", "a", 1, T0 + 1), ("in:1", "a", 2, T0 + 1))
    assert p.emitted == {}  # no report yet: how many inputs there are is unknown
    p.progress(in_0=(T0 + 30, False, 0.0), in_1=(T0 + 11, False, 0.0))
    assert p.emitted == {}  # in:1 at T0 + 11 - grace: the first window is still open
    p.progress(in_0=(T0 + 31, False, 0.0), in_1=(T0 + 12, False, 0.0))
    assert p.emitted == {("a", T0): (3.0, 2)}


def test_an_input_partition_never_heard_from_holds_everything_back() -> None:
    agg, clock = make()
    p = Internal(agg, clock)
    p.progress(partitions=3, in_0=(T0 + 50, False, 0.0), in_1=(T0 + 50, False, 0.0))
    p.events(("in:0", "a", 1, T0 + 1))
    assert p.emitted == {} and agg.watermark is None  # in:2 may hold anything
    p.progress(partitions=3, in_2=(None, True, 0.0))  # caught up, never delivered
    assert p.emitted == {("a", T0): (1.0, 1)}


def test_an_input_partition_reported_silent_stops_holding_and_the_quiet_rule_flushes() -> None:
    agg, clock = make()
    p = Internal(agg, clock)
    p.events(("in:0", "a", 1, T0 + 1), ("in:1", "b", 1, T0 + 25))
    p.progress(in_0=(T0 + 1, True, IDLE - 1), in_1=(T0 + 25, False, 0.0))
    assert p.emitted == {}  # in:0 is caught up but not yet silent for the idle timeout
    p.progress(in_0=(T0 + 1, True, IDLE), in_1=(T0 + 25, False, 0.0))
    assert p.emitted == {("a", T0): (1.0, 1)}  # in:0 idle: in:1 alone sets event time
    assert ("b", T0 + 20) not in p.emitted
    p.progress(in_0=(T0 + 1, True, IDLE + 1), in_1=(T0 + 25, True, IDLE))
    assert p.emitted[("b", T0 + 20)] == (1.0, 1)  # every input silent: all is flushed
    assert agg.open_windows == 0


def test_an_event_from_an_idle_input_partition_makes_it_hold_again() -> None:
    agg, clock = make()
    p = Internal(agg, clock)
    p.events(("in:0", "a", 1, T0 + 1), ("in:1", "a", 1, T0 + 35))
    p.progress(in_0=(T0 + 1, True, IDLE), in_1=(T0 + 35, False, 0.0))
    assert set(p.emitted) == {("a", T0)}  # in:0 idle: in:1's T0 + 35 closes T0..T0 + 30
    p.events(("in:0", "a", 5, T0 + 36))  # in:0 speaks again: it holds at T0 + 36
    p.events(("in:1", "a", 1, T0 + 60))
    assert ("a", T0 + 30) not in p.emitted  # held at in:0's T0 + 36 - grace
    p.events(("in:0", "a", 1, T0 + 45))
    assert p.emitted[("a", T0 + 30)] == (6.0, 2)
    assert p.dead == []


def test_an_origin_nothing_is_heard_from_stops_holding_after_the_safety_bound() -> None:
    """A router that died with nobody taking its partitions over (not a hand-off, which
    takes seconds) holds the partition back only for max(idle timeout, 60 s)."""
    agg, clock = make()
    p = Internal(agg, clock)
    p.progress(in_0=(T0 + 1, False, 0.0), in_1=(T0 + 1, False, 0.0))
    p.events(("in:0", "a", 1, T0 + 1))
    for _ in range(int(STALE_MIN_S) - 1):  # in:0 goes on; in:1 is not heard from
        clock.advance(1)
        p.progress(in_0=(T0 + 40, False, 0.0))
    assert p.emitted == {}
    clock.advance(1)
    p.progress(in_0=(T0 + 40, False, 0.0))
    assert p.emitted == {("a", T0): (1.0, 1)}


def test_the_routed_state_survives_a_checkpoint_and_judges_the_replay_alike() -> None:
    """Restored elsewhere (a hand-off of the internal partition), the per-origin event time
    comes along: the slow origin still holds, and its events are still on time."""
    agg, clock = make()
    p = Internal(agg, clock)
    p.progress(in_0=(None, False, 0.0), in_1=(None, False, 0.0))
    p.events(("in:0", "a", 1, T0 + 1), ("in:1", "a", 1, T0 + 2))
    p.events(*[("in:0", "a", 1, T0 + 3 + k) for k in range(40)])
    [saved] = agg.snapshot()
    other, clock2 = make()
    other.restore([saved])
    assert other.watermark == T0 + 2 - GRACE
    q = Internal(other, clock2)
    q.next_input_offset = dict(p.next_input_offset)
    q.events(("in:1", "a", 5, T0 + 1.5))
    assert q.dead == []
    view = other.partitions()["r:0"]
    assert view["why"] == "2 of 2 input partitions hold it, the slowest is in:1"
    assert view["watermark"] == T0 + 2 - GRACE


@pytest.mark.parametrize("split", [1, 3, 7, 100])
def test_lateness_does_not_depend_on_the_batches(split: int) -> None:
    """The same records and reports, cut into batches differently (a replay after a
    crash fetches differently), give the same late events and windows."""
    stream: list[tuple[str, str, float, float]] = []
    for k in range(100):
        stream.append(("in:0", "a", 1, T0 + k * 0.5))
        stream.append(("in:1", "a", 2, T0 + k * 0.3 - (5 if k % 10 == 0 else 0)))
    results = []
    for size in (split, 1000):
        agg, clock = make()
        p = Internal(agg, clock)
        p.progress(in_0=(None, False, 0.0), in_1=(None, False, 0.0))
        for i in range(0, len(stream), size):
            p.events(*stream[i : i + size])
        p.progress(in_0=(T0 + 100, True, IDLE), in_1=(T0 + 100, True, IDLE))
        results.append((sorted(d.raw for d in p.dead), p.emitted))
    assert results[0] == results[1]
    assert results[0][0]  # some events are really late (5 s back, grace 2 s)


def test_an_input_topic_that_grows_is_expected_whole_even_from_a_lagging_router() -> None:
    agg, clock = make()
    p = Internal(agg, clock)
    p.progress(partitions=2, in_0=(T0 + 15, False, 0.0), in_1=(T0 + 15, False, 0.0))
    p.events(("in:0", "a", 1, T0 + 14))
    p.progress(partitions=3, in_0=(T0 + 40, False, 0.0))  # a router that saw in:2 appear
    p.progress(partitions=2, in_1=(T0 + 40, False, 0.0))  # one that has not yet
    assert p.emitted == {} and agg.watermark is None  # in:2 may hold anything
    p.progress(partitions=3, in_2=(T0 + 40, False, 0.0))
    assert p.emitted == {("a", T0 + 10): (1.0, 1)}


def test_an_event_far_ahead_of_the_clock_moves_no_origin_and_on_time_events_stay_on_time() -> None:
    """Clock skew through repartitioning: the one input partition sends an event 3,000 s
    ahead of the clock, then on-time events (the router's reports leave the event ahead
    out of their max_ts too). None is late, every window is exact, and the outlier's
    window waits for the quiet rule."""
    agg, clock = make()
    p = Internal(agg, clock)
    sent: dict[float, list[float]] = {}

    def on_time(seconds: int) -> None:
        for k in range(seconds):
            clock.advance(1.0)
            ts = clock.now() - 0.5
            sent.setdefault(ts // 10 * 10, []).append(float(k))
            p.events(("in:0", "a", float(k), ts))
            p.progress(partitions=1, in_0=(ts, False, 0.0))

    on_time(3)
    ahead = clock.now() + 3000.0
    p.events(("in:0", "a", 1000.0, ahead))
    on_time(100)
    assert p.dead == []
    assert agg.partitions()["r:0"]["max_event_time_ahead"] == ahead
    newest = max(sent)
    for start, values in sent.items():
        if start != newest:
            assert p.emitted[("a", start)] == (sum(values), len(values))
    outlier = ahead // 10 * 10
    assert ("a", outlier) not in p.emitted
    last = clock.now() - 0.5
    p.progress(partitions=1, in_0=(last, True, IDLE))  # caught up and silent
    assert p.emitted[("a", outlier)] == (1000.0, 1)
    clock.advance(10.0)
    p.events(("in:0", "a", 7.0, clock.now()))  # on time again, a window on: not late
    p.events(("in:0", "a", 7.0, ahead))  # the outlier's window was emitted: late
    assert [d.reason for d in p.dead] == ["late"]
