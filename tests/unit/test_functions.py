"""Aggregation functions against plain reference computations, plus the percentile sketch."""

from __future__ import annotations

import copy
import itertools
import math
import random
import statistics
from collections.abc import Callable, Sequence
from fractions import Fraction

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from service.aggregation import quantile_sketch as dd
from service.aggregation.functions import FUNCTIONS, PERCENTILE_EXACT_LIMIT, Acc, AggFunction
from service.core.events import AGG_FUNCS

Events = list[tuple[float, float]]  # (value, ts) in arrival order

values = st.one_of(
    st.floats(min_value=-1e12, max_value=1e12, allow_nan=False, allow_infinity=False),
    st.integers(min_value=-1_000_000, max_value=1_000_000),
)
# Few distinct small timestamps make ties common; large ones look like real epoch seconds.
timestamps = st.one_of(st.integers(0, 3).map(float), st.floats(1.6e9, 1.8e9))
event_lists = st.lists(st.tuples(values, timestamps), min_size=1, max_size=60)


def _percentile_reference(q: Fraction) -> Callable[[Events], float]:
    """numpy.percentile(..., method="linear") in exact rational arithmetic."""

    def reference(events: Events) -> float:
        ordered = sorted(v for v, _ in events)
        h = (len(ordered) - 1) * q
        lower = math.floor(h)
        fraction = h - lower
        if fraction == 0:
            return float(ordered[lower])
        a, b = Fraction(ordered[lower]), Fraction(ordered[lower + 1])
        return float(a + fraction * (b - a))

    return reference


def _first(events: Events) -> float:
    return events[min(range(len(events)), key=lambda i: (events[i][1], i))][0]


def _last(events: Events) -> float:
    return events[max(range(len(events)), key=lambda i: (events[i][1], i))][0]


REFERENCES: dict[str, Callable[[Events], float]] = {
    "sum": lambda ev: math.fsum(v for v, _ in ev),
    "avg": lambda ev: float(statistics.mean(Fraction(v) for v, _ in ev)),
    "min": lambda ev: min(v for v, _ in ev),
    "max": lambda ev: max(v for v, _ in ev),
    "count": len,
    "first": _first,
    "last": _last,
    "stddev": lambda ev: float(statistics.pstdev([Fraction(v) for v, _ in ev])),
    "p50": _percentile_reference(Fraction(50, 100)),
    "p90": _percentile_reference(Fraction(90, 100)),
    "p95": _percentile_reference(Fraction(95, 100)),
    "p99": _percentile_reference(Fraction(99, 100)),
}

# stddev and interpolated percentiles are computed from differences of the inputs, so their
# rounding error is relative to the inputs' magnitude, not the (possibly tiny) result's.
INPUT_SCALED = {"stddev", "p50", "p90", "p95", "p99"}
# stddev squares deviations: below ~1e-154 they underflow to 0, a documented double limit.
ABSOLUTE_FLOOR = {"stddev": 1e-150}


def _assert_matches_reference(name: str, actual: float, events: Events) -> None:
    expected = REFERENCES[name](events)
    scale = max(abs(v) for v, _ in events) if name in INPUT_SCALED else 1.0
    assert isinstance(actual, float)
    abs_tol = 1e-9 * scale + ABSOLUTE_FLOOR.get(name, 0.0)
    assert math.isclose(actual, expected, rel_tol=1e-9, abs_tol=abs_tol), (
        f"{name}: got {actual!r}, reference {expected!r}"
    )


def _accumulate(fn: AggFunction, events: Sequence[tuple[float, float]]) -> Acc:
    acc = fn.new(*events[0])
    for value, ts in events[1:]:
        fn.add(acc, value, ts)
    return acc


def _split(events: Events, cuts: list[int]) -> list[Events]:
    points = sorted({c % len(events) for c in cuts} - {0})
    bounds = [0, *points, len(events)]
    return [events[a:b] for a, b in itertools.pairwise(bounds)]


def test_functions_are_exactly_the_contract_names() -> None:
    assert tuple(FUNCTIONS) == AGG_FUNCS
    assert all(fn.name == name for name, fn in FUNCTIONS.items())


@pytest.mark.parametrize("name", AGG_FUNCS)
@given(events=event_lists)
def test_result_matches_the_reference_computation(name: str, events: Events) -> None:
    acc = _accumulate(FUNCTIONS[name], events)
    assert acc[0] == len(events)
    _assert_matches_reference(name, FUNCTIONS[name].result(acc), events)


