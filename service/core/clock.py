"""Injected time. Production uses :class:`SystemClock`; tests use :class:`ManualClock`."""

from __future__ import annotations

import asyncio
import time
from typing import Protocol

__all__ = ["Clock", "ManualClock", "SystemClock"]


class Clock(Protocol):
    def now(self) -> float:
        """Wall time, Unix seconds."""

    def monotonic(self) -> float:
        """Seconds on a clock that never goes back; only differences mean anything."""

    async def sleep(self, seconds: float) -> None: ...


class SystemClock:
    def now(self) -> float:
        return time.time()

    def monotonic(self) -> float:
        return time.monotonic()

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)


class ManualClock:
    """A clock that moves only when a test calls :meth:`advance`.

    ``sleep`` waits until the clock has been advanced far enough, so code under test
    that sleeps can be driven step by step without real waiting. :meth:`sleeping` lets
    the test wait until that code is parked in ``sleep`` before it moves the clock.
    """

    def __init__(self, start: float = 1_700_000_000.0) -> None:
        self._now = start
        self._mono = 0.0
        self._changed = asyncio.Event()
        self._deadlines: list[float] = []  # one per coroutine parked in sleep
        self._parked = asyncio.Event()

    def now(self) -> float:
        return self._now

    def monotonic(self) -> float:
        return self._mono

    def advance(self, seconds: float) -> None:
        self._now += seconds
        self._mono += seconds
        self._changed.set()

    @property
    def sleepers(self) -> int:
        """How many coroutines are parked in ``sleep`` for a time not reached yet. A sleep
        that :meth:`advance` has ended no longer counts, even before it resumes."""
        return sum(deadline > self._mono for deadline in self._deadlines)

    async def sleeping(self, count: int = 1) -> None:
        """Return once at least ``count`` coroutines are :attr:`sleepers` (at once when
        they already are). Bound it with a timeout: nothing else ends the wait."""
        while self.sleepers < count:
            self._parked.clear()
            await self._parked.wait()

    async def sleep(self, seconds: float) -> None:
        deadline = self._mono + seconds
        if self._mono >= deadline:
            return
        self._deadlines.append(deadline)
        self._parked.set()
        try:
            while self._mono < deadline:
                self._changed.clear()
                await self._changed.wait()
        finally:
            self._deadlines.remove(deadline)
