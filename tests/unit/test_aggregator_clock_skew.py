"""Clock skew (contract §12.1): one valid event far ahead of the service clock (inside
AGGREGATION_MAX_FUTURE) must not make the on-time events after it late. Such an event is
aggregated but moves no event time (AGGREGATION_MAX_WATERMARK_LEAD); its window closes
when time catches up or by the quiet rule."""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Any

import orjson

from service.aggregation.aggregator import EventAggregator
from service.bus.base import SourceBatch
from service.config import AggregationConfig
from service.core.clock import ManualClock
from service.metrics.collector import MetricsCollector
from service.pipeline.flow import Outputs

NOW = 1_700_000_000.0
INTERVAL = 10.0
IDLE = INTERVAL  # interval + grace (0), the default idle timeout


class Direct:
    """One direct partition (an HTTP bus has one) fed in order, with what came out."""

    def __init__(self, **cfg: Any) -> None:
        self.clock = ManualClock(NOW)
        self.metrics = MetricsCollector(self.clock)
        conf = AggregationConfig(**{"interval_s": INTERVAL, **cfg})
        self.agg = EventAggregator(conf, self.metrics, self.clock)
        self.emitted: dict[float, list[tuple[float, int]]] = defaultdict(list)
        self.late: list[str] = []
        self.sent: dict[float, list[float]] = defaultdict(list)  # window -> values
        self.position = 0

    def send(self, *events: tuple[float, float]) -> Outputs:
        """(value, ts) events of name "a", one batch."""
        for value, ts in events:
            self.sent[math.floor(ts / INTERVAL) * INTERVAL].append(value)
        records = [orjson.dumps({"name": "a", "value": v, "timestamp": ts}) for v, ts in events]
        return self._process(records, caught_up=False)

    def report(self) -> Outputs:
        """What the bus sends about once a second for a caught-up, silent partition."""
        return self._process([], caught_up=True)

    def _process(self, records: list[Any], *, caught_up: bool) -> Outputs:
        self.position += len(records)
        out = self.agg.process(
            SourceBatch(
                "p0",
                records,
                "http",
                str(self.position),
                self.clock.now(),
                caught_up=caught_up,
                polled_at=self.clock.monotonic(),
            )
        )
        for a in out.aggregates:
            self.emitted[a.window_start].append((a.value, a.count))
        self.late.extend(d.raw for d in out.dead_letters if d.reason == "late")
        assert all(d.reason == "late" for d in out.dead_letters)
        return out

    def on_time(self, seconds: int, value: float = 1.0) -> None:
        """One event a second, stamped half a second before the clock (its transit)."""
        for _ in range(seconds):
            self.clock.advance(1.0)
            self.send((value, self.clock.now() - 0.5))

    def exact(self, start: float) -> bool:
        """Window ``start`` came out once, holding exactly what was sent for it."""
        values = self.sent[start]
        return self.emitted.get(start) == [(float(sum(values)), len(values))]


def test_one_event_far_ahead_leaves_every_on_time_event_on_time() -> None:
    feed = Direct()
    feed.on_time(5)
    ahead = feed.clock.now() + 3000.0  # a producer whose clock is 50 minutes fast
    feed.send((1000.0, ahead))
    feed.on_time(300)
    assert feed.late == []
    assert feed.metrics.events_ahead == 1
    outlier = math.floor(ahead / INTERVAL) * INTERVAL
    on_time = sorted(s for s in feed.sent if s != outlier)
    # every on-time window emitted exactly, but the newest (event time is still in it)
    assert all(feed.exact(s) for s in on_time[:-1])
    assert on_time[-1] not in feed.emitted
    assert outlier not in feed.emitted  # its window waits for time, or the quiet rule
    assert feed.agg.watermark == feed.clock.now() - 0.5  # on-time event time, not 3000 s on


def test_the_quiet_rule_emits_the_window_of_the_event_ahead_and_on_time_events_stay_on_time() -> (
    None
):
    feed = Direct()
    feed.on_time(5)
    ahead = feed.clock.now() + 3000.0
    outlier = math.floor(ahead / INTERVAL) * INTERVAL
    feed.send((1000.0, ahead))
    feed.on_time(30)
    for _ in range(int(IDLE) + 1):  # the stream falls silent
        feed.clock.advance(1.0)
        feed.report()
    assert feed.exact(outlier)  # the quiet rule: every open window, the outlier's too
    assert all(feed.exact(s) for s in feed.sent)
    # on-time traffic resumes: judged by the on-time event time, not by the outlier's
    # window; an event for that window, already emitted, is late; the same after a
    # restart from the checkpoint
    for restart in (False, True):
        if restart:
            feed.agg = _restored(feed)
        feed.on_time(3)
        assert feed.late == []
        feed.send((5.0, ahead + 1.0))
        assert len(feed.late) == 1
        feed.late.clear()


def _restored(feed: Direct) -> EventAggregator:
    """The same partition restored from its checkpoint in a new aggregator."""
    agg = EventAggregator(AggregationConfig(interval_s=INTERVAL), feed.metrics, feed.clock)
    agg.restore(feed.agg.snapshot())
    return agg


def test_the_window_of_an_event_ahead_closes_when_time_catches_up() -> None:
    feed = Direct()
    ahead = feed.clock.now() + 100.0  # beyond the 60 s lead, within AGGREGATION_MAX_FUTURE
    feed.send((1000.0, ahead))
    outlier = math.floor(ahead / INTERVAL) * INTERVAL
    feed.on_time(95)
    assert feed.late == [] and outlier not in feed.emitted
    feed.on_time(20)  # on-time event time passes the end of the outlier's window
    assert feed.late == []
    assert len(feed.sent[outlier]) > 1  # on-time events joined the outlier's window
    assert feed.exact(outlier)


def test_an_event_within_the_lead_moves_event_time_as_before() -> None:
    """The lead is the documented bound: an event up to AGGREGATION_MAX_WATERMARK_LEAD
    ahead still moves event time, one further ahead does not."""
    feed = Direct(max_watermark_lead_s=30.0)
    feed.on_time(2)
    feed.send((1.0, feed.clock.now() + 29.0))
    assert feed.metrics.events_ahead == 0
    assert feed.agg.watermark == feed.clock.now() + 29.0
    feed.send((1.0, feed.clock.now() + 31.0))
    assert feed.metrics.events_ahead == 1
    assert feed.agg.watermark == feed.clock.now() + 29.0


def test_a_partition_that_delivered_only_an_event_ahead_holds_the_watermark_back() -> None:
    """Its event time is unknown (the event ahead says nothing about it), like a partition
    with unread data: the other partitions' windows wait until it delivers an on-time
    event, which is then on time whatever the others have reached."""
    feed = Direct()
    feed.on_time(30)
    now = feed.clock.now()

    def other(ts: float) -> Outputs:
        record = orjson.dumps({"name": "b", "value": 1.0, "timestamp": ts})
        return feed.agg.process(
            SourceBatch("p1", [record], "http", None, now, polled_at=feed.clock.monotonic())
        )

    other(now + 3000.0)
    assert feed.agg.watermark is None
    emitted = len(feed.emitted)
    feed.on_time(30)
    assert len(feed.emitted) == emitted  # held back
    out = other(now + 1.0)  # on time, 30 s behind p0: p1's own event time
    assert out.dead_letters == []
    assert feed.agg.watermark == now + 1.0
    assert feed.late == []
