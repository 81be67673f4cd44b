"""The records of the internal topic of ``repartition=true`` (:mod:`service.repartition.router`).

Two kinds, told apart by their headers (and a rare third, below):

* an **event** routed by name, with ``vabus-origin: <topic>:<partition>:<offset>:<element>``:
  where it came from in the input, so that the windowing stage can drop replays;
* a **progress report** with ``vabus-progress: 1`` and a JSON value
  ``{"topic": "in", "partitions": 8, "origins": {"in:3": [max_ts, caught_up, silent_for]}}``:
  what one routing instance knows of the input partitions it reads, written to every
  internal partition about once a second, after the events it covers. The windowing stage
  holds each internal partition's event time per input partition with it
  (:mod:`service.aggregation.origins`).

A third, rare one: the routing stage's one record for the elements of an input message
past ``VABUS_MAX_EVENTS_PER_MESSAGE`` (an origin header plus :data:`EXCESS_HEADER`),
which the windowing stage dead-letters as one ``too_large`` with their count.

The headers and reports are read defensively: nothing written to the internal topic may
stop the windowing stage. An event whose origin header is malformed (not ASCII, missing
parts, a sign, more digits than an offset has) cannot be checked for replays, so it is
not aggregated: the bus marks it and the aggregator dead-letters it (reason
``invalid_origin``). A malformed
progress report (wrong types, missing fields, non-finite times, more than
:data:`MAX_PARTITIONS` partitions) is skipped. Each is counted in
``vabus_aggregator_bus_protocol_errors_total{kind=malformed_origin|malformed_progress}``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator, Sequence
from typing import Any, Final

import orjson

from service.bus.base import Origin, OriginReport, Progress
from service.bus.internal_records import Marked, OnMalformed

__all__ = [
    "EXCESS_HEADER",
    "MAX_PARTITIONS",
    "ORIGIN_HEADER",
    "PROGRESS_HEADER",
    "Marked",
    "OnMalformed",
    "decode_progress",
    "encode_progress",
    "excess_record",
    "origins_of",
    "parse_origin",
    "read_origins",
    "split_at_progress",
]


ORIGIN_HEADER: Final = "vabus-origin"
EXCESS_HEADER: Final = "vabus-excess"
"""On the routing stage's one record for the elements of an input message past
``VABUS_MAX_EVENTS_PER_MESSAGE``: how many there are (the windowing stage dead-letters
them as one ``too_large``)."""
_EXCESS_TEXT: Final = 64 * 1024
PROGRESS_HEADER: Final = "vabus-progress"
UNROUTED: Final = "unrouted:"
"""Prefix of the origin given to a record without the origin header (written by something
other than the routing stage): unique, so it is never taken for a replay, and never an
input partition that holds event time."""
MAX_PARTITIONS: Final = 100_000
"""Most input partitions a progress report may announce (each is tracked by name)."""
# "<topic>:<partition>:<offset>:<element>": a Kafka topic name, and at most 18 digits
# (below 2**63) for each number, so no sign and no huge integer is ever parsed
_ORIGIN: Final = re.compile(r"([A-Za-z0-9._-]{1,249}:[0-9]{1,9}):([0-9]{1,18}):([0-9]{1,18})")
_ABSENT: Final = object()


def encode_progress(progress: Progress) -> bytes:
    return orjson.dumps(
        {
            "topic": progress.topic,
            "partitions": progress.partitions,
            "origins": {
                k: [r.max_ts, r.caught_up, round(r.silent_for, 3)]
                for k, r in progress.origins.items()
            },
        }
    )


def decode_progress(value: bytes | None) -> Progress | None:
    """The report in a progress record, or None when it is not a well-formed one."""
    try:
        body = orjson.loads(value or b"")
        topic, partitions = body["topic"], body["partitions"]
        if type(topic) is not str or not topic or type(partitions) is not int:
            return None
        if not 1 <= partitions <= MAX_PARTITIONS:
            return None
        origins = {
            str(k): OriginReport(
                None if max_ts is None else _finite(max_ts),
                bool(caught_up),
                max(0.0, _finite(silent_for)),
            )
            for k, (max_ts, caught_up, silent_for) in body["origins"].items()
        }
        return Progress(topic, partitions, origins)
    except (orjson.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError):
        return None


def _finite(x: Any) -> float:
    if type(x) is bool or not isinstance(x, int | float) or not math.isfinite(x):
        raise ValueError(f"not a finite number: {x!r}")
    return float(x)


def _header(msg: Any, name: str) -> bytes | None:
    return next((v for k, v in msg.headers or () if k == name), None)


def parse_origin(raw: Any) -> Origin | None:
    """The origin in a ``vabus-origin`` header value, or None when it is malformed."""
    if type(raw) is not bytes or len(raw) > 300:
        return None
    try:
        found = _ORIGIN.fullmatch(raw.decode("ascii"))
    except UnicodeDecodeError:
        return None
    if found is None:
        return None
    return found[1], int(found[2]), int(found[3])


def read_origins(
    msgs: Sequence[Any], on_malformed: OnMalformed | None = None
) -> tuple[list[Origin], Marked]:
    """Each event record's origin (see :data:`UNROUTED` for records without one), and
    the records to dead-letter: those whose origin header is malformed (their origin in
    the list is a placeholder, unique like an unrouted one; ``on_malformed`` is told),
    and the routing stage's record of the elements past a message's cap."""
    out: list[Origin] = []
    marked: Marked = {}
    for i, m in enumerate(msgs):
        headers = m.headers
        raw: Any
        if headers and headers[0][0] == ORIGIN_HEADER:  # the routing stage writes it first
            raw = headers[0][1]
        else:
            raw = next((v for k, v in headers or () if k == ORIGIN_HEADER), _ABSENT)
        if raw is _ABSENT:
            out.append((f"{UNROUTED}{m.partition}", m.offset, 0))
            continue
        origin = parse_origin(raw)
        if origin is None:
            if on_malformed is not None:
                on_malformed("malformed_origin", raw)
            shown = bytes(raw[:100]) if type(raw) is bytes else raw
            detail = f"malformed {ORIGIN_HEADER} header {shown!r} on the internal topic"
            marked[i] = ("invalid_origin", detail, 1)
            origin = (f"{UNROUTED}{m.partition}", m.offset, 0)
        elif len(headers) > 1 and (excess := _excess(headers)):
            detail = (
                f"{excess} elements past the first {origin[2]} of input message "
                f"{origin[0]} offset {origin[1]} (VABUS_MAX_EVENTS_PER_MESSAGE); raw is "
                "the start of them"
            )
            marked[i] = ("too_large", detail, excess)
        out.append(origin)
    return out, marked


def _excess(headers: Sequence[tuple[str, Any]]) -> int:
    """The count in an :data:`EXCESS_HEADER`, 0 when there is none (or it is malformed:
    the record is then an ordinary one, which its value's text makes invalid JSON)."""
    raw = next((v for k, v in headers if k == EXCESS_HEADER), None)
    if type(raw) is not bytes or not raw.isdigit() or len(raw) > 18:
        return 0
    return int(raw)


def origins_of(msgs: Sequence[Any]) -> list[Origin]:
    """:func:`read_origins` without the records to dead-letter."""
    return read_origins(msgs)[0]


def excess_record(texts: Sequence[bytes]) -> bytes:
    """The value of the routing stage's record of the elements past a message's cap: the
    start of their texts, cut short so that it is never valid JSON (a reader that does
    not know :data:`EXCESS_HEADER` dead-letters it as ``invalid_json``)."""
    out = bytearray(b"[")
    for t in texts:
        if len(out) >= _EXCESS_TEXT:
            break
        out += t
        out += b","
    return bytes(out[:_EXCESS_TEXT])


def split_at_progress(
    msgs: Sequence[Any], on_malformed: OnMalformed | None = None
) -> Iterator[tuple[Sequence[Any], Progress | None, int]]:
    """The messages of one fetch as runs of event records, each with the progress report
    that ends it (None for the last run when no report ends it, or when the report is
    malformed: ``on_malformed`` is told) and the offset after it.
    Runs without events but with a report are kept: the report alone moves event time."""
    start = 0
    for i, m in enumerate(msgs):
        if _header(m, PROGRESS_HEADER) is None:
            continue
        progress = decode_progress(m.value)
        if progress is None and on_malformed is not None:
            on_malformed("malformed_progress", m.value)
        yield msgs[start:i], progress, m.offset + 1
        start = i + 1
    if start < len(msgs):
        yield msgs[start:], None, msgs[-1].offset + 1
