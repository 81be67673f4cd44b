"""The records of the internal topic of ``repartition=true`` (:mod:`service.bus.repartition`).

Two kinds, told apart by their headers:

* an **event** routed by name, with ``vabus-origin: <topic>:<partition>:<offset>:<element>``:
  where it came from in the input, so that the windowing stage can drop replays;
* a **progress report** with ``vabus-progress: 1`` and a JSON value
  ``{"topic": "in", "partitions": 8, "origins": {"in:3": [max_ts, caught_up, silent_for]}}``:
  what one routing instance knows of the input partitions it reads, written to every
  internal partition about once a second, after the events it covers. The windowing stage
  holds each internal partition's event time per input partition with it
  (:mod:`service.aggregation.origins`).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from typing import Any, Final

import orjson

from service.bus.base import Origin, OriginReport, Progress

__all__ = [
    "ORIGIN_HEADER",
    "PROGRESS_HEADER",
    "decode_progress",
    "encode_progress",
    "origins_of",
    "split_at_progress",
]

log = logging.getLogger(__name__)

ORIGIN_HEADER: Final = "vabus-origin"
PROGRESS_HEADER: Final = "vabus-progress"
UNROUTED: Final = "unrouted:"
"""Prefix of the origin given to a record without the origin header (written by something
other than the routing stage): unique, so it is never taken for a replay, and never an
input partition that holds event time."""


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
    """The report in a progress record, or None (logged) when it is not one."""
    try:
        body = orjson.loads(value or b"")
        origins = {
            str(k): OriginReport(
                None if v[0] is None else float(v[0]), bool(v[1]), max(0.0, float(v[2]))
            )
            for k, v in body["origins"].items()
        }
        return Progress(str(body["topic"]), int(body["partitions"]), origins)
    except (orjson.JSONDecodeError, KeyError, TypeError, ValueError, IndexError, AttributeError):
        log.warning("repartition: ignoring a malformed progress record %r", (value or b"")[:200])
        return None


def _header(msg: Any, name: str) -> bytes | None:
    return next((v for k, v in msg.headers or () if k == name), None)


def origins_of(msgs: Sequence[Any]) -> list[Origin]:
    """Each event record's origin (see :data:`UNROUTED` for records without one)."""
    out: list[Origin] = []
    for m in msgs:
        headers = m.headers
        if headers and headers[0][0] == ORIGIN_HEADER:  # the routing stage writes it first
            raw = headers[0][1]
        else:
            raw = _header(m, ORIGIN_HEADER)
        if raw is None:
            out.append((f"{UNROUTED}{m.partition}", m.offset, 0))
            continue
        partition, offset, element = raw.decode().rsplit(":", 2)
        out.append((partition, int(offset), int(element)))
    return out


def split_at_progress(msgs: Sequence[Any]) -> Iterator[tuple[Sequence[Any], Progress | None, int]]:
    """The messages of one fetch as runs of event records, each with the progress report
    that ends it (None for the last run when no report ends it) and the offset after it.
    Runs without events but with a report are kept: the report alone moves event time."""
    start = 0
    for i, m in enumerate(msgs):
        if _header(m, PROGRESS_HEADER) is None:
            continue
        yield msgs[start:i], decode_progress(m.value), m.offset + 1
        start = i + 1
    if start < len(msgs):
        yield msgs[start:], None, msgs[-1].offset + 1
