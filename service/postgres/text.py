"""Text that PostgreSQL ``text`` can hold, whatever the input was.

PostgreSQL refuses NUL in ``text`` (SQLSTATE 22021), and asyncpg cannot even send a
string holding a lone UTF-16 surrogate (SQLSTATE 22000 from its encoder; Python's json
reads one from a ``"\\ud800"`` escape or from the UTF-8 bytes of a surrogate): either
would fail the write, and a dead letter that cannot be written stops the output.
Event names are validated upstream; this is for every other text, and a last guard.

Both are escaped the way JSON spells them, so the text stays readable and JSON-ish: NUL
becomes the six characters ``\\u0000``, a lone surrogate ``\\udXXX``. A backslash
already in the text is left as it is, so the escape cannot be told from the same six
characters sent literally; a dead letter is for reading, not for replaying byte for
byte.
"""

from __future__ import annotations

import json
from typing import Any

import orjson

__all__ = ["json_text", "storable_text"]


def storable_text(text: str) -> str:
    """``text`` with NUL and lone surrogates escaped (see the module); any other text is
    returned as it is, at the cost of one scan for the common, clean case."""
    if "\x00" in text:
        text = text.replace("\x00", "\\u0000")
    if not text.isascii():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:  # lone surrogates: "\ud800" -> the 6 characters \ud800
            text = text.encode("utf-8", "backslashreplace").decode("utf-8")
    return text


def json_text(obj: Any) -> str:
    """``obj`` as JSON text, never raising for a string orjson refuses (a lone surrogate):
    the standard library then writes it as a ``\\u`` escape."""
    try:
        return orjson.dumps(obj).decode()
    except TypeError:
        return json.dumps(obj)
