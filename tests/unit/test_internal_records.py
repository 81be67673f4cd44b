"""The internal topic's records: origins, progress reports, and how a fetch is cut at them."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from service.bus.base import OriginReport, Progress
from service.repartition.records import (
    ORIGIN_HEADER,
    PROGRESS_HEADER,
    decode_progress,
    encode_progress,
    origins_of,
    read_origins,
    split_at_progress,
)

REPORT = Progress(
    "in", 4, {"in:0": OriginReport(12.5, True, 3.25), "in:3": OriginReport(None, False, 0)}
)


def record(offset: int, origin: str | None) -> Any:
    headers = [] if origin is None else [(ORIGIN_HEADER, origin.encode())]
    return SimpleNamespace(offset=offset, partition=2, value=b"{}", headers=headers)


def report(offset: int, value: bytes | None = None) -> Any:
    raw = encode_progress(REPORT) if value is None else value
    return SimpleNamespace(offset=offset, partition=2, value=raw, headers=[(PROGRESS_HEADER, b"1")])


def test_a_progress_report_round_trips() -> None:
    assert decode_progress(encode_progress(REPORT)) == REPORT


def test_a_malformed_report_is_ignored_not_fatal() -> None:
    for junk in (
        b"",
        b"[]",
        b'{"topic": "in"}',
        b'{"topic":"in","partitions":2,"origins":{"x":[1]}}',
    ):
        assert decode_progress(junk) is None


def test_origins_name_the_input_and_a_record_without_one_never_matches_a_replay() -> None:
    assert origins_of([record(5, "in:1:40:2"), record(6, None)]) == [
        ("in:1", 40, 2),
        ("unrouted:2", 6, 0),
    ]


def test_a_fetch_is_cut_after_each_report() -> None:
    msgs = [
        record(10, "in:0:1:0"),
        record(11, "in:1:7:0"),
        report(12),
        report(13),
        record(14, "in:0:2:0"),
    ]
    runs = list(split_at_progress(msgs))
    assert [([m.offset for m in run], p is not None, nxt) for run, p, nxt in runs] == [
        ([10, 11], True, 13),
        ([], True, 14),  # a report right after another: it still moves event time
        ([14], False, 15),
    ]
    assert runs[0][1] == REPORT


def test_a_fetch_ending_with_a_report_has_no_empty_tail() -> None:
    runs = list(split_at_progress([record(3, "in:0:1:0"), report(4)]))
    assert [(len(run), nxt) for run, _, nxt in runs] == [(1, 5)]


def test_a_report_with_impossible_numbers_is_malformed() -> None:
    for junk in (
        b'{"topic": "in", "partitions": 1000000000000, "origins": {}}',  # a name each: memory
        b'{"topic": "in", "partitions": 0, "origins": {}}',
        b'{"topic": "in", "partitions": 2.5, "origins": {}}',
        b'{"topic": "in", "partitions": true, "origins": {}}',
        b'{"topic": "", "partitions": 2, "origins": {}}',
        b'{"topic": "in", "partitions": 2, "origins": {"in:0": [1e999, true, 0]}}',
        b'{"topic": "in", "partitions": 2, "origins": {"in:0": [1, true, "3"]}}',
    ):
        assert decode_progress(junk) is None, junk


def test_a_malformed_report_is_told_and_its_run_still_ends_there() -> None:
    told: list[tuple[str, bytes | None]] = []
    runs = list(
        split_at_progress([record(3, "in:0:1:0"), report(4, b"{}")], lambda *a: told.append(a))
    )
    assert [(len(run), p, nxt) for run, p, nxt in runs] == [(1, None, 5)]
    assert told == [("malformed_progress", b"{}")]


def test_malformed_origin_headers_are_marked_not_fatal() -> None:
    bad = ["in:0:-1:0", "in:-1:4:0", "in:0:" + "9" * 40 + ":0", "in:0:5", "x", "in:0:1:0\n"]
    msgs = [record(10, "in:1:40:2")]
    msgs += [record(11 + i, origin) for i, origin in enumerate(bad)]
    msgs.append(
        SimpleNamespace(offset=20, partition=2, value=b"{}", headers=[(ORIGIN_HEADER, b"\xff")])
    )
    msgs.append(
        SimpleNamespace(offset=21, partition=2, value=b"{}", headers=[(ORIGIN_HEADER, None)])
    )
    told: list[tuple[str, bytes | None]] = []
    origins, marked = read_origins(msgs, lambda *a: told.append(a))
    assert origins[0] == ("in:1", 40, 2)
    assert sorted(marked) == list(range(1, len(msgs)))
    assert {reason for reason, _, n in marked.values() if n == 1} == {"invalid_origin"}
    assert [kind for kind, _ in told] == ["malformed_origin"] * (len(msgs) - 1)
    assert len(set(origins)) == len(msgs)  # placeholders never match one another
