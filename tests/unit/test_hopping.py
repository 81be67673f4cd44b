"""Hopping windows (AGGREGATION_HOP, service.aggregation.hopping): every window equals a
computation from the raw events, whatever the batching; panes are freed; the ledger
balances with each event once; late per window; checkpoints mid-window."""

from __future__ import annotations

import math
import random
import statistics
from collections import defaultdict
from typing import Any

import orjson
from hypothesis import given, settings
from hypothesis import strategies as st

from service.aggregation.aggregator import EventAggregator
from service.aggregation.functions import FUNCTIONS
from service.aggregation.hopping import covering
from service.aggregation.partition import HOP_STATE_FORMAT, STATE_FORMAT
from service.bus.base import SourceBatch
from service.config import AggregationConfig
from service.core.clock import ManualClock
from service.core.events import Aggregate
from service.metrics.collector import MetricsCollector

T0 = 1_700_000_040.0  # a multiple of 60 (and of 5, 10, 20)
CLOCK = T0 + 36_000.0  # far after every event time: none is ahead
FUNCS = list(FUNCTIONS)
Key = tuple[str, str, float]


def make(interval: float = 60.0, hop: float | None = 10.0, **cfg: Any) -> EventAggregator:
    clock = ManualClock(CLOCK)
    config = AggregationConfig(interval_s=interval, hop_s=hop, **cfg)
    return EventAggregator(config, MetricsCollector(clock), clock)


def batch(records: list[bytes], partition: str = "p0", caught_up: bool = False) -> SourceBatch:
    return SourceBatch(partition, records, "test", None, T0, None, caught_up)


def ev(name: str, func: str, value: float, ts: float) -> bytes:
    return orjson.dumps({"name": name, "agg_func": func, "value": value, "timestamp": ts})


def _percentile(values: list[float], q: float) -> float:
    v = sorted(values)
    h = (len(v) - 1) * q
    lo = math.floor(h)
    hi = min(lo + 1, len(v) - 1)
    return v[lo] + (h - lo) * (v[hi] - v[lo])


def reference(
    events: list[tuple[str, str, float, float]], interval: float, hop: float
) -> dict[Key, tuple[float, int]]:
    """Each window from the raw events (in arrival order), independently of the service:
    an event belongs to every window [s, s + interval) with s a multiple of the hop."""
    groups: dict[Key, list[tuple[float, float]]] = defaultdict(list)
    n = round(interval / hop)
    for name, func, value, ts in events:
        first = math.floor(ts / hop) * hop - (n - 1) * hop
        for j in range(n):
            groups[(name, func, first + j * hop)].append((ts, value))
    out: dict[Key, tuple[float, int]] = {}
    for key, pairs in groups.items():
        values = [v for _, v in pairs]
        func = key[1]
        if func == "sum":
            r = math.fsum(values)
        elif func == "avg":
            r = statistics.fmean(values)
        elif func == "min":
            r = min(values)
        elif func == "max":
            r = max(values)
        elif func == "count":
            r = float(len(values))
        elif func == "first":
            r = min(enumerate(pairs), key=lambda ip: (ip[1][0], ip[0]))[1][1]
        elif func == "last":
            r = max(enumerate(pairs), key=lambda ip: (ip[1][0], ip[0]))[1][1]
        elif func == "stddev":
            r = statistics.pstdev(values)
        else:
            r = _percentile(values, int(func[1:]) / 100)
        out[key] = (r, len(values))
    return out


def results(aggs: list[Aggregate]) -> dict[Key, tuple[float, int]]:
    out: dict[Key, tuple[float, int]] = {}
    for a in aggs:
        key = (a.name, a.agg_func, a.window_start)
        assert key not in out, f"{key} emitted twice"
        out[key] = (a.value, a.count)
    return out


def assert_equal(
    actual: dict[Key, tuple[float, int]], expected: dict[Key, tuple[float, int]]
) -> None:
    assert actual.keys() == expected.keys()
    for key, (value, count) in expected.items():
        got, got_count = actual[key]
        assert got_count == count, key
        tol = 0.01 if key[1].startswith("p") else 1e-9
        assert math.isclose(got, value, rel_tol=tol, abs_tol=1e-9), (key, got, value)


