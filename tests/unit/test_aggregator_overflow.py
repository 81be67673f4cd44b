"""Values at the edge of the double range through the aggregator, its checkpoints and a
restart: every output is finite, an event that would overflow a sum is rejected
(``overflow``), and no checkpoint, however broken, makes a restore or an emission raise."""

from __future__ import annotations

import contextlib
import math
import sys
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from service.aggregation import quantile_sketch
from service.aggregation.aggregator import EventAggregator
from service.aggregation.functions import FUNCTIONS
from service.aggregation.partition import PartitionState
from service.bus.base import SourceBatch
from service.checkpoints.base import PartitionCheckpoint
from service.checkpoints.file import FileCheckpointStore
from service.config import AggregationConfig
from service.core.clock import ManualClock
from service.core.events import AGG_FUNCS
from service.metrics.collector import MetricsCollector
from service.pipeline.flow import Outputs

NOW = 1_700_000_000.0
START = NOW // 60 * 60 - 60  # a window that is open at NOW
MAX = sys.float_info.max


def make(clock: ManualClock | None = None) -> tuple[EventAggregator, ManualClock, MetricsCollector]:
    clock = clock or ManualClock(NOW)
    metrics = MetricsCollector(clock)
    return EventAggregator(AggregationConfig(interval_s=60.0), metrics, clock), clock, metrics


def batch(records: list[Any], partition: str = "p0", position: str | None = None) -> SourceBatch:
    return SourceBatch(partition, records, f"test {partition}", position, NOW, None, False)


def ev(name: str, value: float, ts: float, func: str = "sum") -> bytes:
    return orjson.dumps({"name": name, "value": value, "timestamp": ts, "agg_func": func})


def close_window(agg: EventAggregator, partition: str = "p0") -> Outputs:
    """An on-time event of a later window moves the watermark past START's window."""
    return agg.process(batch([ev("later", 1.0, START + 120)], partition))


def assert_all_finite(out: Outputs) -> None:
    for a in out.aggregates:
        assert math.isfinite(a.value), a
        orjson.loads(orjson.dumps(a.to_json_obj()))  # parses back: no null value
        assert orjson.loads(orjson.dumps(a.to_json_obj()))["value"] is not None


def values_of(out: Outputs) -> dict[tuple[str, str], tuple[float, int]]:
    return {(a.name, a.agg_func): (a.value, a.count) for a in out.aggregates if a.name != "later"}


def test_the_event_that_would_overflow_a_sum_is_rejected_and_the_window_keeps_its_value() -> None:
    agg, _, metrics = make()
    out = agg.process(batch([ev("a", 1.7e308, START + 1), ev("a", 1.7e308, START + 2)]))
    [dead] = out.dead_letters
    assert dead.reason == "overflow"
    assert orjson.loads(dead.raw)["value"] == 1.7e308
    out = agg.process(batch([ev("a", -1.0, START + 3), ev("a", 1.0, START + 4)]))
    assert out.dead_letters == []
    out = close_window(agg)
    assert_all_finite(out)
    assert values_of(out) == {("a", "sum"): (1.7e308, 3)}
    assert metrics.events_rejected["overflow"] == 1
    ledger = agg.ledger()
    assert ledger["rejected:overflow"] == 1
    assert ledger["imbalance"] == 0


def test_avg_stddev_and_percentiles_of_extreme_values_are_finite_and_exact() -> None:
    agg, _, _ = make()
    agg.process(
        batch(
            [
                ev("a", 1.7e308, START + 1, "avg"),
                ev("a", 1.7e308, START + 2, "avg"),
                ev("s", 1e308, START + 1, "stddev"),
                ev("s", -1e308, START + 2, "stddev"),
                ev("p", -1.7e308, START + 1, "p50"),
                ev("p", 1.7e308, START + 2, "p50"),
            ]
        )
    )
    out = close_window(agg)
    assert out.dead_letters == []
    assert_all_finite(out)
    assert values_of(out) == {
        ("a", "avg"): (1.7e308, 2),
        ("s", "stddev"): (1e308, 2),
        ("p", "p50"): (0.0, 2),
    }


