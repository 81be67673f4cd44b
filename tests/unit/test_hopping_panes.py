"""Packed panes (service.aggregation.panes): a pane the close boundary passed is held
flat, and everything read from it equals what the unpacked pane gives — the windows'
accumulators (first/last event times, stddev moments, percentile values, wide and
sketch layouts), checkpoints, the ledger and the count of open keys."""

from __future__ import annotations

import copy
import random
from typing import Any

import orjson
from hypothesis import given, settings
from hypothesis import strategies as st

from service.aggregation.functions import FUNCTIONS, Acc
from service.aggregation.hopping import take_panes
from service.aggregation.panes import PackedPanes
from service.aggregation.partition import PartitionState
from service.aggregation.quantile_sketch import of as sketch_of
from service.core.clock import ManualClock
from tests.unit.test_hopping import T0, assert_equal, batch, ev, make, reference, results

HOP, INTERVAL = 10.0, 60.0
Pane = dict[tuple[str, str], Acc]

values = st.one_of(
    st.floats(-1e6, 1e6, allow_nan=False),
    st.sampled_from([0.0, -0.0, 1e300, -1e300, 5e-324]),
)


@st.composite
def accumulators(draw: st.DrawFn, func: str) -> Acc:
    """An accumulator of ``func`` built by its own functions, event times with ties."""
    vals = draw(st.lists(values, min_size=1, max_size=12))
    times = draw(st.lists(st.sampled_from([1.0, 2.0, 2.0, 3.5]), min_size=len(vals)))
    f = FUNCTIONS[func]
    acc = f.new(vals[0], times[0])
    for v, t in zip(vals[1:], times[1:], strict=False):
        f.add(acc, v, t)
    return acc


@st.composite
def panes(draw: st.DrawFn) -> dict[float, Pane]:
    """Up to 9 panes of a few series and every function."""
    out: dict[float, Pane] = {}
    for i in draw(st.sets(st.integers(0, 8), min_size=1)):
        pane: Pane = {}
        for name in draw(st.lists(st.sampled_from(["a", "b", 'c\x1f{"host":"x"}']), unique=True)):
            for func in draw(st.sets(st.sampled_from(sorted(FUNCTIONS)), min_size=1)):
                pane[(name, func)] = draw(accumulators(func))
        out[T0 + i * HOP] = pane
    return out


def exact(accs: dict[Any, Any]) -> str:
    """Accumulators as text, in order: -0.0 and 0.0, 1 and 1.0 differ."""
    return repr(list(accs.items()))


def partition(panes_: dict[float, Pane], closed_until: float, *, packed: bool) -> PartitionState:
    p = PartitionState(max_ts=closed_until, closed_until=closed_until)
    p.windows = copy.deepcopy(panes_)
    if packed:  # what take_panes packs: the panes the boundary passed
        p.packed = PackedPanes()
        for q in sorted(p.windows):
            if q + HOP <= closed_until:
                p.packed.pack(q, p.windows.pop(q))
    return p


@settings(max_examples=60, deadline=None)
@given(
    accs=st.lists(
        st.sampled_from(sorted(FUNCTIONS)).flatmap(
            lambda f: st.tuples(st.just(f), accumulators(f))
        ),
        max_size=20,
    )
)
def test_a_packed_pane_unpacks_to_equal_accumulators(accs: list[tuple[str, Acc]]) -> None:
    pane = {(f"s{i}", f): acc for i, (f, acc) in enumerate(accs)}
    # layouts kept as they are: wide (4th element), a sketch, a count of ints
    pane[("wide", "avg")] = [2, 1e300, 0.0, 3]
    pane[("wide", "stddev")] = [2, 1.0, 4.0, 600]
    pane[("sketch", "p50")] = [3, sketch_of([1.0, 2.0, 3.0])]
    pane[("ints", "min")] = [1, 5]
    pane[("many", "count")] = [70_000]
    packed = PackedPanes()
    packed.pack(T0, copy.deepcopy(pane))
    got = dict(packed.entries(T0))
    assert list(got) == list(pane)  # the order too
    assert exact(got) == exact(pane)
    assert packed.panes[T0].events == sum(a[0] for a in pane.values())
    again = dict(packed.entries(T0))  # entries are new lists: reading twice is the same
    assert exact(again) == exact(pane)
    assert all(again[k] is not got[k] for k in got)


