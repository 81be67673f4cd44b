"""The aggregator's fast path (msgspec decode, inlined checks and accumulators) must be
indistinguishable from the reference path (orjson/json + parse_event + FUNCTIONS)."""

from __future__ import annotations

import math
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from service.aggregation import batch_run
from service.aggregation.aggregator import EventAggregator
from service.aggregation.decode import WireEvent, decode_fast, loads_message
from service.aggregation.functions import FUNCTIONS
from service.bus.base import SourceBatch
from service.config import AggregationConfig
from service.core.clock import ManualClock
from service.metrics.collector import MetricsCollector

NOW = 1_700_000_000.0


def _refuse(data: bytes) -> Any:
    raise ValueError("fast path disabled")


def _refuse_tagged(self: Any, data: bytes) -> Any:
    raise ValueError("fast path disabled")


def _run(
    batches: list[list[Any]], max_open: int, grace: float, group_by: tuple[str, ...] = ()
) -> dict[str, Any]:
    clock = ManualClock(NOW)
    cfg = AggregationConfig(
        interval_s=60.0,
        grace_s=grace,
        max_open_windows=max_open,
        group_by=group_by,
        max_series_per_name=2,
    )
    agg = EventAggregator(cfg, MetricsCollector(clock), clock, max_message_bytes=4096)
    dead, aggs = [], []
    for i, records in enumerate(batches):
        part = f"p{i % 2}"
        offsets = list(range(len(records)))
        out = agg.process(SourceBatch(part, records, f"test {part}", str(i), NOW, offsets))
        dead += [(d.raw, d.reason, d.detail, d.source) for d in out.dead_letters]
        aggs += out.aggregates
    state = [(c.partition, c.position, orjson.loads(c.state or b"null")) for c in agg.snapshot()]
    return {
        "dead": dead,
        "aggregates": aggs,
        "state": state,
        "open": agg.open_windows,
        "ledger": agg.ledger(),
    }


# -- messages from a grammar of valid and broken fields, as raw JSON text -------------------

_names = st.sampled_from(
    [
        '"a"',
        '"b"',
        '"A"',
        '""',
        '"' + "x" * 200 + '"',
        '"' + "y" * 201 + '"',
        "5",
        "null",
        "true",
        '"\\u0061"',
        '"\u00e9\u00e8"',
        '"\\ud800"',
        '"a\\u0000"',
        '"\\u001fb"',
        '"a\u007f"',
        '"\\t"',
    ]
)
_numbers = st.one_of(
    st.floats(allow_nan=False, allow_infinity=False).map(repr),
    st.integers(min_value=-(10**30), max_value=10**30).map(str),
    st.sampled_from(
        [
            "1e999",
            "-1e999",
            "NaN",
            "Infinity",
            "1" + "0" * 400,
            "-0",
            "-0.0",
            "01",
            "1.",
            "true",
            "false",
            "null",
            '"3"',
            "[1]",
            "{}",
        ]
    ),
)
_times = st.one_of(
    st.floats(min_value=NOW - 400, max_value=NOW + 30).map(repr),
    st.integers(min_value=int(NOW) - 400, max_value=int(NOW) + 30).map(str),
    st.sampled_from(
        [
            "-1",
            "-0.0",
            "1e999",
            "9e12",
            '"2023-11-14T22:13:00+01:00"',
            '"2023-11-14T22:13:00Z"',
            '"2023-11-14T22:13:00"',
            '"yesterday"',
            "true",
            "null",
            "NaN",
            '"' + "2" * 70 + '"',
        ]
    ),
)
_funcs = st.sampled_from(
    [
        '"sum"',
        '"avg"',
        '"min"',
        '"max"',
        '"count"',
        '"first"',
        '"last"',
        '"stddev"',
        '"p50"',
        '"p99"',
        '"SUM"',
        '"Max"',
        '"median"',
        "null",
        "3",
        '""',
    ]
)


_tag_values = st.one_of(
    _numbers,
    st.sampled_from(
        [
            '"eu"',
            '"us"',
            '""',
            '"' + "t" * 200 + '"',
            '"' + "t" * 201 + '"',
            '"\\u0000"',
            '"a\\u001f"',
            '"\\ud800"',
            '"\u00e9"',
            '{"a":1}',
            "[]",
            "2",
            "2.0",
            "-0.0",
            "1" + "0" * 30,
            "1" + "0" * 250,
        ]
    ),
)


@st.composite
def _tags(draw: st.DrawFn) -> str:
    kind = draw(st.integers(0, 9))
    if kind == 0:
        return draw(st.sampled_from(["null", "[]", '"host"', "1", "true"]))
    pairs = [
        f'"{k}":{draw(_tag_values)}'
        for k in draw(st.lists(st.sampled_from(["host", "region", "other"]), max_size=3))
    ]
    return "{" + ",".join(pairs) + "}"


@st.composite
def _event(draw: st.DrawFn) -> str:
    fields = []
    for key, values in (
        ("name", _names),
        ("value", _numbers),
        ("timestamp", _times),
        ("agg_func", _funcs),
        ("extra", _numbers),
        ("tags", _tags()),
    ):
        optional = key in ("extra", "tags")
        present = draw(st.booleans()) if optional else draw(st.integers(0, 9)) > 0
        if present:
            fields.append(f'"{key}":{draw(values)}')
    if draw(st.integers(0, 15)) == 0 and fields:  # a duplicate key: the last one counts
        fields.append(draw(st.sampled_from(fields)))
    fields = draw(st.permutations(fields))
    sep = draw(st.sampled_from([",", ", ", " ,\n"]))
    return "{" + sep.join(fields) + "}"


