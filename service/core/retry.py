"""Retrying: the backoff policies, a circuit breaker and the one loop that applies them.

A retry loop is a call of :func:`retry`: it waits on the injected clock, can be cut
short by a stop event, and logs every retry in one form,
``<name> failed (<error>), attempt N[, M retries remaining], next try in X.Xs``.

Who retries what: each backend has one classifier, and each class one policy, applied
by one loop (a loop never runs inside another that retries the same failure); the table
is in docs/delivery.md, "Who retries what".
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Final, Literal, TypeVar

from service.core.clock import Clock
from service.core.errors import ServiceError, TransientError, describe_error

__all__ = [
    "BACKOFF_KINDS",
    "Backoff",
    "BackoffKind",
    "BreakerState",
    "CircuitBreaker",
    "Retriable",
    "output_backoff",
    "retry",
    "sleep_unless_stopped",
]

log = logging.getLogger(__name__)

T = TypeVar("T")

Retriable = type[BaseException] | tuple[type[BaseException], ...] | Callable[[BaseException], bool]
"""What :func:`retry` tries again: exception types, or a predicate on the exception."""

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


async def sleep_unless_stopped(clock: Clock, seconds: float, stop: asyncio.Event | None) -> bool:
    """Sleep ``seconds`` on ``clock``, ending early once ``stop`` is set, so that a wait
    never holds up a shutdown. True when the whole time passed, False when stopped."""
    if stop is None:
        await clock.sleep(seconds)
        return True
    if stop.is_set():
        return False
    sleeper = asyncio.ensure_future(clock.sleep(seconds))
    stopper = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait({sleeper, stopper}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        sleeper.cancel()
        stopper.cancel()
    return not stop.is_set()


async def retry(
    operation: Callable[[], Awaitable[T]],
    *,
    name: str,
    backoff: Backoff,
    clock: Clock,
    retriable: Retriable = TransientError,
    attempts: int | None = None,
    on_failure: Callable[[BaseException, int], float | None] | None = None,
    stop: asyncio.Event | None = None,
) -> T:
    """Await ``operation()`` until it succeeds, and return its result.

    A failure that ``retriable`` accepts is tried again after ``backoff.delay(attempt)``
    seconds on ``clock``; any other exception propagates at once. With ``attempts`` the
    failure of the last attempt is raised; without, it retries for ever.
    ``on_failure(error, attempt)`` sees every retriable failure (metrics, a circuit
    breaker) and may return a minimum for the next wait (the breaker's cool-down).
    When ``stop`` is set the wait ends early and the last failure is raised.

    A failure of the service's error tree that says it is not retriable (``retriable =
    False``), but that the caller retries anyway, is logged as an error, the others as
    warnings. Other libraries' flags are not read here: their errors are judged by the
    caller's classifier (aiokafka calls a request timeout not retriable, for instance,
    which ``service.kafka.errors`` retries as transient).
    """
    if attempts is not None and attempts < 1:
        raise ValueError("attempts must be at least 1")
    accepts = _accepts(retriable)
    attempt = 0
    while True:
        attempt += 1
        try:
            result = await operation()
        except Exception as exc:
            if not accepts(exc):
                raise
            floor = on_failure(exc, attempt) if on_failure is not None else None
            remaining = None if attempts is None else attempts - attempt
            if remaining == 0 or (stop is not None and stop.is_set()):
                raise
            delay = backoff.delay(attempt)
            if floor is not None:
                delay = max(delay, floor)
            _log_retry(name, exc, attempt, remaining, delay)
            if not await sleep_unless_stopped(clock, delay, stop):
                raise
            continue
        if attempt > 1:
            log.info("%s succeeded after %d failed attempt(s)", name, attempt - 1)
        return result


def _log_retry(
    name: str, exc: BaseException, attempt: int, remaining: int | None, delay: float
) -> None:
    """Log one retry in the form the module docstring gives, at the level retry() states."""
    log.log(
        logging.ERROR if isinstance(exc, ServiceError) and not exc.retriable else logging.WARNING,
        "%s failed (%s), attempt %d%s, next try in %.1fs",
        name,
        describe_error(exc),
        attempt,
        "" if remaining is None else f", {remaining} retries remaining",
        delay,
    )


def _accepts(retriable: Retriable) -> Callable[[BaseException], bool]:
    if isinstance(retriable, type | tuple):
        types = retriable
        return lambda exc: isinstance(exc, types)
    return retriable
