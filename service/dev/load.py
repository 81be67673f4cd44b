"""Synthetic load for the emulator: names, functions, values, invalid and late events."""

from __future__ import annotations

import random
from collections.abc import Iterable
from typing import Any, Protocol

from service.core.clock import Clock, SystemClock
from service.core.events import AGG_FUNCS

__all__ = ["Appender", "LoadGenerator"]


class Appender(Protocol):
    """Where generated events go: :meth:`service.dev.emulator.Emulator.append`."""

    def append(self, events: Iterable[Any]) -> str: ...


class LoadGenerator:
    """Appends synthetic events to an emulator at ``rate`` events/s.

    Deterministic for a seed (the sequence of names, functions and values; event time
    is the injected clock's now). ``agg_func`` fixes one function for every event;
    ``fixed_per_name`` gives each name one function of its own; otherwise each event
    draws one. ``invalid_fraction`` of events break a rule of docs/aggregation.md#input-events
    and ``late_fraction`` carry a timestamp ``late_by_s`` in the past.
    """

    def __init__(
        self,
        emulator: Appender,
        *,
        rate: float,
        names: int = 50,
        seed: int = 0,
        clock: Clock | None = None,
        agg_func: str | None = None,
        fixed_per_name: bool = False,
        invalid_fraction: float = 0.0,
        late_fraction: float = 0.0,
        late_by_s: float = 3600.0,
        tick_s: float = 0.02,
    ) -> None:
        if rate <= 0 or names < 1:
            raise ValueError(f"rate must be > 0 and names >= 1 (got {rate}, {names})")
        if agg_func is not None and agg_func not in AGG_FUNCS:
            raise ValueError(f"agg_func {agg_func!r} is not one of {', '.join(AGG_FUNCS)}")
        self._emulator = emulator
        self._rate = rate
        self._clock = clock or SystemClock()
        self._rng = random.Random(seed)
        self._names = [f"load.{k:04d}" for k in range(names)]
        per_name = random.Random(seed ^ 0x5EED)
        self._funcs: list[str] | None = None
        if agg_func is not None:
            self._funcs = [agg_func] * names
        elif fixed_per_name:
            self._funcs = [per_name.choice(AGG_FUNCS) for _ in range(names)]
        self._invalid = invalid_fraction
        self._late = late_fraction
        self._late_by = late_by_s
        self._tick = tick_s
        self.generated = 0

    def generate(self, n: int) -> list[bytes]:
        """The next ``n`` events as JSON texts."""
        rng, now = self._rng, self._clock.now()
        out: list[bytes] = []
        for _ in range(n):
            k = rng.randrange(len(self._names))
            name = self._names[k]
            ts = now - self._late_by if self._late and rng.random() < self._late else now
            if self._invalid and rng.random() < self._invalid:
                out.append(self._invalid_event(name, ts))
                continue
            func = self._funcs[k] if self._funcs else rng.choice(AGG_FUNCS)
            value = round(rng.uniform(0.0, 100.0), 3)
            out.append(
                b'{"name":"%s","value":%r,"timestamp":%.3f,"agg_func":"%s"}'
                % (name.encode(), value, ts, func.encode())
            )
        self.generated += n
        return out

    def _invalid_event(self, name: str, ts: float) -> bytes:
        n, t = name.encode(), b"%.3f" % ts
        forms = (
            b'{"name":"%s","value":"abc","timestamp":%s}' % (n, t),  # invalid_value
            b'{"value":1,"timestamp":%s}' % t,  # missing_name
            b'{"name":"%s","value":1,"timestamp":"yesterday"}' % n,  # invalid_timestamp
            b'{"name":"%s","value":1,"timestamp":%s,"agg_func":"median"}' % (n, t),
            b'"not an event"',  # not_an_object
        )
        return forms[self._rng.randrange(len(forms))]

    async def run(self) -> None:
        """Generate until cancelled. Falling behind by more than a second is forgiven
        rather than made up in one burst."""
        started, done = self._clock.monotonic(), 0
        while True:
            due = int((self._clock.monotonic() - started) * self._rate)
            if due - done > self._rate:
                done = due - int(self._rate)
            if due > done:
                self._emulator.append(self.generate(due - done))
                done = due
            await self._clock.sleep(self._tick)