@pytest.mark.parametrize("name", AGG_FUNCS)
@given(events=event_lists, cuts=st.lists(st.integers(0, 60), max_size=4), from_left=st.booleans())
def test_merging_split_parts_gives_the_result_of_the_whole(
    name: str, events: Events, cuts: list[int], from_left: bool
) -> None:
    fn = FUNCTIONS[name]
    parts = [_accumulate(fn, part) for part in _split(events, cuts)]
    if from_left:  # ((a + b) + c) + d
        merged = parts[0]
        for part in parts[1:]:
            fn.merge(merged, part)
    else:  # a + (b + (c + d)): `into` is still always the earlier arrivals
        merged = parts[-1]
        for part in reversed(parts[:-1]):
            fn.merge(part, merged)
            merged = part
    assert merged[0] == len(events)
    _assert_matches_reference(name, fn.result(merged), events)


@pytest.mark.parametrize("name", AGG_FUNCS)
@given(events=event_lists, more=event_lists)
def test_merge_never_changes_or_shares_the_other_accumulator(
    name: str, events: Events, more: Events
) -> None:
    fn = FUNCTIONS[name]
    into, other = _accumulate(fn, events), _accumulate(fn, more)
    before = copy.deepcopy(other)
    fn.merge(into, other)
    for value, ts in more:
        fn.add(into, value, ts)
    assert other == before


@pytest.mark.parametrize("name", AGG_FUNCS)
@given(events=event_lists, more=event_lists)
def test_accumulator_survives_an_orjson_round_trip(name: str, events: Events, more: Events) -> None:
    fn = FUNCTIONS[name]
    acc = _accumulate(fn, events)
    restored = orjson.loads(orjson.dumps(acc))
    assert fn.result(restored) == fn.result(acc)
    for value, ts in more:  # a restored window keeps aggregating as if nothing happened
        fn.add(acc, value, ts)
        fn.add(restored, value, ts)
    assert restored[0] == acc[0]
    assert fn.result(restored) == fn.result(acc)


def test_first_keeps_the_earlier_arrival_when_timestamps_tie() -> None:
    first = FUNCTIONS["first"]
    acc = first.new(1.0, 10.0)
    first.add(acc, 2.0, 10.0)
    assert first.result(acc) == 1.0
    first.add(acc, 3.0, 9.0)
    assert first.result(acc) == 3.0


def test_last_takes_the_later_arrival_when_timestamps_tie() -> None:
    last = FUNCTIONS["last"]
    acc = last.new(1.0, 10.0)
    last.add(acc, 2.0, 10.0)
    assert last.result(acc) == 2.0
    last.add(acc, 3.0, 9.0)  # arrives later but happened earlier
    assert last.result(acc) == 2.0


@pytest.mark.parametrize(("name", "expected"), [("first", 1.0), ("last", 2.0)])
def test_merge_counts_into_as_the_earlier_arrival_when_timestamps_tie(
    name: str, expected: float
) -> None:
    fn = FUNCTIONS[name]
    into, other = fn.new(1.0, 10.0), fn.new(2.0, 10.0)
    fn.merge(into, other)
    assert fn.result(into) == expected


def test_stddev_of_one_value_is_zero() -> None:
    assert FUNCTIONS["stddev"].result(FUNCTIONS["stddev"].new(123.456, 0.0)) == 0.0


def test_stddev_stays_accurate_for_a_large_mean_and_small_spread() -> None:
    # Sum-of-squares would lose every digit here; Welford must not.
    events = [(1e9 + d, 0.0) for d in (4.0, 7.0, 13.0, 16.0)]
    result = FUNCTIONS["stddev"].result(_accumulate(FUNCTIONS["stddev"], events))
    assert math.isclose(result, math.sqrt(22.5), rel_tol=1e-12)


def test_sum_keeps_small_values_next_to_cancelling_large_ones() -> None:
    # 1e-5 is below half an ulp of 1e12: a plain running sum drops it for good.
    events = [(1e12, 0.0), (1e-5, 0.0), (-1e12, 0.0), (3.0, 0.0)]
    for name, expected in (("sum", 3.00001), ("avg", 3.00001 / 4)):
        fn = FUNCTIONS[name]
        assert math.isclose(fn.result(_accumulate(fn, events)), expected, rel_tol=1e-15)
        split = _accumulate(fn, events[:1])
        fn.merge(split, _accumulate(fn, events[1:]))
        assert math.isclose(fn.result(split), expected, rel_tol=1e-15)


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        # numpy.percentile(data, [50, 90, 95, 99]) with the default method
        ([1, 2, 3, 4], (2.5, 3.7, 3.85, 3.97)),
        (list(range(1, 11)), (5.5, 9.1, 9.55, 9.91)),
        ([7.0], (7.0, 7.0, 7.0, 7.0)),
    ],
)
def test_percentiles_match_numpy_linear_interpolation(
    data: list[float], expected: tuple[float, ...]
) -> None:
    for name, want in zip(("p50", "p90", "p95", "p99"), expected, strict=True):
        fn = FUNCTIONS[name]
        acc = _accumulate(fn, [(v, 0.0) for v in reversed(data)])
        assert math.isclose(fn.result(acc), want, rel_tol=1e-12), name


