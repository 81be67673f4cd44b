"""Read-outs over recent samples that prometheus_client has no type for: a rate over
the last seconds (``events_per_second``) and nearest-rank quantiles over the latest
observations (the emit-to-durable p50/p95/p99 of ``/status`` and the bus)."""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Sequence

__all__ = ["RateMeter", "Reservoir"]


class RateMeter:
    """Events per second over the last ``window_s`` of monotonic time.

    Young meters divide by their age (at least one second) rather than the full
    window, so the first reading is not understated tenfold.
    """

    __slots__ = ("_in_window", "_samples", "_started", "window_s")

    def __init__(self, started: float, window_s: float) -> None:
        self.window_s = window_s
        self._started = started
        self._samples: deque[tuple[float, int]] = deque()
        self._in_window = 0

    def add(self, n: int, now: float) -> None:
        self._samples.append((now, n))
        self._in_window += n
        self._expire(now)

    def rate(self, now: float) -> float:
        self._expire(now)
        span = min(self.window_s, max(now - self._started, 1.0))
        return self._in_window / span

    def _expire(self, now: float) -> None:
        horizon = now - self.window_s
        while self._samples and self._samples[0][0] <= horizon:
            self._in_window -= self._samples.popleft()[1]


class Reservoir:
    """The latest ``size`` observations, for nearest-rank quantiles."""

    __slots__ = ("_samples",)

    def __init__(self, size: int) -> None:
        self._samples: deque[float] = deque(maxlen=size)

    def add(self, value: float) -> None:
        self._samples.append(value)

    def quantiles(self, qs: Sequence[float]) -> list[float | None]:
        """``None`` for each while there are no samples."""
        if not self._samples:
            return [None] * len(qs)
        ordered = sorted(self._samples)
        last = len(ordered) - 1
        return [ordered[min(last, max(0, math.ceil(q * len(ordered)) - 1))] for q in qs]