async def test_overflow_values_through_a_restart_stay_finite_and_exact(tmp_path: Path) -> None:
    agg, clock, _ = make()
    records = [
        ev("a", 1.7e308, START + 1),
        ev("a", 1.7e308, START + 2),  # rejected: overflow
        ev("m", 1.7e308, START + 1, "avg"),
        ev("m", 1.7e308, START + 2, "avg"),
        ev("s", 1e308, START + 1, "stddev"),
        ev("s", -1e308, START + 2, "stddev"),
    ]
    out = agg.process(batch(records, position="6"))
    assert [d.reason for d in out.dead_letters] == ["overflow"]
    async with FileCheckpointStore(str(tmp_path), "ns") as store:
        await store.save(agg.snapshot())
    async with FileCheckpointStore(str(tmp_path), "ns") as store:
        loaded = await store.load(["p0"])
    again, _, _ = make(clock)
    again.restore(list(loaded.values()))
    assert again.positions() == {"p0": "6"}
    more = [
        ev("a", 1.7e308, START + 3),  # still beyond the range: rejected
        ev("a", -0.7e308, START + 4),
        ev("m", 1.7e308, START + 3, "avg"),
        ev("s", 0.0, START + 3, "stddev"),
    ]
    out = again.process(batch(more, position="10"))
    assert [d.reason for d in out.dead_letters] == ["overflow"]
    out = close_window(again)
    assert_all_finite(out)
    got = values_of(out)
    assert got[("a", "sum")] == (1e308, 2)
    assert got[("m", "avg")] == (1.7e308, 3)
    value, count = got[("s", "stddev")]
    assert count == 3 and math.isclose(value, math.sqrt(2 / 3) * 1e308, rel_tol=1e-15)
    assert again.ledger()["imbalance"] == 0


def test_a_sum_merged_from_partitions_never_leaves_the_double_range() -> None:
    agg, _, metrics = make()
    agg.process(batch([ev("a", 1.7e308, START + 1)], "p0"))
    agg.process(batch([ev("a", 1.7e308, START + 2)], "p1"))
    agg.process(batch([ev("later", 1.0, START + 120)], "p0"))
    out = agg.process(batch([ev("later", 1.0, START + 120)], "p1"))
    assert_all_finite(out)
    assert values_of(out) == {("a", "sum"): (1.7e308, 1)}
    assert metrics.events_rejected["overflow"] == 1
    ledger = agg.ledger()
    assert ledger["rejected:overflow"] == 1
    assert ledger["imbalance"] == 0


def _old_release_state(windows: list[list[Any]], received: int) -> bytes:
    """A state body as the release before 1.3 wrote it (orjson writes inf as null)."""
    return orjson.dumps(
        {
            "format": 1,
            "max_ts": START + 2,
            "closed_until": None,
            "origins": {},
            "routed": None,
            "ledger": {"totals": {"received": received, "aggregated": received}},
            "windows": windows,
        }
    )


def test_a_checkpoint_holding_an_overflowed_sum_restores_without_raising() -> None:
    state = _old_release_state(
        [[START, "a", "sum", [2, math.inf, 0.0]], [START, "b", "sum", [1, 5.0, 0.0]]], 3
    )
    assert b"null" in state  # what the old encoder made of the overflowed total
    agg, _, metrics = make()
    agg.restore([PartitionCheckpoint("p0", "3", state)])
    assert agg.open_windows == 1
    out = close_window(agg)
    assert_all_finite(out)
    assert values_of(out) == {("b", "sum"): (5.0, 1)}
    assert metrics.state_dropped == {"window": 1}
    ledger = agg.ledger()
    assert ledger["dropped"] == 2
    assert ledger["imbalance"] == 0


@pytest.mark.parametrize(
    "entry",
    [
        [START, "a", "sum", "not a list"],
        [START, "a", "sum", [2, 1.0]],
        [START, "a", "stddev", [2, None, 0.0]],
        [START, "a", "p50", [3, [1.0]]],
        [START, "a", "p50", [1, {"zero": "x"}]],
        [START, "a", "no_such_func", [1]],
        ["yesterday", "a", "sum", [1, 1.0, 0.0]],
        [START, None, "sum", [1, 1.0, 0.0]],
        [START, "a"],
        "garbage",
        None,
    ],
)
def test_a_window_of_wrong_types_is_dropped_not_raised(entry: Any) -> None:
    state = _old_release_state([entry, [START, "b", "max", [1, 5.0]]], 2)
    agg, _, metrics = make()
    agg.restore([PartitionCheckpoint("p0", "3", state)])
    out = close_window(agg)
    assert values_of(out) == {("b", "max"): (5.0, 1)}
    assert metrics.state_dropped == {"window": 1}


