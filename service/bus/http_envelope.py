"""The VaBus HTTP answer's envelope, ``{"events": [...], "cursor": ...}``, read from its body."""

from __future__ import annotations

import json
import re
from typing import Any, Final

import orjson

from service.bus.json_text import skip_ws, split_json_array

__all__ = ["cursor_from_text", "parse_envelope"]

_CURSOR_TEXT: Final = re.compile(rb'"cursor"\s*:\s*("(?:[^"\\]|\\.)*")')


def parse_envelope(body: bytes) -> tuple[list[Any] | None, Any]:
    """``(events, cursor)``; ``events`` is None when the body is not an envelope; the
    cursor as it was sent (any JSON value, None when absent), for
    :func:`service.bus.http_limits.check_cursor`.

    orjson refuses numbers outside a double (``1e999``, 400-digit integers) that are
    still JSON; then the standard library parses the envelope and the events are handed
    on as their exact texts (``bytes``), which the aggregator rejects one by one.
    """
    try:
        envelope = orjson.loads(body)
    except orjson.JSONDecodeError:
        return _parse_envelope_slowly(body)
    if not isinstance(envelope, dict):
        return None, None
    events, cursor = envelope.get("events"), envelope.get("cursor")
    return (events if isinstance(events, list) else None), cursor


def cursor_from_text(body: bytes) -> str | None:
    """The last ``"cursor": "..."`` of a body that is not valid JSON as a whole."""
    found = _CURSOR_TEXT.findall(body[-4096:])
    if not found:
        return None
    try:
        cursor = json.loads(found[-1])
    except ValueError:
        return None
    return cursor if isinstance(cursor, str) else None


def _parse_envelope_slowly(body: bytes) -> tuple[list[Any] | None, Any]:
    try:
        text = body.decode("utf-8")
        envelope = json.loads(text)
    except (ValueError, RecursionError):
        return None, None
    if not isinstance(envelope, dict):
        return None, None
    cursor = envelope.get("cursor")
    if not isinstance(envelope.get("events"), list):
        return None, cursor
    return [e.encode() for e in _events_texts(text)], cursor


def _events_texts(text: str) -> list[str]:
    """The element texts of the top-level ``events`` array of a valid JSON object."""
    decoder = json.JSONDecoder()
    found: list[str] = []
    pos = skip_ws(text, skip_ws(text, 0) + 1)  # past "{"
    while text[pos] != "}":
        key, pos = decoder.raw_decode(text, pos)
        pos = skip_ws(text, skip_ws(text, pos) + 1)  # past ":"
        if key == "events":
            found, pos = split_json_array(text, pos)  # the last duplicate wins, as in json
        else:
            _, pos = decoder.raw_decode(text, pos)
        pos = skip_ws(text, pos)
        if text[pos] == ",":
            pos = skip_ws(text, pos + 1)
    return found
