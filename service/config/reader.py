"""Reading variables hermetically (only the given mapping, then its ``.env``) with a
reader that collects every problem instead of stopping at the first."""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TypeVar

from dotenv import dotenv_values

from service.config.masking import shown
from service.config.parsers import Invalid

_T = TypeVar("_T")
_N = TypeVar("_N", int, float)


def _dotenv(path: str | None) -> dict[str, str]:
    """The variables of the ``.env`` file at ``path``; none when it is absent or ``None``."""
    if path is None or not Path(path).exists():
        return {}
    # interpolate=False: `${VAR}` in a value is literal (a password may contain `$`)
    values = dotenv_values(path, interpolate=False)
    return {name: value for name, value in values.items() if value is not None}


class Reader:
    """Reads variables without stopping at the first bad one.

    A bad value is replaced by its default so that reading goes on; every problem is
    kept and reported in the order the variables were read. A bad number is recorded
    only when the problems are asked for, after the consistency checks, so that a check's
    own message about the same variable is the one kept.
    """

    def __init__(self, environ: Mapping[str, str] | None, dotenv: str | None) -> None:
        self._sources = (dict(os.environ) if environ is None else environ, _dotenv(dotenv))
        self._expected: dict[str, str] = {}
        self._failures: dict[str, str] = {}  # name -> problem line
        self._bad_numbers: list[str] = []

    def integer(self, name: str, default: int, *, low: int, high: int | None = None) -> int:
        form = f"an integer >= {low}" if high is None else f"an integer {low}-{high}"
        self._expected[name] = form
        value = self._number(name, int, lambda n: n >= low and (high is None or n <= high))
        return default if value is None else value

    def seconds(self, name: str, default: float, *, allow_zero: bool = False) -> float:
        value = self._seconds(name, allow_zero=allow_zero)
        return default if value is None else value

    def optional_seconds(self, name: str) -> float | None:
        return self._seconds(name, allow_zero=False)

    def _seconds(self, name: str, *, allow_zero: bool) -> float | None:
        self._expected[name] = f"a number of seconds {'>= 0' if allow_zero else '> 0'}"
        return self._number(
            name, float, lambda s: math.isfinite(s) and (s >= 0 if allow_zero else s > 0)
        )

    def _number(
        self, name: str, kind: Callable[[str], _N], fits: Callable[[_N], bool]
    ) -> _N | None:
        """``name`` as a number that ``fits``; ``None`` when unset or bad (recorded)."""
        raw = self.raw(name)
        if raw is None:
            return None
        try:
            value = kind(raw)
        except ValueError:
            value = None
        if value is None or not fits(value):
            self._bad_numbers.append(name)
            return None
        return value

    def custom(self, name: str, default: _T, parse: Callable[[str], _T], form: str) -> _T:
        """Read ``name`` with ``parse``, which raises ``ValueError`` on a bad value."""
        self._expected[name] = form
        raw = self.raw(name)
        if raw is None:
            return default
        try:
            return parse(raw)
        except Invalid as error:
            self.fail(name, error.expected or form, error.detail)
        except ValueError:
            self.fail(name, form)
        return default

    def fail(self, name: str, form: str, detail: str = "") -> None:
        """Record a problem with ``name``; only the first one per variable is kept."""
        if name in self._failures:
            return
        line = f"{name}={shown(name, self.raw(name) or '')}: expected {form}"
        self._failures[name] = f"{line} ({detail})" if detail else line

    def raw(self, name: str) -> str | None:
        """The value of ``name``: the mapping's, else the ``.env`` file's; empty is unset."""
        for values in self._sources:
            value = values.get(name)
            if value:
                return value
        return None

    def failed(self, name: str) -> bool:
        """Whether a problem with ``name`` is already recorded (its value is the default)."""
        return name in self._failures

    def problems(self) -> list[str]:
        for name in self._bad_numbers:
            self.fail(name, self._expected[name])
        order = {name: index for index, name in enumerate(self._expected)}
        names = sorted(self._failures, key=lambda name: order.get(name, len(order)))
        return [self._failures[name] for name in names]
