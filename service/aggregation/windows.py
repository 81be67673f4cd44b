"""Window maths: pure functions of event timestamps (no clocks, no state)."""

from __future__ import annotations

import math

__all__ = ["closed_boundary", "window_start"]


def window_start(ts: float, interval: float) -> float:
    """Start of the tumbling window holding ``ts``, aligned to the Unix epoch."""
    return math.floor(ts / interval) * interval


def closed_boundary(watermark: float, interval: float) -> float:
    """Every window whose end is at or before this time is complete at ``watermark``.

    A window [s, s + interval) is emitted once the watermark reaches its end, so the
    boundary is the largest multiple of ``interval`` not after the watermark.
    """
    return math.floor(watermark / interval) * interval
