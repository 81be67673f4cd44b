"""Property: however per-partition streams interleave, the aggregator's result equals a
single-stream oracle.

Each partition's events are in order within the grace (an event is at most ``grace``
behind its own partition's largest event time). Batches take turns in any order and of
any size, carry any caught-up flag, and reports (empty batches) come in between; no
partition is silent for the idle period until the stream ends. Then no valid event may
be late and every window must equal the oracle, keyed (a name in one partition) or not
(a name spread over several, merged inside the instance).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from typing import Any

import orjson
from hypothesis import given, settings
from hypothesis import strategies as st

from service.aggregation.aggregator import EventAggregator
from service.bus.base import SourceBatch
from service.checkpoints.base import PartitionCheckpoint
from service.config import AggregationConfig
from service.core.clock import ManualClock
from service.metrics.collector import MetricsCollector
from service.pipeline.flow import Outputs

NOW = 1_700_000_000.0
T0 = 1_699_990_000.0  # a multiple of the interval
INTERVAL = 10.0
GRACE = 3.0
FUNCS = ("sum", "min", "max", "count")


@st.composite
def partition_stream(draw: st.DrawFn, index: int, shared: bool) -> list[dict[str, Any]]:
    """Events of one partition: forward steps, sometimes back by at most the grace."""
    n = draw(st.integers(min_value=0, max_value=40))
    ts, top = T0 + draw(st.integers(0, 30)), T0
    events = []
    for _ in range(n):
        step = draw(st.sampled_from([0.0, 0.5, 1.0, 2.5, 7.0, -1.0, -GRACE]))
        ts = max(ts + step, top - GRACE)
        top = max(top, ts)
        mine = f"p{index}-{draw(st.integers(0, 2))}"
        name = draw(st.sampled_from(["s0", "s1"])) if shared else mine
        func = "sum" if shared else FUNCS[int(name[-1])]  # one function per name
        value = draw(st.integers(-50, 50))
        events.append({"name": name, "value": value, "timestamp": ts, "agg_func": func})
    return events


@st.composite
def scenario(draw: st.DrawFn) -> tuple[list[list[dict[str, Any]]], list[tuple[int, int, bool]]]:
    shared = draw(st.booleans())
    k = draw(st.integers(min_value=1, max_value=4))
    streams = [draw(partition_stream(i, shared)) for i in range(k)]
    # steps: (partition, how many events, caught_up); 0 events is a report
    steps = draw(
        st.lists(
            st.tuples(st.integers(0, k - 1), st.integers(0, 7), st.booleans()),
            min_size=1,
            max_size=60,
        )
    )
    return streams, steps


def oracle(streams: list[list[dict[str, Any]]]) -> dict[tuple[str, str, float], tuple[float, int]]:
    groups: defaultdict[tuple[str, str, float], list[float]] = defaultdict(list)
    for stream in streams:
        for e in stream:
            start = (e["timestamp"] // INTERVAL) * INTERVAL
            groups[(e["name"], e["agg_func"], start)].append(e["value"])
    reduce: dict[str, Callable[[list[float]], float]] = {
        "sum": sum,
        "min": min,
        "max": max,
        "count": len,
    }
    return {k: (float(reduce[k[1]](v)), len(v)) for k, v in groups.items()}


@settings(max_examples=300, deadline=None)
@given(scenario())
def test_any_interleaving_equals_the_single_stream_oracle(
    case: tuple[list[list[dict[str, Any]]], list[tuple[int, int, bool]]],
) -> None:
    streams, steps = case
    clock = ManualClock(NOW)
    cfg = AggregationConfig(interval_s=INTERVAL, grace_s=GRACE, idle_timeout_s=60.0)
    agg = EventAggregator(cfg, MetricsCollector(clock), clock)
    names = [f"p{i}" for i in range(len(streams))]
    agg.restore([PartitionCheckpoint(p, None, None) for p in names])  # the assignment
    read = [0] * len(streams)
    out = Outputs()

    def deliver(i: int, n: int, caught_up: bool) -> None:
        records = [orjson.dumps(e) for e in streams[i][read[i] : read[i] + n]]
        read[i] += len(records)
        # a partition that never delivered reports honestly: unread data is not caught up
        honest = caught_up and (read[i] > 0 or not streams[i])
        batch = SourceBatch(names[i], records, "t", str(read[i]), NOW, caught_up=honest)
        out.extend(agg.process(batch))
        clock.advance(0.1)

    for i, n, caught_up in steps:
        deliver(i, n, caught_up)
    for i in range(len(streams)):  # the rest, still interleaved by the bus
        while read[i] < len(streams[i]):
            deliver(i, 5, False)
    clock.advance(60.0)
    for i in range(len(streams)):  # every partition reports silence: the quiet rule
        deliver(i, 0, True)

    assert out.dead_letters == []
    got: dict[tuple[str, str, float], tuple[float, int]] = {}
    for a in out.aggregates:
        key = (a.name, a.agg_func, a.window_start)
        assert key not in got, f"{key} emitted twice"
        got[key] = (a.value, a.count)
    assert got == oracle(streams)
    assert agg.open_windows == 0
