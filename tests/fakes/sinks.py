"""MemorySink: an in-memory :class:`~service.sinks.base.Sink` for unit tests.

It keeps what a real sink would store (one aggregate per key, the last one winning, and
every dead letter), records every write call, can be told to fail the next N writes,
and can be paused to simulate a slow output.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence

from service.core.errors import TransientError
from service.core.events import Aggregate, DeadLetter
from service.core.lifecycle import AsyncResource

__all__ = ["AggregateKey", "MemorySink"]

AggregateKey = tuple[str, str, float, float]  # name, agg_func, window_start, window_end


class MemorySink(AsyncResource):
    def __init__(self, name: str = "memory") -> None:
        self.name = name
        self.aggregates: dict[AggregateKey, Aggregate] = {}
        self.dead_letters: list[DeadLetter] = []
        self.writes: list[tuple[list[Aggregate], list[DeadLetter]]] = []
        """Every successful write, in order, as given."""
        self.failed_writes = 0
        self.writes_started = 0  # write() calls entered, held by pause() or not
        self.reachable = True
        """What :meth:`check` reports; tests flip it to simulate an outage."""
        self.started = False
        self._failures_left = 0
        self._failure: Exception = TransientError("memory sink told to fail")
        self._open = asyncio.Event()
        self._open.set()
        self._changed = asyncio.Condition()

    async def start(self) -> None:
        self.started = True

    async def stop(self) -> None:
        self.started = False

    def fail_next(self, n: int, exc: Exception | None = None) -> None:
        """The next ``n`` writes raise ``exc`` (default: a TransientError) and store nothing."""
        self._failures_left = n
        if exc is not None:
            self._failure = exc

    def pause(self) -> None:
        """Make writes wait (as a slow output would) until :meth:`resume`."""
        self._open.clear()

    def resume(self) -> None:
        self._open.set()

    async def write(
        self, aggregates: Sequence[Aggregate], dead_letters: Sequence[DeadLetter]
    ) -> None:
        if not self.started:
            raise RuntimeError(f"MemorySink {self.name!r} is not started")
        self.writes_started += 1
        async with self._changed:
            self._changed.notify_all()
        await self._open.wait()
        if self._failures_left > 0:
            self._failures_left -= 1
            self.failed_writes += 1
            raise self._failure
        for a in aggregates:
            self.aggregates[(a.name, a.agg_func, a.window_start, a.window_end)] = a
        self.dead_letters.extend(dead_letters)
        self.writes.append((list(aggregates), list(dead_letters)))
        async with self._changed:
            self._changed.notify_all()

    async def check(self) -> None:
        if not self.reachable:
            raise TransientError(f"memory sink {self.name!r} is marked unreachable")

    async def wait_until(
        self, predicate: Callable[[MemorySink], bool], timeout_s: float = 5.0
    ) -> None:
        """Wait until ``predicate(self)`` holds; ``TimeoutError`` after ``timeout_s``."""
        async with asyncio.timeout(timeout_s), self._changed:
            await self._changed.wait_for(lambda: predicate(self))
