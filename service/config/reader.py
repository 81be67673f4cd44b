"""Reading variables: an environs ``Env`` kept hermetic, and a reader that collects
every problem instead of stopping at the first."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

from environs import Env, EnvValidationError, validate

from service.config.masking import shown
from service.config.parsers import Invalid

_T = TypeVar("_T")


class SourceEnv(Env):
    """An environs ``Env`` that reads only the mapping it is given, then its ``.env``.

    environs always consults ``os.environ`` first; overriding that one lookup keeps an
    explicitly passed environment hermetic.
    """

    def __init__(self, source: Mapping[str, str]) -> None:
        super().__init__(eager=False)
        self._source = source

    def _get_value(self, env_key: str, default: Any) -> Any:
        for values in (self._source, self._environ):
            value = values.get(env_key)
            if value:  # empty counts as unset
                return value
        return default

    def raw(self, name: str) -> str | None:
        value = self._get_value(name, None)
        return value if isinstance(value, str) else None


class Reader:
    """Reads variables without stopping at the first bad one.

    A bad value is replaced by its default so that reading goes on; every problem is
    kept and reported in the order the variables were read.
    """

    def __init__(self, environ: Mapping[str, str] | None, dotenv: str | None) -> None:
        self._env = SourceEnv(dict(os.environ) if environ is None else environ)
        if dotenv is not None:
            self._env.read_env(dotenv, recurse=False)
        self._expected: dict[str, str] = {}
        self._failures: dict[str, str] = {}  # name -> problem line

    def integer(self, name: str, default: int, *, low: int, high: int | None = None) -> int:
        form = f"an integer >= {low}" if high is None else f"an integer {low}-{high}"
        self._expected[name] = form
        value = self._env.int(name, default, validate=validate.Range(min=low, max=high))
        return default if value is None else value

    def seconds(self, name: str, default: float, *, allow_zero: bool = False) -> float:
        value = self._seconds(name, allow_zero=allow_zero)
        return default if value is None else value

    def optional_seconds(self, name: str) -> float | None:
        return self._seconds(name, allow_zero=False)

    def _seconds(self, name: str, *, allow_zero: bool) -> float | None:
        self._expected[name] = f"a number of seconds {'>= 0' if allow_zero else '> 0'}"
        check = validate.Range(min=0, min_inclusive=allow_zero)
        return self._env.float(name, None, validate=check)

    def custom(self, name: str, default: _T, parse: Callable[[str], _T], form: str) -> _T:
        """Read ``name`` with ``parse``, which raises ``ValueError`` on a bad value."""
        self._expected[name] = form
        raw = self._env.raw(name)
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
        line = f"{name}={shown(name, self._env.raw(name) or '')}: expected {form}"
        self._failures[name] = f"{line} ({detail})" if detail else line

    def raw(self, name: str) -> str | None:
        return self._env.raw(name)

    def failed(self, name: str) -> bool:
        """Whether a problem with ``name`` is already recorded (its value is the default)."""
        return name in self._failures

    def problems(self) -> list[str]:
        try:
            self._env.seal()
        except EnvValidationError as error:
            for name in error.error_messages:
                self.fail(str(name), self._expected[str(name)])
        order = {name: index for index, name in enumerate(self._expected)}
        names = sorted(self._failures, key=lambda name: order.get(name, len(order)))
        return [self._failures[name] for name in names]
