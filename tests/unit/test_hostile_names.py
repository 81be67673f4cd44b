"""Names and text that storage cannot hold (contract §12.1): a name with a control
character (U+0000-U+001F, U+007F) or a lone surrogate is rejected as ``invalid_name``
on every decode path (fast, reference, array, decoded HTTP element, late, over budget,
the repartition router), and whatever is dead-lettered can be written by both outputs."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from service.aggregation import batch_run
from service.aggregation.aggregator import EventAggregator
from service.aggregation.decode import Rejected, loads_message, name_fault, parse_event
from service.bus.base import SourceBatch
from service.config import AggregationConfig
from service.core.clock import ManualClock
from service.core.events import DeadLetter
from service.metrics.collector import MetricsCollector
from service.postgres.text import json_text, storable_text
from service.repartition.keying import route
from service.sinks.kafka import encode_dead_letter

START = 1_699_999_980.0  # a multiple of 60
NOW = START + 120

# Each hostile name as JSON text (its escape where JSON needs one) and as Python reads it.
HOSTILE = {
    "nul": ('"a\\u0000b"', "a\x00b"),
    "unit separator": ('"y\\u001f"', "y\x1f"),
    "tab": ('"t\\tab"', "t\tab"),
    "del, raw in the JSON text": ('"x\x7f"', "x\x7f"),
    "del, escaped": ('"x\\u007f"', "x\x7f"),
    "lone high surrogate": ('"\\ud800"', "\ud800"),
    "lone low surrogate": ('"z\\udc00"', "z\udc00"),
}
# UTF-8 bytes of a surrogate (invalid UTF-8): Python's json reads them as one.
ENCODED_SURROGATE = b'"s\xed\xa0\x80"'


def message(name_json: str | bytes, value: float, ts: float) -> bytes:
    name = name_json if isinstance(name_json, bytes) else name_json.encode()
    return b'{"name":' + name + f',"value":{value},"timestamp":{ts}}}'.encode()


def make(**cfg: Any) -> EventAggregator:
    clock = ManualClock(NOW)
    return EventAggregator(
        AggregationConfig(**{"interval_s": 60.0, **cfg}), MetricsCollector(clock), clock
    )


def run(agg: EventAggregator, records: list[Any]) -> tuple[dict[Any, Any], list[DeadLetter]]:
    out = agg.process(
        SourceBatch("p0", records, "test p0", None, NOW, offsets=list(range(len(records))))
    )
    out.extend(agg.process(SourceBatch("p0", [message('"close"', 0, START + 125)], "t", None, NOW)))
    sums = {(a.name, a.window_start): (a.value, a.count) for a in out.aggregates}
    return sums, out.dead_letters


def assert_storable(dead: list[DeadLetter]) -> None:
    """Both outputs can write these: PostgreSQL text and strict JSON parsers."""
    for d in dead:
        for text in (d.raw, d.detail, d.source, d.reason):
            stored = storable_text(text)
            assert "\x00" not in stored
            stored.encode("utf-8")  # asyncpg sends UTF-8: no lone surrogates
        _, value = encode_dead_letter(d, 1 << 20)
        assert orjson.loads(value)["reason"] == d.reason


@pytest.mark.parametrize("name_json, name", HOSTILE.values(), ids=HOSTILE.keys())
def test_hostile_name_on_time_is_invalid_name_and_the_valid_events_around_it_count(
    name_json: str, name: str
) -> None:
    agg = make()
    records = [
        message('"ok"', 1, START + 1),
        message(name_json, 5, START + 2),  # alone: the fast path, where msgspec reads it
        (b"[" + message('"ok"', 2, START + 3) + b"," + message(name_json, 6, START + 4) + b"]"),
        orjson.loads(message('"ok"', 4, START + 5)),  # an HTTP element, already decoded
        {"name": name, "value": 7, "timestamp": START + 6},
    ]
    sums, dead = run(agg, records)

    assert sums == {("ok", START): (7.0, 3)}
    assert [(d.reason, d.source) for d in dead] == [
        ("invalid_name", "test p0 offset=1"),
        ("invalid_name", "test p0 offset=2"),
        ("invalid_name", "test p0 offset=4"),
    ]
    assert [loads_message(d.raw.encode())["value"] for d in dead] == [5, 6, 7]
    assert all(f"U+{ord(next(c for c in name if name_fault(c))):04X}" in d.detail for d in dead)
    assert_storable(dead)
    agg.snapshot()  # and the state can be checkpointed


@pytest.mark.parametrize("name_json, name", HOSTILE.values(), ids=HOSTILE.keys())
def test_hostile_name_late_is_invalid_name_and_never_reaches_the_late_ledger(
    name_json: str, name: str
) -> None:
    agg = make()
    run(agg, [message('"ok"', 1, START + 1)])  # the window [START, START+60) is emitted
    records = [
        message(name_json, 5, START + 2),
        message('"ok"', 3, START + 3),  # a valid late event: late, as before
        {"name": name, "value": 7, "timestamp": START + 4},
    ]
    out = agg.process(SourceBatch("p0", records, "test p0", "9", NOW, offsets=[10, 11, 12]))

    assert [(d.reason, d.source) for d in out.dead_letters] == [
        ("invalid_name", "test p0 offset=10"),
        ("late", "test p0 offset=11"),
        ("invalid_name", "test p0 offset=12"),
    ]
    assert_storable(out.dead_letters)
    [cp] = agg.snapshot()
    assert cp.ledger is not None
    assert [tuple(w[:3]) for w in cp.ledger["late_windows"]] == [("ok", "sum", START)]


def test_hostile_name_is_rejected_before_the_open_window_budget_is_spent() -> None:
    agg = make(max_open_windows=2)  # "ok", then the window that closes it
    sums, dead = run(agg, [message('"a\\u0000"', 1, START + 1), message('"ok"', 2, START + 2)])
    assert [d.reason for d in dead] == ["invalid_name"]
    assert sums == {("ok", START): (2.0, 1)}


def test_surrogate_spelt_as_utf8_bytes_is_an_invalid_name_of_its_element_only() -> None:
    agg = make()
    array = b"[" + message(ENCODED_SURROGATE, 1, START + 1) + b"," + message('"ok"', 2, START + 2)
    sums, dead = run(agg, [array + b"]"])
    assert [d.reason for d in dead] == ["invalid_name"]
    assert sums == {("ok", START): (2.0, 1)}
    assert_storable(dead)


@pytest.mark.parametrize(
    "record",
    [
        message(b'"bad\xff"', 1, START + 1),  # invalid UTF-8
        message('"ok"', 1, START + 1) + b"\x00",  # a NUL byte outside any string
        message(b'"raw\x00nul"', 1, START + 1),  # a raw NUL inside a string: not JSON
    ],
    ids=["invalid utf-8", "nul after the object", "raw nul in a string"],
)
def test_message_that_is_not_json_text_is_one_storable_invalid_json(record: bytes) -> None:
    sums, dead = run(make(), [record, message('"ok"', 2, START + 2)])
    assert [d.reason for d in dead] == ["invalid_json"]
    assert sums == {("ok", START): (2.0, 1)}
    assert_storable(dead)
    if b"\x00" in record:
        assert "\\u0000" in storable_text(dead[0].raw)


@pytest.mark.parametrize(
    "name", ["cpu", "é\u2028😀", "nb\u00a0sp", "family 👨\u200d👩\u200d👧", "x" * 200, "a b"]
)
def test_printable_and_other_unicode_names_stay_valid(name: str) -> None:
    assert name_fault(name) is None
    assert parse_event({"name": name, "value": 1, "timestamp": START}, NOW)[0] == name


def test_parse_event_names_the_offending_character_and_its_place() -> None:
    with pytest.raises(Rejected) as caught:
        parse_event({"name": "ab\x1fc", "value": 1, "timestamp": START}, NOW)
    assert caught.value.reason == "invalid_name"
    assert "U+001F at index 2" in caught.value.detail


@pytest.mark.parametrize("name_json", [n for n, _ in HOSTILE.values()])
def test_repartition_router_gives_no_event_time_to_a_hostile_name(name_json: str) -> None:
    [(_, _, ts)] = route(message(name_json, 1, START + 1), b"0", NOW)
    assert ts is None  # the windowing stage rejects it: it must not move progress


def test_storable_text_escapes_nul_and_lone_surrogates_like_json() -> None:
    assert storable_text("a\x00b\ud800c\udcff é😀") == "a\\u0000b\\ud800c\\udcff é😀"
    assert storable_text("plain") == "plain"


def test_json_text_writes_a_lone_surrogate_as_an_escape() -> None:
    assert json_text({"name": "a\ud800"}) == '{"name": "a\\ud800"}'
    assert json_text({"name": "é"}) == '{"name":"é"}'


def test_kafka_dead_letter_with_a_lone_surrogate_is_json_a_strict_parser_reads() -> None:
    dead = DeadLetter("raw \ud800", "invalid_name", "detail \udc00", "src", START)
    _, value = encode_dead_letter(dead, 1 << 20)
    obj = orjson.loads(value)
    assert (obj["raw"], obj["detail"]) == ("raw \\ud800", "detail \\udc00")


def _refuse(data: bytes) -> Any:
    raise ValueError("fast path disabled")


def test_hostile_name_alone_in_its_window_leaves_the_state_the_reference_path_leaves(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The fast path sees the name only in the loop: it must refuse it before it opens a
    window (an empty window would later be "emitted" and counted)."""
    records = [message('"a\\u0000"', 1, START + 1), message('"ok"', 2, START + 61)]

    def state() -> Any:
        agg = make()
        agg.process(SourceBatch("p0", records, "test p0", None, NOW))
        return [orjson.loads(c.state or b"") for c in agg.snapshot()]

    fast = state()
    monkeypatch.setattr(batch_run, "decode_fast", _refuse)
    assert fast == state()