def feed(
    agg: EventAggregator,
    by_part: dict[str, list[tuple[str, str, float, float]]],
    cuts: int,
    rng: random.Random,
) -> list[Aggregate]:
    """Every partition's events in batches of random sizes (interleaved), then reports
    until the quiet rule has flushed everything."""
    out: list[Aggregate] = []
    for p in by_part:  # assigned, unread data: each holds the watermark from the start
        agg.process(batch([], p))
    queues = {p: list(evs) for p, evs in by_part.items()}
    while any(queues.values()):
        p = rng.choice([p for p, q in queues.items() if q])
        size = rng.randint(1, max(1, cuts))
        chunk, queues[p] = queues[p][:size], queues[p][size:]
        got = agg.process(batch([ev(*e) for e in chunk], p))
        assert got.dead_letters == []
        out += got.aggregates
    clock = agg._clock
    assert isinstance(clock, ManualClock)
    for p in by_part:
        out += agg.process(batch([], p, caught_up=True)).aggregates
    clock.advance(3600.0)
    for p in by_part:
        out += agg.process(batch([], p, caught_up=True)).aggregates
    return out


def workload(
    rng: random.Random, parts: int, per_part: int, span: float
) -> dict[str, list[tuple[str, str, float, float]]]:
    """Events in time order per partition (jitter within a pane of the grace)."""
    by_part: dict[str, list[tuple[str, str, float, float]]] = {}
    for i in range(parts):
        times = sorted(T0 + rng.uniform(0, span) for _ in range(per_part))
        by_part[f"p{i}"] = [
            (rng.choice(["a", "b"]), rng.choice(FUNCS), round(rng.uniform(-50, 50), 3), t)
            for t in times
        ]
    return by_part


def arrival_order(
    by_part: dict[str, list[tuple[str, str, float, float]]],
) -> list[tuple[str, str, float, float]]:
    return [e for evs in by_part.values() for e in evs]


def test_covering_windows() -> None:
    assert covering(120.0, 60.0, 60.0) == [120.0]
    assert covering(120.0, 10.0, 60.0) == [70.0, 80.0, 90.0, 100.0, 110.0, 120.0]


def test_every_window_equals_the_raw_events_for_all_functions() -> None:
    rng = random.Random(7)
    by_part = workload(rng, parts=3, per_part=400, span=600.0)
    agg = make()
    out = feed(agg, by_part, cuts=50, rng=rng)
    assert all(a.window_end - a.window_start == 60.0 for a in out)
    assert_equal(results(out), reference(arrival_order(by_part), 60.0, 10.0))
    assert agg.open_windows == 0
    assert all(not p.open_starts() for p in agg._parts.values())  # every pane freed
    ledger = agg.ledger()
    assert ledger["imbalance"] == 0
    assert ledger["received"] == ledger["emitted"] == 1200


@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    cuts=st.integers(1, 40),
    hop=st.sampled_from([5.0, 10.0, 20.0, 30.0]),
)
def test_batch_cuts_do_not_matter(seed: int, cuts: int, hop: float) -> None:
    rng = random.Random(seed)
    by_part = workload(rng, parts=2, per_part=60, span=240.0)
    agg = make(hop=hop)
    out = feed(agg, by_part, cuts=cuts, rng=rng)
    assert_equal(results(out), reference(arrival_order(by_part), 60.0, hop))
    assert agg.ledger()["imbalance"] == 0


def test_windows_are_emitted_when_the_boundary_passes_their_end() -> None:
    agg = make(interval=20.0, hop=5.0)
    out = agg.process(batch([ev("a", "sum", 1.0, T0 + 1), ev("a", "sum", 2.0, T0 + 4)]))
    assert out.aggregates == []
    out = agg.process(batch([ev("a", "sum", 4.0, T0 + 10)]))
    # the boundary is T0 + 10: the windows ending at T0 + 5 and T0 + 10
    got = {(a.window_start, a.window_end): a.value for a in out.aggregates}
    assert got == {(T0 - 15, T0 + 5): 3.0, (T0 - 10, T0 + 10): 3.0}
    # a pane is freed with its last window only: T0's once T0 + 20 is passed
    assert sorted(agg._parts["p0"].open_starts()) == [T0, T0 + 10]
    out = agg.process(batch([ev("a", "sum", 8.0, T0 + 21)]))
    got = {(a.window_start, a.window_end): a.value for a in out.aggregates}
    assert got == {(T0 - 5, T0 + 15): 7.0, (T0, T0 + 20): 7.0}
    assert sorted(agg._parts["p0"].open_starts()) == [T0 + 10, T0 + 20]
    assert agg.ledger()["emitted"] == 2 and agg.ledger()["open"] == 2


