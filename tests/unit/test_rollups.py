"""Rollups (contract §12.6): each AGGREGATION_ROLLUPS level merged from the finished
windows below it equals the same events aggregated in one window of its length; over
partitions, two levels, checkpoints, batch cuts and corrections of an open rollup."""

from __future__ import annotations

import math
import random
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from service.aggregation.aggregator import EventAggregator
from service.aggregation.functions import FUNCTIONS, exact_percentile
from service.bus.base import SourceBatch
from service.checkpoints.base import PartitionCheckpoint
from service.config import AggregationConfig
from service.core.clock import ManualClock
from service.core.events import Aggregate
from service.metrics.collector import MetricsCollector

H = 1_699_999_920.0  # a multiple of 60 and of 180
CLOCK = H + 86_400.0  # no event here is ahead of the service clock
PCTS = {"p50": 0.5, "p90": 0.9, "p95": 0.95, "p99": 0.99}
Row = tuple[str, str, float, float]  # name, func, start, end


def make(
    interval: float = 10.0, rollups: tuple[float, ...] = (60.0,), **cfg: Any
) -> EventAggregator:
    clock = ManualClock(CLOCK)
    config = AggregationConfig(
        interval_s=interval, rollups_s=rollups, idle_timeout_s=100_000.0, **cfg
    )
    return EventAggregator(config, MetricsCollector(clock), clock)


def ev(name: str, value: float, ts: float, func: str) -> dict[str, Any]:
    return {"name": name, "value": value, "timestamp": ts, "agg_func": func}


def feed(
    agg: EventAggregator, events: list[dict[str, Any]], partition: str = "p0", per: int = 50
) -> list[Aggregate]:
    """Events in batches of ``per`` records (one event each); the aggregates emitted."""
    out: list[Aggregate] = []
    for i in range(0, len(events), per):
        records = [orjson.dumps(e) for e in events[i : i + per]]
        batch = SourceBatch(partition, records, f"t {partition}", str(i), CLOCK)
        result = agg.process(batch)
        assert result.dead_letters == []
        out.extend(result.aggregates)
    return out


def by_row(aggs: list[Aggregate]) -> dict[Row, Aggregate]:
    rows: dict[Row, Aggregate] = {}
    for a in aggs:
        key = (a.name, a.agg_func, a.window_start, a.window_end)
        assert key not in rows, f"{key} emitted twice"
        rows[key] = a
    return rows


def workload(seed: int, n: int, span: float, funcs: list[str]) -> list[dict[str, Any]]:
    """``n`` events per function over ``[H, H + span)``, in time order, distinct times."""
    rng = random.Random(seed)
    times = sorted(rng.sample(range(int(span * 1000)), n))
    events = []
    for t in times:
        for f in funcs:
            events.append(
                ev("m", rng.uniform(-1e3, 1e3) * rng.choice((1, 1e-3, 1e4)), H + t / 1000, f)
            )
    return events


def closer(ts: float, funcs: list[str]) -> list[dict[str, Any]]:
    return [ev("zz", 0.0, ts, f) for f in funcs]


def reference(events: list[dict[str, Any]], func: str) -> float:
    """The aggregate of ``events`` (all one function) computed directly from them."""
    values: list[float] = [e["value"] for e in events]
    if func == "sum":
        return math.fsum(values)
    if func == "count":
        return float(len(values))
    if func == "min":
        return min(values)
    if func == "max":
        return max(values)
    if func == "first":
        return float(min(events, key=lambda e: e["timestamp"])["value"])
    if func == "last":
        return float(max(events, key=lambda e: e["timestamp"])["value"])
    mean = math.fsum(values) / len(values)
    if func == "avg":
        return mean
    if func == "stddev":
        return math.sqrt(math.fsum((v - mean) ** 2 for v in values) / len(values))
    return exact_percentile(sorted(values), PCTS[func])


