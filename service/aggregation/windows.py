"""The window rules: pure functions of event times (no clocks, no state, no I/O).

Tumbling windows ``[start, start + interval)`` aligned to the Unix epoch. A window is
*emitted* once the watermark (an event time minus the grace) reaches its end; an event
whose window ends at or before a partition's emitted boundary is *late*. An event more
than the watermark lead ahead of the service clock is *ahead*: it joins its window but
moves no event time. The aggregator's hot loop caches the results of these rules (the
window of the previous event, the next index at which the boundary can move) and falls
back to them whenever a cache does not answer; its reference step calls them for every
event, and ``tests/unit/test_window_paths.py`` checks that both give the same outputs.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

__all__ = [
    "close_index",
    "closed_boundary",
    "emitted_by",
    "event_time_limit",
    "is_ahead",
    "is_correctable",
    "is_expired",
    "is_idle",
    "is_late",
    "quiet_close",
    "window_index",
    "window_start",
]


def window_index(ts: float, interval: float) -> int:
    """Number of the window holding ``ts``: ``window_index * interval`` is its start."""
    return math.floor(ts / interval)


def window_start(ts: float, interval: float) -> float:
    """Start of the tumbling window holding ``ts``, aligned to the Unix epoch."""
    return math.floor(ts / interval) * interval


def closed_boundary(watermark: float, interval: float) -> float:
    """Every window whose end is at or before this time is complete at ``watermark``.

    A window [s, s + interval) is emitted once the watermark reaches its end, so the
    boundary is the largest multiple of ``interval`` not after the watermark.
    """
    return math.floor(watermark / interval) * interval


def event_time_limit(event_time: float, cap: float) -> float:
    """The event time a partition may close windows with: its own, but never past what
    the other partitions holding the watermark allow (``cap``)."""
    return event_time if event_time < cap else cap


def close_index(event_time: float, grace: float, interval: float) -> int:
    """``closed_boundary(event_time - grace) / interval`` as a window number: the
    boundary cannot move again before the event time reaches window ``index + 1``'s."""
    return math.floor((event_time - grace) / interval)


def is_late(start: float, interval: float, closed_until: float, ahead_closed: set[float]) -> bool:
    """Whether the window starting at ``start`` was already emitted for its partition:
    it ends at or before the emitted boundary, or the quiet rule emitted it above the
    partition's event time (``ahead_closed``, see :func:`quiet_close`)."""
    return start + interval <= closed_until or (bool(ahead_closed) and start in ahead_closed)


def is_correctable(
    start: float, interval: float, watermark: float, lateness: float, kept_from: float
) -> bool:
    """Whether an emitted window still takes a late event as a correction (contract
    §12.4): its partition's watermark (its own event time minus the grace, at that event)
    has not reached its end plus the allowed lateness, and it was emitted while emitted
    windows were kept (it starts at or after ``kept_from``)."""
    end = start + interval
    return start >= kept_from and watermark < end + lateness


def is_expired(start: float, interval: float, watermark: float, lateness: float) -> bool:
    """Whether a kept window can no longer be corrected (the negation of
    :func:`is_correctable`'s time rule): it is freed."""
    return watermark >= start + interval + lateness


def is_ahead(ts: float, lead_cap: float) -> bool:
    """Whether an event is too far ahead of the service clock (``lead_cap`` = clock +
    the watermark lead) to move its partition's event time."""
    return ts > lead_cap


def is_idle(
    caught_up: bool, reported_at: float, last_message_at: float, idle_timeout_s: float
) -> bool:
    """A partition is silent when the bus found nothing unread and its last message came
    at least ``idle_timeout_s`` before that report (both bus times)."""
    return caught_up and reported_at - last_message_at >= idle_timeout_s


def emitted_by(starts: Iterable[float], boundary: float, interval: float) -> list[float]:
    """The window starts among ``starts`` whose windows end at or before ``boundary``."""
    return [s for s in starts if s + interval <= boundary]


def quiet_close(
    starts: Iterable[float], event_time: float | None, closed_until: float, interval: float
) -> tuple[float, list[float]]:
    """The quiet rule for a silent partition emitting the windows ``starts``: the new
    emitted boundary, which moves past the windows at or below its event time only, and
    the starts above it (windows of ahead events) to remember one by one, so that
    on-time events below them stay on time."""
    held = -math.inf if event_time is None else event_time
    in_step = [s for s in starts if s <= held]
    above = [s for s in starts if s > held]
    if in_step:
        closed_until = max(closed_until, max(in_step) + interval)
    return closed_until, above
