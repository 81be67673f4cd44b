"""Aggregation functions at the edges of the double range, against exact arithmetic.

Every result is a finite double; ``avg``, ``stddev`` and percentiles never overflow on the
way; a ``sum`` refuses (``OverflowError``, accumulator unchanged) exactly the events that
would take it beyond the double range.
"""

from __future__ import annotations

import copy
import math
import statistics
import sys
from collections.abc import Sequence
from fractions import Fraction

import pytest
from hypothesis import given
from hypothesis import strategies as st

from service.aggregation import quantile_sketch
from service.aggregation.functions import FUNCTIONS, Acc, valid
from service.core.events import AGG_FUNCS

MAX = sys.float_info.max
EPS = sys.float_info.epsilon

EDGES = [MAX, 1.7e308, 1e308, 1e200, 1e154, 5e-324, 2.2250738585072014e-308, 0.0, -0.0, 1.0]
extreme = st.one_of(
    st.sampled_from(EDGES + [-x for x in EDGES]),
    st.floats(allow_nan=False, allow_infinity=False),
)
extreme_lists = st.lists(extreme, min_size=1, max_size=40)


def _run(name: str, values: Sequence[float]) -> tuple[Acc, list[float]]:
    """Accumulate in arrival order; returns the accumulator and the accepted values."""
    acc, kept = _run_indexed(name, values)
    return acc, [values[i] for i in kept]


def _run_indexed(name: str, values: Sequence[float]) -> tuple[Acc, list[int]]:
    fn = FUNCTIONS[name]
    acc = fn.new(values[0], 0.0)
    kept = [0]
    for i, v in enumerate(values[1:], 1):
        before = copy.deepcopy(acc)
        try:
            fn.add(acc, v, 0.0)
        except OverflowError:
            assert acc == before, "a refused event must leave the accumulator unchanged"
            continue
        kept.append(i)
    return acc, kept


def _close(got: float, exact: Fraction, scale: float, roundings: int = 4) -> bool:
    """Within a few roundings of the exact value and of the inputs' magnitude (and of
    the subnormal grid, where rounding is absolute)."""
    tolerance = roundings * Fraction(EPS) * (abs(exact) + Fraction(scale)) + Fraction(5e-324)
    return abs(Fraction(got) - exact) <= tolerance


def test_avg_of_two_near_max_values_is_that_value() -> None:
    acc, _ = _run("avg", [1.7e308, 1.7e308])
    assert FUNCTIONS["avg"].result(acc) == 1.7e308
    acc, _ = _run("avg", [MAX, MAX, MAX])
    assert FUNCTIONS["avg"].result(acc) == MAX


def test_stddev_of_opposite_near_max_values_is_finite_and_exact() -> None:
    acc, _ = _run("stddev", [1e308, -1e308])
    assert FUNCTIONS["stddev"].result(acc) == 1e308


@pytest.mark.parametrize("name", ["p50", "p90", "p95", "p99"])
def test_percentile_between_opposite_near_max_values_is_finite(name: str) -> None:
    acc, _ = _run(name, [-1.7e308, 1.7e308])
    q = Fraction(int(name[1:]), 100)
    expected = float(Fraction(-1.7e308) + q * (Fraction(1.7e308) - Fraction(-1.7e308)))
    assert math.isclose(FUNCTIONS[name].result(acc), expected, rel_tol=1e-15)
    big = quantile_sketch.of([-MAX, MAX, -1.7e308, 1.7e308])
    for q_ in (0.0, 0.3, 0.5, 0.99, 1.0):
        assert math.isfinite(quantile_sketch.quantile(big, q_))


def test_sum_refuses_the_event_that_would_overflow_and_keeps_its_value() -> None:
    fn = FUNCTIONS["sum"]
    acc = fn.new(1.7e308, 0.0)
    with pytest.raises(OverflowError):
        fn.add(acc, 1.7e308, 0.0)
    assert acc[0] == 1
    assert fn.result(acc) == 1.7e308
    fn.add(acc, -1.7e308, 0.0)  # the total is back in range: accepted
    fn.add(acc, 1e308, 0.0)
    assert (acc[0], fn.result(acc)) == (3, 1e308)


def test_a_sum_at_the_limit_takes_what_rounds_back_to_it_and_refuses_more() -> None:
    values = [MAX, 1e200, 9.979200952866836e291]  # found by hypothesis: rounds to MAX
    acc, accepted = _run("sum", values)
    assert (accepted, FUNCTIONS["sum"].result(acc)) == (values, MAX)
    assert valid("sum", acc)
    acc, accepted = _run("sum", [*values, 2.0**971])  # half an ulp of MAX more: inf
    assert (accepted, FUNCTIONS["sum"].result(acc)) == (values, MAX)


def test_merging_sums_that_would_overflow_raises_and_keeps_the_target() -> None:
    fn = FUNCTIONS["sum"]
    into, other = fn.new(1.7e308, 0.0), fn.new(1.7e308, 0.0)
    with pytest.raises(OverflowError):
        fn.merge(into, other)
    assert (into[0], fn.result(into)) == (1, 1.7e308)


