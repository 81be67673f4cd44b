"""Backoff policies and a circuit breaker, kept apart from the operations they pace."""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Final, Literal

__all__ = [
    "BACKOFF_KINDS",
    "Backoff",
    "BackoffKind",
    "BreakerState",
    "CircuitBreaker",
    "output_backoff",
]

BackoffKind = Literal["exponential", "linear", "fixed", "random"]
BACKOFF_KINDS: Final[tuple[BackoffKind, ...]] = ("exponential", "linear", "fixed", "random")
BreakerState = Literal["closed", "open", "half_open"]


@dataclass(frozen=True, slots=True)
class Backoff:
    """Delay before retry ``attempt`` (1-based).

    exponential: initial * factor**(attempt-1), with equal jitter when ``jitter`` (a
    uniform delay between half the step and the step);
    linear: initial * attempt; fixed: initial; random: uniform(initial, maximum).
    Every delay is capped at ``maximum`` seconds.
    """

    kind: BackoffKind = "exponential"
    initial_s: float = 0.1
    maximum_s: float = 30.0
    factor: float = 2.0
    jitter: bool = True

    def delay(self, attempt: int, rng: random.Random | None = None) -> float:
        r = rng or random
        n = max(1, attempt)
        if self.kind == "fixed":
            d = self.initial_s
        elif self.kind == "linear":
            d = self.initial_s * n
        elif self.kind == "random":
            return r.uniform(self.initial_s, self.maximum_s)
        else:
            d = self.initial_s * self.factor ** min(n - 1, 64)
        d = min(d, self.maximum_s)
        if self.jitter and self.kind == "exponential":
            # "equal jitter": never less than half the step, so retries still spread out
            d = d / 2 + r.uniform(0, d / 2)
        return d


def output_backoff(
    kind: BackoffKind = "exponential", initial_s: float = 0.2, maximum_s: float = 30.0
) -> Backoff:
    """The default pacing of output retries (RETRY_BACKOFF / RETRY_INITIAL / RETRY_MAX)."""
    return Backoff(kind=kind, initial_s=initial_s, maximum_s=maximum_s)


class CircuitBreaker:
    """Consecutive-failure breaker for one dependency, on caller-supplied monotonic time.

    closed: calls go through. After ``failure_threshold`` consecutive failures it
    opens for ``cooldown_s``: callers wait (:meth:`wait_s`) instead of hammering the
    dependency. When the cool-down ends it is half-open: one probe call goes through;
    success closes it, failure opens it for another cool-down. Nothing here sleeps or
    reads a clock, so the caller's injected clock drives it.
    """

    __slots__ = ("_failures", "_opened_at", "cooldown_s", "failure_threshold", "opens")

    def __init__(self, failure_threshold: int = 5, cooldown_s: float = 15.0) -> None:
        if failure_threshold < 1 or cooldown_s < 0:
            raise ValueError("failure_threshold must be >= 1 and cooldown_s >= 0")
        self.failure_threshold = failure_threshold
        self.cooldown_s = cooldown_s
        self._failures = 0
        self._opened_at: float | None = None
        self.opens = 0  # how many times it opened, for metrics and tests

    @property
    def consecutive_failures(self) -> int:
        return self._failures

    def state(self, now: float) -> BreakerState:
        if self._opened_at is None:
            return "closed"
        return "open" if now - self._opened_at < self.cooldown_s else "half_open"

    def wait_s(self, now: float) -> float:
        """Seconds until a call may go through (0 when closed or half-open)."""
        if self._opened_at is None:
            return 0.0
        return max(0.0, self._opened_at + self.cooldown_s - now)

    def record_success(self) -> None:
        self._failures = 0
        self._opened_at = None

    def record_failure(self, now: float) -> None:
        self._failures += 1
        if self._opened_at is not None or self._failures >= self.failure_threshold:
            # a failed half-open probe (or the threshold reached) opens a new cool-down
            if self._opened_at is None or self.state(now) == "half_open":
                self.opens += 1
            self._opened_at = now
