"""Poison input: the decoder and the aggregator on arbitrary bytes and JSON values.

Properties: nothing raises; every element is either aggregated or dead-lettered with a
contract reason; whatever comes out can be encoded by the outputs.
"""

from __future__ import annotations

import json
import math
from typing import Any

import orjson
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from service.aggregation.aggregator import EventAggregator
from service.aggregation.decode import Rejected, loads_message, name_fault, parse_event
from service.bus.base import SourceBatch
from service.config import AggregationConfig
from service.core.clock import ManualClock
from service.core.events import AGG_FUNCS, REJECT_REASONS
from service.metrics.collector import MetricsCollector
from service.postgres.text import storable_text
from service.sinks.kafka import encode_aggregates, encode_dead_letter

NOW = 1_700_000_000.0
MAX_BYTES = 4096
FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.integers(min_value=-(10**400), max_value=10**400),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=30),
)
json_values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4)
    ),
    max_leaves=12,
)
# Names with control characters and lone surrogates ("\ud800": JSON can spell them, UTF-8
# cannot carry them) are rejected (invalid_name); st.text() draws no surrogates itself.
names = st.one_of(
    st.text(max_size=210),
    st.sampled_from(
        ["cpu", "x" * 200, "x" * 201, "", "\x00", "é\u2028😀", "\ud800", "a\udcff", "\x7f", "\x1f"]
    ),
    scalars,
)
timestamps = st.one_of(
    st.floats(min_value=NOW - 10_000, max_value=NOW + 10_000),
    st.floats(allow_nan=True, allow_infinity=True),
    st.integers(min_value=-(10**30), max_value=10**30),
    st.sampled_from(
        ["2023-11-14T22:13:20Z", "2023-11-14T22:13:20", "not a time", "9999-12-31T23:59:59+14:00"]
    ),
    st.text(max_size=30),
    scalars,
)
funcs = st.one_of(st.sampled_from([*AGG_FUNCS, "SUM", "P99", "median"]), scalars)
event_like = st.fixed_dictionaries(
    {},
    optional={
        "name": names,
        "value": st.one_of(st.floats(), scalars),
        "timestamp": timestamps,
        "agg_func": funcs,
        "extra": json_values,
    },
)
# Mostly-valid events, so that the accepted path (windows, snapshots, outputs) is fuzzed
# too, not only the rejections.
valid_like = st.fixed_dictionaries(
    {
        "name": names,
        "value": st.floats(-1e6, 1e6),
        "timestamp": st.floats(min_value=NOW - 100, max_value=NOW + 100),
    },
    optional={"agg_func": st.sampled_from(AGG_FUNCS)},
)
elements = st.one_of(valid_like, event_like, json_values)


def to_bytes(value: Any) -> bytes:
    # json.dumps (not orjson) can write NaN, Infinity and 400-digit integers
    return json.dumps(value).encode()


wire = st.one_of(
    st.binary(max_size=200),
    elements.map(to_bytes),
    st.lists(elements, max_size=5).map(to_bytes),
    elements.map(to_bytes).map(lambda b: b[: len(b) // 2]),  # cut mid-message
    st.binary(min_size=MAX_BYTES + 1, max_size=MAX_BYTES + 50),
    st.text(max_size=40).map(lambda t: t.encode("utf-8", "surrogatepass")),
)
records = st.one_of(wire, elements, st.lists(elements, max_size=4))


@FUZZ
@given(st.binary(max_size=300))
def test_loads_message_parses_or_rejects_as_invalid_json(data: bytes) -> None:
    try:
        loads_message(data)
    except Rejected as exc:
        assert exc.reason == "invalid_json"


@FUZZ
@given(elements)
def test_parse_event_returns_a_valid_event_or_a_contract_reason(obj: Any) -> None:
    try:
        name, func, value, ts = parse_event(obj, NOW + 3600)
    except Rejected as exc:
        assert exc.reason in REJECT_REASONS
        assert isinstance(exc.detail, str)
        return
    assert type(name) is str and 0 < len(name) <= 200
    assert func in AGG_FUNCS
    assert type(value) is float and math.isfinite(value)
    assert type(ts) is float and 0 <= ts <= NOW + 3600


def decoded_elements(record: Any) -> list[Any]:
    """The events one transport record holds, decided independently of the code (an
    undecodable or oversized message counts as one)."""
    if type(record) is bytes:
        if len(record) > MAX_BYTES:
            return [record]
        try:
            decoded = orjson.loads(record)
        except orjson.JSONDecodeError:
            try:
                decoded = json.loads(record)
            except (ValueError, RecursionError):
                return [record]
        record = decoded
    return record if type(record) is list else [record]


@FUZZ
@given(st.lists(records, max_size=6), st.integers(min_value=0, max_value=3))
def test_any_batch_is_aggregated_or_dead_lettered_never_raised(
    batch: list[Any], flushes: int
) -> None:
    elements = [e for r in batch for e in decoded_elements(r)]
    clock = ManualClock(NOW)
    metrics = MetricsCollector(clock)
    cfg = AggregationConfig(interval_s=10.0, max_open_windows=50)
    aggregator = EventAggregator(cfg, metrics, clock, max_message_bytes=MAX_BYTES)
    out = aggregator.process(
        SourceBatch("p0", batch, "fuzz", "1", NOW, offsets=list(range(len(batch))))
    )
    for _ in range(flushes):  # idle flushes must cope with whatever was accepted
        clock.advance(20.0)
        out.extend(aggregator.process(SourceBatch("p0", [], "fuzz", None, NOW, caught_up=True)))

    assert metrics.events_aggregated + len(out.dead_letters) == len(elements)
    assert all(d.reason in REJECT_REASONS for d in out.dead_letters)
    assert sum(a.count for a in out.aggregates) <= metrics.events_aggregated
    # Whatever came out, the outputs can carry it (or dead-letter it) without raising.
    _, refused = encode_aggregates(out.aggregates)
    assert refused == []  # no accepted name holds what JSON or PostgreSQL cannot
    assert all(name_fault(a.name) is None for a in out.aggregates)
    for d in out.dead_letters:
        key, value = encode_dead_letter(d, 1 << 20)
        assert len(key + value) <= 1 << 20
        assert orjson.loads(value)["reason"] == d.reason  # a strict parser reads it
        for text in (d.raw, d.detail, d.source):
            assert "\x00" not in storable_text(text)
            storable_text(text).encode("utf-8")
    aggregator.snapshot()  # and it can be checkpointed


def test_a_name_with_a_lone_surrogate_is_dead_lettered_not_checkpointed() -> None:
    clock = ManualClock(NOW)
    metrics = MetricsCollector(clock)
    aggregator = EventAggregator(AggregationConfig(interval_s=10.0), metrics, clock)
    record = b'{"name": "\\ud800", "value": 1.0, "timestamp": 1700000000.5}'

    out = aggregator.process(SourceBatch("p0", [record], "fuzz", "1", NOW))
    aggregator.snapshot()

    assert [d.reason for d in out.dead_letters] == ["invalid_name"]