@st.composite
def _message(draw: st.DrawFn) -> Any:
    kind = draw(st.integers(0, 19))
    if kind == 0:
        return draw(
            st.sampled_from(
                [
                    b"",
                    b"{not json",
                    b"[1]",
                    b"5",
                    b"[[]]",
                    b"\xff\xfe",
                    b"\xef\xbb\xbf{}",
                    b"[]",
                    b"{} x",
                    b"x" * 5000,
                ]
            )
        )
    if kind <= 3:
        body = "[" + ",".join(draw(st.lists(_event(), max_size=4))) + "]"
    else:
        body = draw(_event())
    data = body.encode("utf-8", "surrogatepass")
    if kind == 4:  # an HTTP element: already decoded
        try:
            return loads_message(data)
        except Exception:
            return data
    return data


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    batches=st.lists(st.lists(_message(), max_size=6), min_size=1, max_size=5),
    max_open=st.integers(1, 20),
    grace=st.sampled_from([0.0, 30.0]),
    group_by=st.sampled_from([(), ("host",), ("host", "region")]),
)
def test_fast_path_gives_exactly_what_the_reference_path_gives(
    batches: list[list[Any]], max_open: int, grace: float, group_by: tuple[str, ...]
) -> None:
    fast = _run(batches, max_open, grace, group_by)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(batch_run, "decode_fast", _refuse)
        mp.setattr(batch_run.BatchRun, "fast_tagged", _refuse_tagged)
        reference = _run(batches, max_open, grace, group_by)
    assert fast == reference
    assert fast["ledger"]["imbalance"] == 0


@given(
    st.one_of(
        st.floats(allow_nan=False, allow_infinity=False).map(repr),
        st.integers(min_value=-(10**40), max_value=10**40).map(str),
        st.from_regex(r"-?[1-9][0-9]{0,25}(\.[0-9]{1,30})?(e-?[0-9]{1,3})?", fullmatch=True),
    )
)
def test_fast_decode_reads_numbers_exactly_like_the_reference(number: str) -> None:
    text = f'{{"name":"a","value":{number},"timestamp":{number}}}'.encode()
    try:
        ev = decode_fast(text)
    except ValueError:
        return  # refused: the reference path decides
    assert type(ev) is WireEvent
    expected = float(loads_message(text)["value"])
    assert math.isfinite(expected)
    assert (ev.value, math.copysign(1, ev.value)) == (expected, math.copysign(1, expected))
    assert ev.timestamp == expected


@given(
    st.lists(
        st.tuples(
            st.sampled_from(["sum", "avg", "min", "max", "count", "p50"]),
            st.floats(min_value=-1e300, max_value=1e300),
            st.floats(min_value=NOW - 59, max_value=NOW - 1),
        ),
        min_size=1,
        max_size=60,
    )
)
def test_inlined_accumulators_equal_the_function_table(
    events: list[tuple[str, float, float]],
) -> None:
    clock = ManualClock(NOW)
    agg = EventAggregator(AggregationConfig(interval_s=3600.0), MetricsCollector(clock), clock)
    records = [
        orjson.dumps({"name": "k", "value": v, "timestamp": t, "agg_func": f}) for f, v, t in events
    ]
    agg.process(SourceBatch("p", records, "test", None, NOW))
    expected: dict[str, list[Any]] = {}
    for func, value, ts in events:
        if func in expected:
            FUNCTIONS[func].add(expected[func], value, ts)
        else:
            expected[func] = FUNCTIONS[func].new(value, ts)
    [cp] = agg.snapshot()
    got = {func: acc for _, _, func, acc in orjson.loads(cp.state or b"")["windows"]}
    assert got == orjson.loads(orjson.dumps(expected))


def test_name_with_a_lone_surrogate_is_rejected_and_checkpoints_still_work() -> None:
    clock = ManualClock(NOW)
    agg = EventAggregator(AggregationConfig(), MetricsCollector(clock), clock)
    # orjson refuses the escape, the standard library reads it: the reference path decides
    record = b'{"name": "\\ud800", "value": 1, "timestamp": %d}' % (NOW - 5)
    [dl] = agg.process(SourceBatch("p", [record], "test", "1", NOW)).dead_letters
    assert dl.reason == "invalid_name"
    assert agg.open_windows == 0
    [cp] = agg.snapshot()
    assert cp.position == "1"


@pytest.mark.parametrize(
    "tag",
    [
        "1" + "0" * 30,  # msgspec reads an int, orjson a float: the reference decides
        "-0.0",
        "2.0",
        "true",
        '"\\u00e9"',
        "1e2",
    ],
)
def test_tag_values_read_the_same_on_both_paths(tag: str) -> None:
    record = b'{"name":"a","value":1,"timestamp":%d,"tags":{"host":%s}}' % (
        NOW - 5,
        tag.encode(),
    )
    fast = _run([[record]], 10, 0.0, ("host",))
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(batch_run.BatchRun, "fast_tagged", _refuse_tagged)
        reference = _run([[record]], 10, 0.0, ("host",))
    assert fast == reference
    assert fast["dead"] == []
