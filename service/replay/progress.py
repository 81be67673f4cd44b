"""Progress of a replay on stderr: a bar redrawn in place on a terminal; otherwise (a
log, a pipe) one plain line per hour of the archive once its files are read."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import TextIO

from service.archive.layout import hour_dir

__all__ = ["Progress"]

_WIDTH = 30


class Progress:
    def __init__(self, out: TextIO, tty: bool | None = None) -> None:
        self._out = out
        self._tty = out.isatty() if tty is None else tty
        self._hours: list[str] = []
        self._left: Counter[str] = Counter()
        self._total = 0
        self._done = 0

    def expect(self, hours: Sequence[int], files: Sequence[str]) -> None:
        """The hours covered and the files to be read (names under the archive's root)."""
        self._hours = [hour_dir(h) for h in hours]
        for name in files:
            self._left[name.partition("/")[0]] += 1
        self._total += len(files)
        if not self._tty:
            for hour in self._hours:
                if not self._left[hour]:
                    self._line(hour, 0)

    def done(self, name: str) -> None:
        self._done += 1
        hour = name.partition("/")[0]
        self._left[hour] -= 1
        if self._tty:
            filled = _WIDTH * self._done // max(self._total, 1)
            bar = "#" * filled + "." * (_WIDTH - filled)
            self._out.write(f"\rreplay [{bar}] {self._done}/{self._total} files")
            self._out.flush()
        elif self._left[hour] == 0:
            self._line(hour, 1)

    def _line(self, hour: str, read: int) -> None:
        what = "read" if read else "no files"
        self._out.write(f"replay: {hour.removeprefix('hour=')} {what}\n")
        self._out.flush()

    def finish(self) -> None:
        if self._tty and self._total:
            self._out.write("\n")
            self._out.flush()
