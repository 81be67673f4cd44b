"""JSON texts without decoding them: the exact text of each element of an array.

The HTTP bus uses it to isolate one unparseable element of an answer (so only that one
is dead-lettered), and the emulator to keep each posted element as it was written.
"""

from __future__ import annotations

import json

__all__ = ["skip_ws", "split_json_array"]


def split_json_array(text: str, pos: int = 0) -> tuple[list[str], int]:
    """The exact texts of the elements of the JSON array at ``text[pos]``, and the index
    after it. Raises ``ValueError`` if there is no well-formed array there."""
    decoder = json.JSONDecoder()
    if text[pos : pos + 1] != "[":
        raise ValueError(f"expected '[' at {pos}")
    pos = skip_ws(text, pos + 1)
    elements: list[str] = []
    if text[pos : pos + 1] == "]":
        return elements, pos + 1
    while True:
        _, end = decoder.raw_decode(text, pos)
        elements.append(text[pos:end])
        pos = skip_ws(text, end)
        if text[pos : pos + 1] == "]":
            return elements, pos + 1
        if text[pos : pos + 1] != ",":
            raise ValueError(f"expected ',' or ']' at {pos}")
        pos = skip_ws(text, pos + 1)


def skip_ws(text: str, pos: int) -> int:
    while pos < len(text) and text[pos] in " \t\n\r":
        pos += 1
    return pos
