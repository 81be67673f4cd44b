"""Decoding and validation at the edge (rules and reasons: docs/aggregation.md, "Input events").

Two paths that must agree exactly:

* **fast** — :data:`decode_fast` (msgspec, typed): one C call turns a message's bytes
  into :class:`WireEvent` structs (or a list of them), checking types, the name length
  and the number range on the way. It only *accepts*; whatever it refuses, and every
  event the hot loop's remaining checks (:func:`fast_ok`) do not pass, goes to the
  reference path, so reasons and details come from one place.
* **reference** — :func:`loads_message` (orjson, then the standard library) and
  :func:`parse_event` per element: the exact reason of every rejection.

``tests/unit/test_decode_fast.py`` checks that the fast path never accepts what the
reference path rejects, and reads the same numbers.

With ``AGGREGATION_GROUP_BY`` set the fast path decodes the structs of
:func:`tagged_decoder` instead (the event's ``tags``, of which only the group-by keys
are read) and the reference path reads ``tags`` after :func:`parse_event`; both make
the series key by :mod:`service.aggregation.series`, the fast path refusing whatever
the reference decoder could read differently. Without it, nothing here looks at
``tags``.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from datetime import datetime
from typing import Annotated, Any, Final

import msgspec
import orjson

from service.core.events import AGG_FUNCS

__all__ = [
    "CANONICAL_FUNCS",
    "MAX_NAME_LENGTH",
    "MAX_TAG_LENGTH",
    "RAW_LIMIT",
    "Rejected",
    "WireEvent",
    "decode_fast",
    "element_of",
    "fast_ok",
    "loads_message",
    "name_fault",
    "parse_event",
    "raw_text",
    "tag_fault",
    "tagged_decoder",
]

MAX_NAME_LENGTH: Final = 200
MAX_TAG_LENGTH: Final = 200  # characters of a group-by tag value (contract §12.3)
RAW_LIMIT: Final = 64 * 1024  # dead-letter `raw` is truncated to this many characters
_FUNCS: Final = frozenset(AGG_FUNCS)
# agg_func as sent -> its canonical name, for the spellings the fast path takes as they
# are (absent/null, lower case); any other spelling goes through parse_event.
CANONICAL_FUNCS: Final[dict[str | None, str]] = {None: "sum", **{f: f for f in AGG_FUNCS}}


class WireEvent(msgspec.Struct, gc=False):
    """A structurally valid event, as msgspec decodes it (unknown fields ignored).

    ``value`` is a finite double (msgspec refuses booleans, strings and numbers out of
    range; JSON has no NaN). ``timestamp`` is still unchecked: a float may be negative
    or in the future, a string still has to be parsed (see :func:`fast_ok`).
    Also the aggregator's common form of an accepted event: the reference path builds
    these with a float ``timestamp`` and a canonical ``agg_func``.
    """

    name: Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_NAME_LENGTH)]
    value: float
    timestamp: float | str
    agg_func: str | None = None


decode_fast: Final = msgspec.json.Decoder(WireEvent | list[WireEvent]).decode
"""bytes -> ``WireEvent | list[WireEvent]``; raises (any exception) when the message is
not exactly that shape: the caller then takes the reference path."""


def tagged_decoder(group_by: tuple[str, ...]) -> tuple[type[WireEvent], Callable[[bytes], Any]]:
    """(event type, decoder) of :data:`decode_fast` with ``tags`` for these group-by
    keys: the event's ``tags`` field is a struct of the group-by values only
    (``msgspec.UNSET`` where absent; the other keys are skipped, never built), or None.
    Once its series key is made, an event's ``name`` holds it (the hot loop keys by
    ``name``): only the aggregator's decode steps see the name before that."""
    fields = [(f"t{i}", Any, msgspec.UNSET) for i in range(len(group_by))]
    rename = {f"t{i}": key for i, key in enumerate(group_by)}
    tags = msgspec.defstruct("GroupByTags", fields, rename=rename, gc=False)
    event = msgspec.defstruct(
        "TaggedWire", [("tags", tags | None, None)], bases=(WireEvent,), gc=False
    )
    return event, msgspec.json.Decoder(event | list[event]).decode  # type: ignore[valid-type,return-value]


def fast_ok(ev: WireEvent, max_ts: float) -> bool:
    """Whether a fast-decoded event is valid as it is (the checks msgspec cannot make).

    The hot loop (:mod:`service.aggregation.batch_run`) inlines this test for
    single-event messages, all but the name: its reference step checks
    :func:`name_fault` when an event would open a window or a key, or be rejected as
    late or over budget, before it changes any state, so a name already open costs
    nothing. ``tests/unit/test_decode_fast.py`` (the fast decoder off) and
    ``tests/unit/test_window_paths.py`` (the reference path alone) hold them in step.
    """
    ts = ev.timestamp
    return (
        type(ts) is float
        and 0.0 <= ts <= max_ts
        and ev.agg_func in CANONICAL_FUNCS
        and (ev.name.isprintable() or name_fault(ev.name) is None)
    )


# Characters no output may hold in a name: C0 controls and DEL (PostgreSQL text refuses
# NUL; the others break logs, labels and terminals) and lone UTF-16 surrogates (not
# Unicode text: UTF-8 cannot carry them, so neither JSON output nor PostgreSQL can).
_NAME_FAULT: Final = re.compile("[\x00-\x1f\x7f\ud800-\udfff]")


def name_fault(name: str) -> str | None:
    """Why ``name`` cannot be an event name (a control character or a lone surrogate,
    located), or None. ``str.isprintable`` is false for every such character, so the
    common name costs one C call and only the others are searched."""
    if name.isprintable():
        return None
    bad = _NAME_FAULT.search(name)
    if bad is None:
        return None  # other non-printables (spaces, format characters) are allowed
    code = ord(bad.group())
    what = "a lone UTF-16 surrogate" if 0xD800 <= code <= 0xDFFF else "a control character"
    return (
        f"'name' holds {what} (U+{code:04X} at index {bad.start()}); names may not hold "
        "control characters (U+0000-U+001F, U+007F) or lone surrogates"
    )


def tag_fault(value: str) -> str | None:
    """Why a tag value cannot be stored (PostgreSQL jsonb refuses NUL, UTF-8 a lone
    surrogate; the other controls are refused like in names), or None."""
    if value.isprintable():
        return None
    bad = _NAME_FAULT.search(value)
    if bad is None:
        return None
    return (
        f"a tag value holds a control character or a lone surrogate "
        f"(U+{ord(bad.group()):04X} at index {bad.start()})"
    )


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


def element_of(record: bytes, index: int) -> Any:
    """Element ``index`` of a message (the message itself if it is not an array), as the
    reference decoder reads it: the ``raw`` of a dead letter for an event that was
    decoded by the fast path and rejected later (late, cardinality limit)."""
    try:
        decoded = loads_message(record)
    except Rejected:  # not expected after a fast decode; keep the bytes then
        return record
    return decoded[index] if type(decoded) is list else decoded


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
    # "\u0000" and "\ud800" are valid JSON, but PostgreSQL text cannot hold NUL and no
    # UTF-8 output a lone surrogate: accepted, either would fail writes for good.
    fault = name_fault(name)
    if fault is not None:
        raise Rejected("invalid_name", fault)
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
