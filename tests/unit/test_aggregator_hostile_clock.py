"""A source whose producer clock is far ahead (every event more than the lead ahead of
the service clock, within AGGREGATION_MAX_FUTURE) beside one that is on time: the
on-time source's windows must not wait for it while it has nothing unread (contract
§12.8: a source never stalls the others), and none of its events is late."""

from __future__ import annotations

import orjson

from service.bus.base import SourceBatch
from service.pipeline.flow import Outputs
from tests.unit.test_aggregator_clock_skew import INTERVAL, Direct


def ahead_source(feed: Direct, ts: float, *, caught_up: bool) -> Outputs:
    record = orjson.dumps({"name": "b", "value": 1.0, "timestamp": ts})
    return feed.agg.process(
        SourceBatch(
            "p1",
            [record],
            "http",
            None,
            feed.clock.now(),
            caught_up=caught_up,
            polled_at=feed.clock.monotonic(),
        )
    )


def test_a_caught_up_source_whose_clock_is_far_ahead_stalls_no_window_of_the_others() -> None:
    feed = Direct()
    feed.on_time(5)
    for _ in range(60):  # a minute: it delivers all the time, so it never falls idle
        ahead_source(feed, feed.clock.now() + 3000.0, caught_up=True)
        feed.on_time(1)
    assert feed.agg.partitions()["p1"]["holds_watermark"] is False
    closed = [s for s in feed.sent if s + INTERVAL <= feed.clock.now() - 0.5]
    assert len(closed) >= 5 and all(feed.exact(s) for s in closed)
    assert feed.late == []


def test_a_source_with_unread_data_ahead_of_the_clock_still_holds_the_watermark() -> None:
    """Not caught up, its unread events may be of any time: it holds, as before."""
    feed = Direct()
    feed.on_time(30)
    ahead_source(feed, feed.clock.now() + 3000.0, caught_up=False)
    assert feed.agg.watermark is None
    emitted = len(feed.emitted)
    feed.on_time(30)
    assert len(feed.emitted) == emitted
