"""Timing marks a tool process leaves for the driver: JSON lines in a file.

Used by the in-repo tools (``limit``, ``baseline``). ``{"first": t}`` is the Unix time
the tool's own code first saw events; the driver reads the file after the run.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import orjson


class Marks:
    def __init__(self, path: str | Path) -> None:
        self._path = Path(path)
        self._first_seen = False

    def first(self) -> None:
        """Record the first-event time once; later calls cost one attribute test."""
        if not self._first_seen:
            self._first_seen = True
            self.write(first=time.time())

    def write(self, **fields: Any) -> None:
        with self._path.open("ab") as f:
            f.write(orjson.dumps(fields) + b"\n")


def read_marks(path: str | Path) -> dict[str, Any]:
    """All marks merged (a later line wins); empty when the file is absent."""
    merged: dict[str, Any] = {}
    try:
        lines = Path(path).read_bytes().splitlines()
    except FileNotFoundError:
        return merged
    for line in lines:
        if line.strip():
            merged.update(orjson.loads(line))
    return merged


def read_first_event_file(path: str | Path) -> float | None:
    """The reference scripts' ``--first-event-file``: one Unix time, or None."""
    try:
        return float(Path(path).read_text().split()[0])
    except (FileNotFoundError, IndexError, ValueError):
        return None