def test_a_late_event_misses_every_window_of_its_pane_and_counts_late_in_each() -> None:
    agg = make(interval=20.0, hop=5.0)
    agg.process(batch([ev("a", "sum", 1.0, T0 + 1), ev("a", "sum", 1.0, T0 + 30)]))
    p = agg._parts["p0"]
    assert p.closed_until == T0 + 30
    # pane T0 + 15 ends at T0 + 20: its first window [T0, T0 + 20) is out, so the event
    # is late for it and the 3 other windows covering the pane (T0 + 5 .. T0 + 15)
    out = agg.process(batch([ev("a", "sum", 5.0, T0 + 17)]))
    [dead] = out.dead_letters
    assert dead.reason == "late"
    assert p.late_windows == {("a", "sum", T0 + s): 1 for s in (0.0, 5.0, 10.0, 15.0)}
    out = agg.process(batch([ev("a", "sum", 5.0, T0 + 7)]))
    assert [d.reason for d in out.dead_letters] == ["late"]
    assert p.late_windows[("a", "sum", T0 - 10)] == 1
    assert p.late_windows[("a", "sum", T0 + 5)] == 2
    ledger = agg.ledger()
    assert ledger["late"] == 2 and ledger["imbalance"] == 0
    # the open pane (T0 + 30's) is all the window still to come holds
    out = agg.process(batch([ev("a", "sum", 1.0, T0 + 40)]))
    got = {a.window_start: a.value for a in out.aggregates}
    assert got == {T0 + 15: 1.0, T0 + 20: 1.0}
    assert agg.ledger()["imbalance"] == 0


def test_late_events_give_the_same_windows_however_batches_are_cut() -> None:
    """Out of order beyond the grace: each window is the same for any batch cut."""
    rng = random.Random(11)
    times = [T0 + i * 0.5 + rng.choice([0.0, 0.0, -12.0, -30.0]) for i in range(400)]
    records = [ev("a", rng.choice(FUNCS), float(i % 17), t) for i, t in enumerate(times)]

    def run(size: int) -> tuple[dict[Key, tuple[float, int]], list[str]]:
        agg = make(interval=20.0, hop=5.0)
        out: list[Aggregate] = []
        dead: list[str] = []
        for i in range(0, len(records), size):
            got = agg.process(batch(records[i : i + size]))
            out += got.aggregates
            dead += [d.reason for d in got.dead_letters]
        assert agg.ledger()["imbalance"] == 0
        return results(out), dead

    whole = run(len(records))
    for size in (1, 7, 50):
        assert run(size) == whole
    assert whole[1] and set(whole[1]) == {"late"}


def test_checkpoint_round_trip_mid_window() -> None:
    """Half the events, a checkpoint, the rest into an aggregator restored from it: the
    same windows as without the restart."""
    rng = random.Random(3)
    by_part = workload(rng, parts=2, per_part=300, span=300.0)
    agg = make(hop=20.0)
    out: list[Aggregate] = []
    for p in by_part:
        agg.process(batch([], p))
    for p, evs in by_part.items():
        out += agg.process(batch([ev(*e) for e in evs[:150]], p)).aggregates
    snap = agg.snapshot()
    assert {orjson.loads(cp.state or b"{}")["format"] for cp in snap} == {HOP_STATE_FORMAT}
    again = make(hop=20.0)
    again.restore(snap)
    assert again.open_windows == agg.open_windows
    rest = {p: evs[150:] for p, evs in by_part.items()}
    out += feed(again, rest, cuts=30, rng=rng)
    assert_equal(results(out), reference(arrival_order(by_part), 60.0, 20.0))
    ledger = again.ledger()
    assert ledger["imbalance"] == 0 and ledger["received"] == ledger["emitted"] == 600


def test_tumbling_state_format_is_unchanged() -> None:
    agg = make(hop=None)
    agg.process(batch([ev("a", "sum", 1.0, T0 + 1)]))
    [cp] = agg.snapshot()
    assert orjson.loads(cp.state or b"{}")["format"] == STATE_FORMAT