# -- beyond PERCENTILE_EXACT_LIMIT ----------------------------------------------------------

PERCENTILES = {"p50": 0.50, "p90": 0.90, "p95": 0.95, "p99": 0.99}


def _assert_within_one_percent(actual: float, ordered: list[float], q: float) -> None:
    """The documented bound: 1 % relative, or 1 % of the larger neighbour across zero."""
    h = (len(ordered) - 1) * q
    lower = math.floor(h)
    a, b = ordered[lower], ordered[min(lower + 1, len(ordered) - 1)]
    exact = a + (h - lower) * (b - a)
    bound = 0.01 * max(-a, b) if a < 0 < b else 0.01 * abs(exact)
    assert abs(actual - exact) <= bound, f"q={q}: got {actual}, exact {exact}"


def _uniform(rng: random.Random) -> float:
    return rng.uniform(0.0, 1000.0)


def _exponential(rng: random.Random) -> float:
    return rng.expovariate(1.0)


def _signed_with_zeros(rng: random.Random) -> float:
    return 0.0 if rng.random() < 0.3 else rng.gauss(0.0, 100.0)


def _wide_magnitudes(rng: random.Random) -> float:
    return rng.choice((-1.0, 1.0)) * math.pow(10.0, rng.uniform(-9.0, 9.0))


@pytest.mark.parametrize("draw", [_uniform, _exponential, _signed_with_zeros, _wide_magnitudes])
def test_percentiles_beyond_the_exact_limit_are_within_one_percent(
    draw: Callable[[random.Random], float],
) -> None:
    rng = random.Random(draw.__name__)
    data = [draw(rng) for _ in range(3 * PERCENTILE_EXACT_LIMIT)]
    ordered = sorted(data)
    for name, q in PERCENTILES.items():
        fn = FUNCTIONS[name]
        acc = _accumulate(fn, [(v, 0.0) for v in data])
        assert isinstance(acc[1], dict)  # really the sketch, not the exact list
        _assert_within_one_percent(fn.result(acc), ordered, q)


def test_percentiles_stay_exact_up_to_the_limit_and_switch_after_it() -> None:
    rng = random.Random(7)
    fn = FUNCTIONS["p90"]
    data = [(rng.expovariate(1.0), 0.0) for _ in range(PERCENTILE_EXACT_LIMIT + 1)]
    acc = _accumulate(fn, data[:-1])
    assert isinstance(acc[1], list)
    _assert_matches_reference("p90", fn.result(acc), data[:-1])
    fn.add(acc, *data[-1])
    assert isinstance(acc[1], dict)
    assert acc[0] == PERCENTILE_EXACT_LIMIT + 1
    _assert_within_one_percent(fn.result(acc), sorted(v for v, _ in data), 0.9)


def test_merging_exact_lists_past_the_limit_converts_to_the_sketch() -> None:
    rng = random.Random(11)
    fn = FUNCTIONS["p99"]
    left = [(rng.uniform(-50.0, 500.0), 0.0) for _ in range(6_000)]
    right = [(rng.uniform(-50.0, 500.0), 0.0) for _ in range(6_000)]
    into, other = _accumulate(fn, left), _accumulate(fn, right)
    assert isinstance(into[1], list) and isinstance(other[1], list)
    fn.merge(into, other)
    assert isinstance(into[1], dict)
    assert into[0] == 12_000
    _assert_within_one_percent(fn.result(into), sorted(v for v, _ in left + right), 0.99)


@pytest.mark.parametrize("sizes", [(12_000, 12_000), (12_000, 50), (50, 12_000)])
def test_merging_any_mix_of_exact_and_sketch_equals_one_sketch_of_everything(
    sizes: tuple[int, int],
) -> None:
    rng = random.Random(str(sizes))
    fn = FUNCTIONS["p50"]
    left = [(rng.gauss(0.0, 10.0), 0.0) for _ in range(sizes[0])]
    right = [(rng.gauss(0.0, 10.0), 0.0) for _ in range(sizes[1])]
    into, other = _accumulate(fn, left), _accumulate(fn, right)
    before = copy.deepcopy(other)
    fn.merge(into, other)
    assert into[1] == dd.of(v for v, _ in left + right)
    fn.add(into, -1e6, 0.0)
    fn.add(into, 1e6, 0.0)
    assert other == before


def test_sketch_survives_an_orjson_round_trip_and_keeps_counting() -> None:
    rng = random.Random(3)
    original = dd.of(rng.uniform(-1.0, 1.0) for _ in range(1_000))
    original["zero"] += 5
    restored = orjson.loads(orjson.dumps(original))
    assert restored == original
    for value in (1e6, -1e-6, 0.0):
        dd.add(original, value)
        dd.add(restored, value)
    assert restored == original
    assert dd.quantile(restored, 0.3) == dd.quantile(original, 0.3)