def check(
    rows: dict[Row, Aggregate],
    events: list[dict[str, Any]],
    start: float,
    end: float,
    pct_rel: float = 0.0,
) -> None:
    """The rows of window [start, end) equal the direct computation from ``events``."""
    for func in FUNCTIONS:
        mine = [e for e in events if e["agg_func"] == func and start <= e["timestamp"] < end]
        a = rows[("m", func, start, end)]
        want = reference(mine, func)
        assert a.count == len(mine), func
        assert a.revision == 1
        if func in ("sum", "avg", "stddev"):
            assert a.value == pytest.approx(want, rel=1e-9, abs=1e-9), func
        elif func in PCTS:
            assert a.value == pytest.approx(want, rel=pct_rel, abs=1e-12), func
        else:
            assert a.value == want, func


ALL = list(FUNCTIONS)


def test_every_function_rolled_up_equals_one_window_of_the_rollup_length() -> None:
    events = workload(1, 300, 120.0, ALL)  # two hours (of 60 s) of six minutes (10 s)
    agg = make()
    rows = by_row(feed(agg, events + closer(H + 125, ALL)))
    for start in (H, H + 60):
        check(rows, events, start, start + 60)
    # the base windows are written as before, next to them
    check(rows, events, H + 10, H + 20)
    # and the hour equals what an aggregator with a 60 s interval makes of the events
    plain = by_row(feed(make(interval=60.0, rollups=()), events + closer(H + 125, ALL)))
    for func in ("sum", "count", "min", "max", "first", "last", "p50", "p99"):
        assert rows[("m", func, H, H + 60)].value == plain[("m", func, H, H + 60)].value


def test_percentiles_beyond_the_exact_limit_are_within_one_percent() -> None:
    funcs = ["p50", "p90", "p95", "p99"]
    rng = random.Random(7)
    events = [
        ev("m", rng.lognormvariate(3, 1), H + i * 60 / 24_000, f)
        for i in range(24_000)
        for f in funcs
    ]
    rows = by_row(feed(make(), events + closer(H + 61, funcs), per=2000))
    for func in funcs:
        values = sorted(e["value"] for e in events if e["agg_func"] == func)
        want = exact_percentile(values, PCTS[func])
        assert rows[("m", func, H, H + 60)].value == pytest.approx(want, rel=0.01)


def test_two_levels_the_second_from_the_first() -> None:
    events = workload(2, 400, 360.0, ALL)
    agg = make(rollups=(60.0, 180.0))
    rows = by_row(feed(agg, events + closer(H + 361, ALL)))
    for start in (H, H + 180):
        check(rows, events, start, start + 180)
    for start in range(0, 360, 60):
        check(rows, events, H + start, H + start + 60)


def test_across_two_partitions_the_shares_are_merged() -> None:
    events = workload(3, 300, 120.0, ALL)
    agg = make()
    a, b = events[::2], events[1::2]
    out: list[Aggregate] = []
    # both partitions deliver step by step (the watermark is the slower one's)
    for i in range(0, max(len(a), len(b)), 40):
        out += feed(agg, a[i : i + 40], "p0")
        out += feed(agg, b[i : i + 40], "p1")
    out += feed(agg, closer(H + 121, ALL), "p0")
    out += feed(agg, closer(H + 121, ALL), "p1")
    rows = by_row(out)
    for start in (H, H + 60):
        check(rows, events, start, start + 60)


def test_checkpoint_round_trip_and_restore_mid_hour() -> None:
    events = workload(4, 300, 120.0, ALL)
    mid = [e for e in events if e["timestamp"] < H + 95]
    rest = [e for e in events if e["timestamp"] >= H + 95]
    agg = make()
    out = feed(agg, mid)
    [cp] = agg.snapshot()
    assert cp.state is not None
    body = orjson.loads(cp.state)
    assert body["format"] == 4 and body["rollups"]
    later = make()
    later.restore([PartitionCheckpoint(cp.partition, cp.position, cp.state)])
    assert later.rollup_partials == agg.rollup_partials > 0
    out += feed(later, rest + closer(H + 121, ALL))
    rows = by_row(out)
    for start in (H, H + 60):
        check(rows, events, start, start + 60)