@pytest.mark.parametrize(
    "state",
    [
        b'{"format": 1, "max_ts": 1.0, "windows": [[1',  # truncated
        b"[]",
        b'{"format": 1, "max_ts": "soon", "closed_until": null, "windows": []}',
        b'{"format": 1, "max_ts": 1.0, "closed_until": null, "windows": {}}',
        b'{"format": 1, "max_ts": 1.0, "closed_until": null, "ledger": [1], "windows": []}',
    ],
)
def test_an_unreadable_state_restores_the_position_alone(state: bytes) -> None:
    agg, _, metrics = make()
    agg.restore([PartitionCheckpoint("p0", "3", state)])
    assert agg.positions() == {"p0": "3"}
    assert agg.open_windows == 0
    assert metrics.state_dropped == {"partition": 1}
    agg.process(batch([ev("a", 1.0, START + 1)]))
    assert values_of(close_window(agg)) == {("a", "sum"): (1.0, 1)}


# -- every state round-trips through the checkpoint encoding exactly ---------------------

EDGES = [MAX, -MAX, 1.7e308, -1.7e308, 1e154, 5e-324, -5e-324, 2.2250738585072014e-308, -0.0]
extreme = st.one_of(st.sampled_from(EDGES), st.floats(allow_nan=False, allow_infinity=False))


def _same(a: Any, b: Any) -> bool:
    """Equal, and -0.0 is not 0.0, float is not int."""
    if type(a) is not type(b):
        return False
    if type(a) is float:
        return a == b and math.copysign(1.0, a) == math.copysign(1.0, b)
    if type(a) is list:
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    if type(a) is dict:
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return bool(a == b)


@st.composite
def accumulators(draw: st.DrawFn, func: str) -> list[Any]:
    fn = FUNCTIONS[func]
    values = draw(st.lists(extreme, min_size=1, max_size=30))
    acc = fn.new(values[0], draw(st.floats(0, 2e9)))
    for v in values[1:]:
        with contextlib.suppress(OverflowError):  # the aggregator rejects that event
            fn.add(acc, v, draw(st.floats(0, 2e9)))
    if func.startswith("p") and draw(st.booleans()):  # the sketch, as past 10,000 values
        acc[1] = quantile_sketch.of(acc[1])
    if draw(st.booleans()):  # a count as a long-lived window could have
        acc[0] += draw(st.integers(0, 2**61)) if func == "count" else 0
    return acc


@settings(max_examples=60, deadline=None)
@given(data=st.data(), funcs=st.lists(st.sampled_from(AGG_FUNCS), min_size=1, max_size=12))
def test_every_window_state_round_trips_through_a_checkpoint(
    data: st.DataObject, funcs: list[str]
) -> None:
    p = PartitionState(max_ts=START + 2.5, position="9")
    for i, func in enumerate(funcs):
        p.windows.setdefault(START + 60 * (i % 3), {})[(f"n{i}", func)] = data.draw(
            accumulators(func)
        )
    cp = p.snapshot("p0")
    back, dropped = PartitionState.restored(cp, 0.0)
    assert dropped == []
    assert back.windows.keys() == p.windows.keys()
    for start, keyed in p.windows.items():
        assert keyed.keys() == back.windows[start].keys()
        for key, acc in keyed.items():
            assert _same(acc, back.windows[start][key]), (key, acc, back.windows[start][key])
            assert math.isfinite(FUNCTIONS[key[1]].result(back.windows[start][key]))


def test_only_a_state_with_a_wide_accumulator_gets_the_new_format() -> None:
    agg, clock, _ = make()
    agg.process(batch([ev("a", 1.0, START + 1, "avg"), ev("a", 2.0, START + 2, "avg")], "p0"))
    agg.process(
        batch([ev("a", 1.7e308, START + 1, "avg"), ev("a", 1.7e308, START + 2, "avg")], "p1")
    )
    formats = {c.partition: orjson.loads(c.state or b"")["format"] for c in agg.snapshot()}
    assert formats == {"p0": 1, "p1": 2}  # a release before 1.3 reads p0 and refuses p1
    again, _, _ = make(clock)
    again.restore(agg.snapshot())
    out = again.process(batch([ev("later", 1.0, START + 120)], "p0"))
    out.extend(again.process(batch([ev("later", 1.0, START + 120)], "p1")))
    assert values_of(out) == {("a", "avg"): (1.7e308 / 2 + 0.75, 4)}
