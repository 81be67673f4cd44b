"""The percentile sketch against DataDog's ddsketch library: same keys, same quantiles,
bytes the library decodes; the conversion of pre-1.3 checkpoint states."""

from __future__ import annotations

import math
import random
import sys
from typing import Any

import orjson
import pytest
from ddsketch import DDSketch
from ddsketch.mapping import LogarithmicMapping
from ddsketch.pb import ddsketch_pb2, proto
from hypothesis import given
from hypothesis import strategies as st

from service.aggregation import percentiles
from service.aggregation import quantile_sketch as dd
from service.aggregation.functions import FUNCTIONS, valid

MAPPING = LogarithmicMapping(0.01)
pb: Any = ddsketch_pb2
DDSketchProto: Any = proto.DDSketchProto  # untyped
QS = (0.0, 0.001, 0.01, 0.1, 0.25, 0.5, 0.75, 0.9, 0.95, 0.99, 0.999, 1.0)

finite = st.floats(allow_nan=False, allow_infinity=False)


def _library(values: list[float]) -> DDSketch:
    sketch = DDSketch(0.01)
    for v in values:
        sketch.add(v)
    return sketch


def _mixed(rng: random.Random, n: int) -> list[float]:
    draws = (
        lambda: rng.lognormvariate(0.0, 3.0),
        lambda: -rng.lognormvariate(2.0, 1.0),
        lambda: 0.0,
        lambda: rng.uniform(-1e-300, 1e-300),
        lambda: math.pow(10.0, rng.uniform(-300.0, 300.0)),
    )
    return [rng.choice(draws)() for _ in range(n)]


@given(st.lists(finite.filter(lambda x: x != 0.0), min_size=1, max_size=200))
def test_bulk_keys_are_the_library_keys(values: list[float]) -> None:
    for v in values:
        if abs(v) > MAPPING.min_possible:
            assert dd.key_of(abs(v)) == MAPPING.key(abs(v))


def test_keys_at_powers_of_gamma_and_the_double_edges_are_the_library_keys() -> None:
    probes = [sys.float_info.max, MAPPING.min_possible * 1.0000001, 1.0, 2.0, 0.5, 1e-300]
    for k in range(-2000, 2000, 7):
        g = math.pow(MAPPING.gamma, k)
        probes += [g, math.nextafter(g, 0.0), math.nextafter(g, math.inf)]
    for v in probes:
        assert dd.key_of(v) == MAPPING.key(v), v


@pytest.mark.parametrize("seed", range(4))
def test_bins_and_quantiles_equal_the_library_adding_one_by_one(seed: int) -> None:
    rng = random.Random(seed)
    values = _mixed(rng, 5_000)
    ours, theirs = dd.of(values), _library(values)
    assert dd.count(ours) == theirs.count
    for q in QS:
        assert dd.quantile(ours, q) == theirs.get_quantile_value(q), q
    one_by_one = dd.new()
    for v in values:
        dd.add(one_by_one, v)
    assert one_by_one == ours


def test_bytes_decode_with_the_library_to_the_same_quantiles() -> None:
    rng = random.Random(5)
    values = _mixed(rng, 20_000)
    state = dd.of(values)
    decoded = DDSketchProto.from_proto(pb.DDSketch.FromString(dd.to_bytes(state)))
    assert decoded.count == len(values)
    for q in QS:
        # the decoder rebuilds the mapping from gamma: ~1e-11 apart at 1e-300
        assert math.isclose(decoded.get_quantile_value(q), dd.quantile(state, q), rel_tol=1e-9)


def test_bytes_are_the_library_message_with_the_zero_ends_trimmed() -> None:
    state = dd.of([1.0, 2.0, -3.0, 0.0, 0.0])
    dd.add(state, 1e6)  # widens the store with zeros between
    message = pb.DDSketch.FromString(dd.to_bytes(state))
    assert message.mapping.gamma == MAPPING.gamma
    assert message.mapping.interpolation == pb.IndexMapping.NONE
    assert message.zeroCount == 2.0
    assert message.positiveValues.contiguousBinIndexOffset == MAPPING.key(1.0)
    assert sum(message.positiveValues.contiguousBinCounts) == 3.0
    assert list(message.negativeValues.contiguousBinCounts) == [1.0]
    empty = pb.DDSketch.FromString(dd.to_bytes(dd.new()))
    assert empty.zeroCount == 0.0 and not empty.positiveValues.contiguousBinCounts


def test_merge_in_any_grouping_gives_the_same_state() -> None:
    rng = random.Random(9)
    parts = [_mixed(rng, rng.randrange(0, 300)) for _ in range(20)]
    whole = dd.of(v for part in parts for v in part)
    pairwise = [dd.of(p) for p in parts]
    while len(pairwise) > 1:
        merged = []
        for a, b in zip(pairwise[::2], pairwise[1::2], strict=False):
            dd.merge(a, b)
            merged.append(a)
        if len(pairwise) % 2:
            merged.append(pairwise[-1])
        pairwise = merged
    shuffled = dd.new()
    for i in rng.sample(range(len(parts)), len(parts)):
        dd.merge(shuffled, dd.of(parts[i]))
    for state in (pairwise[0], shuffled):
        assert dd.to_bytes(state) == dd.to_bytes(whole)


