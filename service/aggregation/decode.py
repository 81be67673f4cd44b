"""Decoding and validation at the edge (contract §2 and §10).

The hot path calls :func:`parse_event` once per event; it returns a plain tuple and
raises :class:`Rejected` (rare) with one of the contract's reasons.
"""

from __future__ import annotations

import json
import math
from datetime import datetime
from typing import Any, Final

import orjson

from service.events import AGG_FUNCS

__all__ = ["MAX_NAME_LENGTH", "RAW_LIMIT", "Rejected", "loads_message", "parse_event", "raw_text"]

MAX_NAME_LENGTH: Final = 200
RAW_LIMIT: Final = 64 * 1024  # dead-letter `raw` is truncated to this many characters
_FUNCS: Final = frozenset(AGG_FUNCS)


class Rejected(Exception):
    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(reason, detail)
        self.reason = reason
        self.detail = detail


def loads_message(data: bytes) -> Any:
    """Parse one transport message. orjson first (fast); on failure the standard
    library, which also reads 400-digit integers and NaN/Infinity so that they become
    ``invalid_value`` rejections instead of whole-message ``invalid_json`` ones."""
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError:
        pass
    try:
        return json.loads(data)
    except (ValueError, RecursionError) as exc:
        raise Rejected("invalid_json", f"not valid JSON: {exc}") from None


def raw_text(obj: Any) -> str:
    """The JSON text of one element, for a dead letter."""
    if isinstance(obj, bytes | bytearray):
        return bytes(obj[:RAW_LIMIT]).decode("utf-8", "replace")
    try:
        text = orjson.dumps(obj).decode()
    except TypeError:  # NaN/inf or huge ints from the fallback parser
        text = json.dumps(obj)
    return text[:RAW_LIMIT]


def _timestamp(raw: Any) -> float:
    kind = type(raw)
    if kind is float or kind is int:
        try:
            ts = float(raw)
        except OverflowError:
            raise Rejected("invalid_timestamp", "timestamp does not fit a double") from None
    elif kind is str:
        try:
            dt = datetime.fromisoformat(raw)
        except ValueError:
            raise Rejected("invalid_timestamp", f"timestamp {raw[:64]!r} is not ISO-8601") from None
        if dt.tzinfo is None:
            raise Rejected(
                "invalid_timestamp",
                f"timestamp {raw[:64]!r} has no UTC offset (add 'Z' or '+00:00')",
            )
        ts = dt.timestamp()
    else:
        raise Rejected(
            "invalid_timestamp",
            f"timestamp must be epoch seconds or an ISO-8601 string, not {kind.__name__}",
        )
    if not math.isfinite(ts) or ts < 0:
        raise Rejected("invalid_timestamp", f"timestamp {ts!r} is not a time after 1970")
    return ts


def parse_event(obj: Any, max_ts: float) -> tuple[str, str, float, float]:
    """Validate one decoded event -> ``(name, agg_func, value, timestamp)``.

    ``max_ts`` is the latest acceptable event time (service clock + max future).
    """
    if type(obj) is not dict:
        raise Rejected("not_an_object", f"an event must be a JSON object, not {type(obj).__name__}")
    name: Any = obj.get("name")
    if type(name) is not str or not name or len(name) > MAX_NAME_LENGTH:
        if name is None:
            raise Rejected("missing_name", "field 'name' is required")
        raise Rejected(
            "invalid_name", f"'name' must be a non-empty string of at most {MAX_NAME_LENGTH} chars"
        )
    value: Any = obj.get("value")
    kind = type(value)
    if kind is float:
        if not math.isfinite(value):
            raise Rejected("invalid_value", f"'value' {value!r} is not a finite number")
    elif kind is int:
        try:
            value = float(value)
        except OverflowError:
            raise Rejected("invalid_value", "'value' does not fit a finite double") from None
    elif value is None:
        raise Rejected("missing_value", "field 'value' is required")
    else:
        raise Rejected("invalid_value", f"'value' must be a number, not {kind.__name__}")
    raw_ts = obj.get("timestamp")
    if raw_ts is None:
        raise Rejected("missing_timestamp", "field 'timestamp' is required")
    ts = _timestamp(raw_ts)
    if ts > max_ts:
        raise Rejected("future_timestamp", f"timestamp {ts!r} is beyond the allowed future")
    func: Any = obj.get("agg_func")
    if func is None:
        func = "sum"
    elif type(func) is not str or (func := func.lower()) not in _FUNCS:
        raise Rejected("unknown_agg_func", f"'agg_func' must be one of {', '.join(AGG_FUNCS)}")
    return name, func, value, ts
