"""The range and the names a replay covers: ``--from``/``--to`` and ``--names``.

An instant is ISO-8601 with an explicit offset (``2026-12-03T09:00:00+00:00``, ``Z``)
or Unix seconds. A time without an offset is refused: "09:00" on the operator's laptop
and on the server are different hours, and a replay writes revisions that stay.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from datetime import datetime
from fnmatch import translate
from typing import Final

from service.core.errors import ConfigError

__all__ = ["ReplaySpan", "parse_instant", "parse_span"]

_SECONDS: Final = re.compile(r"[+-]?\d+(\.\d+)?")
_INSTANT_FORM: Final = "ISO-8601 with an offset (2026-12-03T09:00:00Z) or Unix seconds"
# far enough for any real archive, near enough that datetime and PostgreSQL accept it
_EARLIEST, _LATEST = 0.0, 253402300799.0  # 1970-01-01 .. 9999-12-31T23:59:59Z


@dataclass(frozen=True, slots=True)
class ReplaySpan:
    """Windows starting in ``[start, end)`` (Unix seconds) whose name matches ``names``
    (a glob; None: every name)."""

    start: float
    end: float
    names: str | None = None
    _pattern: re.Pattern[str] | None = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        pattern = None if self.names is None else re.compile(translate(self.names))
        object.__setattr__(self, "_pattern", pattern)

    def wants(self, name: str) -> bool:
        return self._pattern is None or self._pattern.match(name) is not None


def parse_instant(option: str, text: str) -> float:
    """``text`` as Unix seconds; :class:`ConfigError` naming ``option`` otherwise."""
    raw = text.strip()
    if _SECONDS.fullmatch(raw):
        at = float(raw)
    else:
        try:
            parsed = datetime.fromisoformat(raw.replace("Z", "+00:00").replace("z", "+00:00"))
        except ValueError:
            raise ConfigError([f"{option}={text!r}: expected {_INSTANT_FORM}"]) from None
        if parsed.tzinfo is None:
            raise ConfigError([f"{option}={text!r}: the time has no offset; add one (Z or +01:00)"])
        at = parsed.timestamp()
    if not (math.isfinite(at) and _EARLIEST <= at <= _LATEST):
        raise ConfigError([f"{option}={text!r}: out of range (1970 to 9999)"])
    return at


def parse_span(start: str, end: str, names: str | None = None) -> ReplaySpan:
    """The validated range; every problem at once, like the configuration loader."""
    problems: list[str] = []
    at: list[float] = []
    for option, text in (("--from", start), ("--to", end)):
        try:
            at.append(parse_instant(option, text))
        except ConfigError as exc:
            problems += exc.problems
    if not problems and at[0] >= at[1]:
        problems.append(f"--from {start!r} is not before --to {end!r}: the range is empty")
    if names is not None and not names.strip():
        problems.append("--names is empty: give a glob such as 'cpu.*', or leave it out")
    if problems:
        raise ConfigError(problems)
    return ReplaySpan(at[0], at[1], names)