@given(finite.filter(lambda x: abs(x) > MAPPING.min_possible))
def test_any_single_value_is_reported_within_alpha(value: float) -> None:
    estimate = dd.quantile(dd.of([value]), 0.5)
    assert math.copysign(1.0, estimate) == math.copysign(1.0, value)
    assert abs(estimate - value) <= dd.ALPHA * 1.000001 * abs(value)


def test_values_too_close_to_zero_count_as_zero() -> None:
    tiny = [0.0, -0.0, 5e-324, -5e-324, sys.float_info.min, -MAPPING.min_possible]
    state = dd.of(tiny)
    assert state["zero"] == len(tiny)
    assert dd.quantile(state, 0.5) == 0.0


def test_an_empty_sketch_has_no_quantile() -> None:
    with pytest.raises(ValueError, match="empty"):
        dd.quantile(dd.new(), 0.5)


def test_a_state_survives_orjson_and_is_valid() -> None:
    state = dd.of(_mixed(random.Random(1), 500))
    restored = orjson.loads(orjson.dumps(state))
    assert restored == state
    assert dd.valid_count(restored) == 500
    assert valid("p99", [500, restored])
    assert not valid("p99", [499, restored])


@pytest.mark.parametrize(
    "broken",
    [
        {"alpha": 0.005, "zero": 0, "pos": [0, [1]], "neg": [0, []]},
        {"alpha": 0.01, "zero": -1, "pos": [0, [2]], "neg": [0, []]},
        {"alpha": 0.01, "zero": 0, "pos": [0, [1.5]], "neg": [0, []]},
        {"alpha": 0.01, "zero": 0, "pos": [10**9, [1]], "neg": [0, []]},
        {"alpha": 0.01, "zero": 0, "pos": [0, [1]]},
    ],
)
def test_broken_states_are_invalid(broken: dict[str, Any]) -> None:
    assert not valid("p50", [1, broken])


# -- the layout of releases before 1.3 -------------------------------------------------------


def _v12_state(values: list[float]) -> dict[str, Any]:
    """The hand-written sketch of releases before 1.3 (alpha 0.005), as it checkpointed."""
    gamma = 1.005 / 0.995
    state: dict[str, Any] = {"zero": 0, "pos": [0, []], "neg": [0, []]}
    for v in values:
        if abs(v) < sys.float_info.min:
            state["zero"] += 1
            continue
        store = state["pos" if v > 0 else "neg"]
        key = math.ceil(math.log(abs(v)) / math.log(gamma))
        if not store[1]:
            store[0] = key
            store[1].append(0)
        if key < store[0]:
            store[1][0:0] = [0] * (store[0] - key)
            store[0] = key
        while key >= store[0] + len(store[1]):
            store[1].append(0)
        store[1][key - store[0]] += 1
    return state


def test_a_pre_13_sketch_is_valid_and_converted_on_first_use_within_1_505_percent() -> None:
    rng = random.Random(13)
    values = [rng.lognormvariate(1.0, 2.0) * rng.choice((1, -1)) for _ in range(30_000)]
    values += [0.0] * 100
    ordered = sorted(values)
    for name, q in percentiles.PERCENTILES.items():
        acc: list[Any] = [len(values), _v12_state(values)]
        assert valid(name, acc)
        estimate = FUNCTIONS[name].result(acc)
        assert "alpha" in acc[1] and dd.count(acc[1]) == len(values)  # converted in place
        exact = ordered[math.floor(q * (len(values) - 1))]
        assert abs(estimate - exact) <= 0.01505 * abs(exact), (name, estimate, exact)


def test_merging_a_pre_13_sketch_leaves_it_as_it_was() -> None:
    old = _v12_state([1.0, 2.0, 3.0] * 4_000)
    other: list[Any] = [12_000, old]
    into: list[Any] = [12_000, dd.of([4.0] * 12_000)]
    snapshot = orjson.dumps(other)
    FUNCTIONS["p50"].merge(into, other)
    assert orjson.dumps(other) == snapshot
    assert into[0] == 24_000 and dd.count(into[1]) == 24_000


def test_the_emitted_sketch_of_a_raw_list_is_the_sketch_of_its_values() -> None:
    values = [float(i % 97) - 20.0 for i in range(1_000)]
    acc = FUNCTIONS["p95"].new(values[0], 0.0)
    for v in values[1:]:
        FUNCTIONS["p95"].add(acc, v, 0.0)
    assert isinstance(acc[1], list)
    assert percentiles.sketch_of("p95", acc) == dd.to_bytes(dd.of(values))
    assert percentiles.sketch_of("avg", [1, 1.0, 0.0]) is None
    assert not percentiles.v13_layout(acc)
    acc[1] = dd.of(acc[1])
    assert percentiles.v13_layout(acc)