@given(values=extreme_lists)
def test_sum_accepts_exactly_what_stays_finite(values: list[float]) -> None:
    acc, kept = _run_indexed("sum", values)
    got = FUNCTIONS["sum"].result(acc)
    assert math.isfinite(got)
    assert acc[0] == len(kept)
    accepted = [values[i] for i in kept]
    assert _close(got, sum(map(Fraction, accepted), Fraction(0)), max(abs(v) for v in accepted))
    total = Fraction(values[0])
    for i, v in enumerate(values[1:], 1):
        if i in kept:
            total += Fraction(v)
        else:  # every refusal is justified: the total would have left the range
            assert abs(total + Fraction(v)) > Fraction(MAX) * (1 - Fraction(4 * EPS))


@given(values=extreme_lists)
def test_avg_is_finite_and_exact_whatever_the_values(values: list[float]) -> None:
    acc, accepted = _run("avg", values)
    assert accepted == values
    got = FUNCTIONS["avg"].result(acc)
    exact = sum(map(Fraction, values), Fraction(0)) / len(values)
    assert math.isfinite(got)
    assert _close(got, exact, max(abs(v) for v in values))


@given(values=extreme_lists)
def test_stddev_is_finite_and_matches_statistics(values: list[float]) -> None:
    acc, accepted = _run("stddev", values)
    assert accepted == values
    got = FUNCTIONS["stddev"].result(acc)
    expected = float(statistics.pstdev([Fraction(v) for v in values]))
    scale = max(abs(v) for v in values)
    assert math.isfinite(got)
    # Welford's rounding is relative to the inputs; below ~1e-150 squares underflow
    assert math.isclose(got, expected, rel_tol=1e-9, abs_tol=1e-9 * scale + 1e-150)


@pytest.mark.parametrize("name", ["p50", "p90", "p95", "p99"])
@given(values=extreme_lists)
def test_percentiles_are_finite_and_exact(name: str, values: list[float]) -> None:
    acc, _ = _run(name, values)
    got = FUNCTIONS[name].result(acc)
    ordered = sorted(map(Fraction, values))
    h = (len(ordered) - 1) * Fraction(int(name[1:]), 100)
    lower = math.floor(h)
    frac = h - lower
    exact = (
        ordered[lower]
        if frac == 0
        else ordered[lower] + frac * (ordered[lower + 1] - ordered[lower])
    )
    assert math.isfinite(got)
    # the rank (n - 1) * q is a double: its fraction is off by up to n roundings
    assert _close(got, exact, max(abs(v) for v in values), roundings=4 * len(values))


@pytest.mark.parametrize("name", AGG_FUNCS)
@given(values=extreme_lists, cut=st.integers(1, 39))
def test_merged_parts_are_finite_and_valid(name: str, values: list[float], cut: int) -> None:
    fn = FUNCTIONS[name]
    cut = cut % len(values) or 1
    if cut >= len(values):
        return
    a, _ = _run(name, values[:cut])
    b, _ = _run(name, values[cut:])
    whole = a[0] + b[0]
    try:
        fn.merge(a, b)
    except OverflowError:
        assert name == "sum"
        assert a[0] == whole - b[0]
    assert valid(name, a)
    assert math.isfinite(fn.result(a))
    if name in ("avg", "stddev"):
        assert a[0] == whole
        ref, _ = _run(name, values)
        assert math.isclose(
            fn.result(a),
            fn.result(ref),
            rel_tol=1e-9,
            abs_tol=1e-9 * max(abs(v) for v in values) + 1e-150,
        )


@pytest.mark.parametrize("name", AGG_FUNCS)
@given(values=extreme_lists)
def test_every_accumulator_of_valid_events_is_valid(name: str, values: list[float]) -> None:
    acc, _ = _run(name, values)
    assert valid(name, acc)


@pytest.mark.parametrize(
    ("name", "acc"),
    [
        ("sum", [2, None, 0.0]),  # what releases before 1.3 wrote for an overflowed sum
        ("sum", [2, MAX, MAX]),  # a total beyond the range
        ("avg", [1, "1", 0.0]),
        ("avg", [0, 1.0, 0.0]),
        ("count", [True]),
        ("min", [1]),
        ("first", [1, 0.0, math.inf]),
        ("stddev", [2, 0.0, -1.0]),
        ("stddev", [2, 0.0, 1.0, 7]),
        ("p50", [2, [1.0]]),
        ("p50", [1, {"zero": 1, "pos": [0, []]}]),
        ("p50", [1, {"zero": 0, "pos": [10**9, [1]], "neg": [0, []]}]),
        ("nope", [1]),
        ("sum", None),
    ],
)
def test_invalid_accumulators_are_recognised(name: str, acc: object) -> None:
    assert not valid(name, acc)