@settings(max_examples=80, deadline=None)
@given(panes_=panes(), first=st.integers(0, 9), steps=st.lists(st.integers(1, 8), max_size=4))
def test_windows_merged_from_packed_panes_equal_those_from_unpacked_ones(
    panes_: dict[float, Pane], first: int, steps: list[int]
) -> None:
    closed = T0 + first * HOP
    plain = partition(panes_, closed, packed=False)
    packed = partition(panes_, closed, packed=True)
    boundary = closed
    for step in steps:
        boundary += step * HOP
        a = take_panes([plain], boundary, HOP, INTERVAL, idle_s=1e9)
        b = take_panes([packed], boundary, HOP, INTERVAL, idle_s=1e9)
        assert sorted(a.ready) == sorted(b.ready)
        for s in a.ready:
            assert exact(a.ready[s]) == exact(b.ready[s]), s
        assert a.keys == b.keys
        assert plain.totals == packed.totals
        assert plain.ledger_totals() == packed.ledger_totals()
        assert plain.open_windows() == packed.open_windows()
        assert sorted(plain.open_starts()) == sorted(packed.open_starts())


@settings(max_examples=40, deadline=None)
@given(panes_=panes(), first=st.integers(1, 9))
def test_a_packed_pane_checkpoints_as_the_unpacked_one(
    panes_: dict[float, Pane], first: int
) -> None:
    closed = T0 + first * HOP
    plain = partition(panes_, closed, packed=False)
    packed = partition(panes_, closed, packed=True)

    def body(p: PartitionState) -> dict[str, Any]:
        state: dict[str, Any] = orjson.loads(p.snapshot("p0", panes=True).state or b"{}")
        state["windows"] = sorted(state["windows"], key=orjson.dumps)
        return state

    assert body(packed) == body(plain)
    restored, dropped = PartitionState.restored(packed.snapshot("p0", panes=True), 0.0)
    assert dropped == []
    got = {(s, k): acc for s, keyed in restored.windows.items() for k, acc in keyed.items()}
    want = {(s, k): acc for s, keyed in panes_.items() for k, acc in keyed.items()}
    assert exact(dict(sorted(got.items()))) == exact(dict(sorted(want.items())))


def test_a_key_is_held_once_by_every_packed_and_open_pane() -> None:
    """The point of the table: a series' key (and name) is one object for all its
    panes, and slots of keys whose last packed pane is freed are reused."""
    agg = make(interval=INTERVAL, hop=HOP)
    for i in range(12):  # one event a pane for "a", panes 0..11; "b" in the first only
        names = ["a", "b"] if i == 0 else ["a"]
        agg.process(batch([ev(n, "sum", 1.0, T0 + i * HOP + 1) for n in names]))
    p = agg._parts["p0"]
    assert p.packed is not None
    table = p.packed.table
    assert len(table) == 1  # "b"'s pane was freed with its last window
    [key] = [k for k in table.keys if k == ("a", "sum")]
    live = [k for keyed in p.windows.values() for k in keyed]
    assert live and all(k is key for k in live)
    assert p.open_windows() == len(p.packed.panes) + len(live) == 6
    assert len(table.keys) == 2  # "b"'s slot is free for the next new key
    agg.process(batch([ev("c", "sum", 1.0, T0 + 12 * HOP + 1)]))
    agg.process(batch([ev("a", "sum", 1.0, T0 + 13 * HOP + 1)]))
    assert len(table.keys) == 2 and {k[0] for k in table.keys} == {"a", "c"}
    assert agg.ledger()["imbalance"] == 0


def test_a_pane_of_hundreds_of_events_a_key_gives_its_windows_exactly() -> None:
    """Counts above a byte (a wider count array), a late event for a packed pane, the
    ledger while panes are packed, then every window against the raw events."""
    agg = make(interval=INTERVAL, hop=HOP)
    rng = random.Random(5)
    funcs = sorted(FUNCTIONS)
    events = [
        ("a", funcs[i % len(funcs)], round(rng.uniform(-5, 5), 3), T0 + i * 0.0015)
        for i in range(6_000)  # 500 events a function, all in the pane at T0
    ]
    events.append(("a", "sum", 1.0, T0 + 15))  # the boundary passes the pane's end
    out = agg.process(batch([ev(*e) for e in events])).aggregates
    p = agg._parts["p0"]
    assert p.packed is not None and list(p.packed.panes) == [T0]
    assert p.packed.panes[T0].counts.typecode == "H"
    late = agg.process(batch([ev("a", "sum", 1.0, T0 + 1)]))
    assert [d.reason for d in late.dead_letters] == ["late"]
    ledger = agg.ledger()
    assert ledger["imbalance"] == 0 and ledger["open"] == 6_001
    assert agg.open_windows == p.open_windows() == len(funcs) + 1
    out += late.aggregates
    clock = agg._clock
    assert isinstance(clock, ManualClock)
    clock.advance(3600.0)
    out += agg.process(batch([], caught_up=True)).aggregates
    out += agg.process(batch([], caught_up=True)).aggregates
    assert_equal(results(out), reference(events, INTERVAL, HOP))
    assert agg.ledger()["emitted"] == 6_001