def test_without_rollups_nothing_changes() -> None:
    events = workload(5, 100, 60.0, ["sum", "p50"])
    agg = make(rollups=())
    rows = feed(agg, events + closer(H + 61, ["sum", "p50"]))
    assert {a.window_end - a.window_start for a in rows} == {10.0}
    [cp] = agg.snapshot()
    assert cp.state is not None
    body = orjson.loads(cp.state)
    assert "rollups" not in body and body["format"] != 4


def test_a_restored_length_no_longer_configured_is_dropped() -> None:
    agg = make()
    feed(agg, workload(6, 50, 30.0, ["sum"]))
    [cp] = agg.snapshot()
    other = make(rollups=(120.0,))
    other.restore([cp])
    assert other.rollup_partials == 0


@settings(max_examples=25, deadline=None)
@given(cuts=st.lists(st.integers(min_value=1, max_value=60), min_size=1, max_size=30))
def test_batch_cuts_do_not_matter(cuts: list[int]) -> None:
    events = workload(8, 60, 180.0, ["sum", "avg", "first", "p90"]) + closer(
        H + 181, ["sum", "avg", "first", "p90"]
    )
    whole = by_row(feed(make(rollups=(60.0, 180.0)), events, per=len(events)))
    agg = make(rollups=(60.0, 180.0))
    out: list[Aggregate] = []
    i = 0
    for n in cuts * (len(events) // sum(cuts) + 1):
        if i >= len(events):
            break
        out += feed(agg, events[i : i + n], per=n)
        i += n
    cut = by_row(out)
    assert {k: (a.value, a.count) for k, a in cut.items()} == {
        k: (a.value, a.count) for k, a in whole.items()
    }


def test_a_correction_while_the_hour_is_open_goes_into_the_hour() -> None:
    agg = make(allowed_lateness_s=60.0)
    out = feed(agg, [ev("m", 1.0, H + 1, "sum"), ev("m", 2.0, H + 12, "sum")])
    assert [(a.window_start, a.revision, a.value) for a in out] == [(H, 1, 1.0)]
    out = feed(agg, [ev("m", 4.0, H + 3, "sum")])  # late for [H, H+10): revision 2
    assert [(a.window_start, a.window_end, a.revision, a.value) for a in out] == [
        (H, H + 10, 2, 5.0)
    ]
    out = feed(agg, [ev("m", 8.0, H + 61, "sum")])
    hour = by_row(out)[("m", "sum", H, H + 60)]
    assert (hour.value, hour.count, hour.revision) == (7.0, 3, 1)


def test_a_rollup_is_emitted_in_the_close_step_of_its_last_window() -> None:
    agg = make()
    feed(agg, [ev("m", 1.0, H + 55, "sum")])
    out = feed(agg, [ev("m", 1.0, H + 60, "sum")])
    assert sorted((a.window_start, a.window_end) for a in out) == [(H, H + 60), (H + 50, H + 60)]


def rows_of(out: list[Aggregate]) -> list[tuple[float, float, int, float, int]]:
    return sorted((a.window_start, a.window_end, a.revision, a.value, a.count) for a in out)


def test_a_correction_of_an_emitted_hour_re_emits_it_with_the_next_revision() -> None:
    agg = make(allowed_lateness_s=120.0)
    feed(agg, [ev("m", 1.0, H + 1, "sum"), ev("m", 2.0, H + 42, "sum")])
    out = feed(agg, [ev("m", 8.0, H + 61, "sum")])
    assert (H, H + 60, 1, 3.0, 2) in rows_of(out)
    out = feed(agg, [ev("m", 4.0, H + 3, "sum")])
    assert rows_of(out) == [(H, H + 10, 2, 5.0, 2), (H, H + 60, 2, 7.0, 3)]
    out = feed(agg, [ev("m", 1.0, H + 44, "sum")])  # another minute of the same hour
    assert rows_of(out) == [(H, H + 60, 3, 8.0, 4), (H + 40, H + 50, 2, 3.0, 2)]


def test_a_correction_raises_the_emitted_level_and_joins_the_open_one_above() -> None:
    agg = make(rollups=(60.0, 180.0), allowed_lateness_s=120.0)
    feed(agg, [ev("m", 1.0, H + 1, "sum")])
    feed(agg, [ev("m", 2.0, H + 61, "sum")])  # the first hour (60 s) is emitted
    out = feed(agg, [ev("m", 4.0, H + 3, "sum")])
    assert rows_of(out) == [(H, H + 10, 2, 5.0, 2), (H, H + 60, 2, 5.0, 2)]
    out = feed(agg, [ev("m", 0.0, H + 181, "sum")])
    assert (H, H + 180, 1, 7.0, 3) in rows_of(out)


def test_a_corrected_hour_merges_the_shares_of_every_partition() -> None:
    agg = make(allowed_lateness_s=120.0)
    feed(agg, [ev("m", 1.0, H + 1, "sum")], "p0")
    feed(agg, [ev("m", 2.0, H + 2, "sum")], "p1")
    feed(agg, [ev("m", 0.0, H + 61, "sum")], "p0")
    out = feed(agg, [ev("m", 0.0, H + 61, "sum")], "p1")
    assert (H, H + 60, 1, 3.0, 2) in rows_of(out)
    out = feed(agg, [ev("m", 4.0, H + 5, "sum")], "p1")
    assert rows_of(out) == [(H, H + 10, 2, 7.0, 3), (H, H + 60, 2, 7.0, 3)]


def test_kept_hours_travel_in_the_checkpoint() -> None:
    agg = make(allowed_lateness_s=120.0)
    feed(agg, [ev("m", 1.0, H + 1, "sum"), ev("m", 8.0, H + 61, "sum")])
    [cp] = agg.snapshot()
    assert cp.state is not None
    body = orjson.loads(cp.state)
    assert body["format"] == 4 and body["kept_rollups"]
    later = make(allowed_lateness_s=120.0)
    later.restore([cp])
    out = feed(later, [ev("m", 4.0, H + 3, "sum")])
    assert rows_of(out) == [(H, H + 10, 2, 5.0, 2), (H, H + 60, 2, 5.0, 2)]


def test_kept_hours_are_freed_after_the_lateness() -> None:
    agg = make(allowed_lateness_s=30.0)
    feed(agg, [ev("m", 1.0, H + 1, "sum"), ev("m", 8.0, H + 61, "sum")])
    [p] = agg._parts.values()
    assert p.kept_rollups[60.0]
    feed(agg, [ev("m", 8.0, H + 90, "sum")])  # watermark at the hour's end + 30
    assert not p.kept_rollups[60.0]


def test_a_correction_opens_a_partial_in_a_partition_without_one_for_the_open_hour() -> None:
    agg = make(allowed_lateness_s=120.0)
    feed(agg, [ev("m", 1.0, H + 1, "sum"), ev("m", 0.0, H + 30, "sum")], "p0")
    feed(agg, [ev("m", 2.0, H + 65, "sum")], "p1")  # p1's first window is in the next hour
    out = feed(agg, [ev("m", 4.0, H + 2, "sum")], "p1")  # late for [H, H+10) on p1
    assert rows_of(out) == [(H, H + 10, 2, 5.0, 2)]
    out = feed(agg, [ev("m", 0.0, H + 70, "sum")], "p0")
    hour = by_row(out)[("m", "sum", H, H + 60)]
    assert (hour.value, hour.count, hour.revision) == (5.0, 3, 1)
