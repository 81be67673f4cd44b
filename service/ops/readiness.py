"""One readiness answer shared by every probe that asks within a short time.

A probe flood (many kubelets, a load balancer per zone, a script in a loop) must not turn
into a flood of checks: each /readyz check may take a pooled PostgreSQL connection, and
enough of them at once would starve the outputs of the pool they write through. So
concurrent probes wait for the one check in flight, and its answer is reused for
``ttl_s`` after it arrived.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from typing import Final, Generic, TypeVar

__all__ = ["READINESS_CACHE_S", "SharedAnswer"]

T = TypeVar("T")

READINESS_CACHE_S: Final = 1.0
"""How long a readiness answer is reused, seconds."""


class SharedAnswer(Generic[T]):
    """``await get()`` returns ``compute()``'s latest result while it is younger than
    ``ttl_s`` on ``monotonic``; otherwise it starts one ``compute()``, which every
    caller until it ends waits for. ``compute`` must not raise (it reports failures in
    its result): its task is shared, so one caller's error would be everyone's.

    A caller that gives up (a probe that disconnects) does not cancel the shared
    computation; :meth:`close` does, when the server stops.
    """

    def __init__(
        self,
        compute: Callable[[], Awaitable[T]],
        monotonic: Callable[[], float],
        ttl_s: float = READINESS_CACHE_S,
    ) -> None:
        self._compute = compute
        self._monotonic = monotonic
        self._ttl_s = ttl_s
        self._last: tuple[float, T] | None = None
        self._running: asyncio.Task[T] | None = None

    async def get(self) -> T:
        last = self._last
        if last is not None and self._monotonic() - last[0] < self._ttl_s:
            return last[1]
        if self._running is None:
            self._running = asyncio.create_task(self._refresh(), name="readiness-check")
        return await asyncio.shield(self._running)

    async def _refresh(self) -> T:
        try:
            value = await self._compute()
            self._last = (self._monotonic(), value)
            return value
        finally:
            self._running = None

    async def close(self) -> None:
        running, self._running = self._running, None
        if running is not None:
            running.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await running
