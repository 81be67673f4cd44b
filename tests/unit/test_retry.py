"""The retry loop and the stoppable sleep, on a manual clock (nothing really sleeps)."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest
from aiokafka.errors import KafkaTimeoutError

from service.core.clock import ManualClock
from service.core.errors import ServiceError, TransientError, describe_error, is_retriable
from service.core.retry import Backoff, retry, sleep_unless_stopped

FIXED = Backoff("fixed", initial_s=1.0, jitter=False)
LINEAR = Backoff("linear", initial_s=1.0, maximum_s=30.0, jitter=False)


class StepClock(ManualClock):
    """Records every sleep. With ``auto`` a sleep moves the clock and returns at once;
    without, it waits for :meth:`advance` (and :meth:`sleeping` sees it waiting)."""

    def __init__(self, *, auto: bool = True) -> None:
        super().__init__()
        self.auto = auto
        self.sleeps: list[float] = []

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        if self.auto:
            self.advance(seconds)
            return
        await super().sleep(seconds)


class Failing:
    """An operation that raises ``errors`` one per call, then returns ``result``."""

    def __init__(self, *errors: BaseException, result: str = "ok") -> None:
        self.pending = list(errors)
        self.result = result
        self.calls = 0

    async def __call__(self) -> str:
        self.calls += 1
        if self.pending:
            raise self.pending.pop(0)
        return self.result


async def test_retries_until_success_with_the_backoff_delays_and_logs_one_line_each(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="service.core.retry")
    clock = StepClock()
    op = Failing(TransientError("db down"), TransientError("db down"), TransientError("busy"))

    assert await retry(op, name="output pg", backoff=LINEAR, clock=clock) == "ok"

    assert clock.sleeps == [1.0, 2.0, 3.0]
    assert [r.getMessage() for r in caplog.records] == [
        "output pg failed (db down), attempt 1, next try in 1.0s",
        "output pg failed (db down), attempt 2, next try in 2.0s",
        "output pg failed (busy), attempt 3, next try in 3.0s",
        "output pg succeeded after 3 failed attempt(s)",
    ]
    assert {r.levelno for r in caplog.records[:3]} == {logging.WARNING}


async def test_a_first_success_neither_sleeps_nor_logs(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="service.core.retry")
    clock = StepClock()
    assert await retry(Failing(result="x"), name="op", backoff=FIXED, clock=clock) == "x"
    assert clock.sleeps == [] and caplog.records == []


async def test_an_error_that_is_not_retriable_propagates_at_once() -> None:
    clock = StepClock()
    seen: list[Any] = []
    op = Failing(TransientError("blip"), ValueError("corrupt"))

    with pytest.raises(ValueError, match="corrupt"):
        await retry(
            op,
            name="op",
            backoff=FIXED,
            clock=clock,
            on_failure=lambda exc, n: seen.append((str(exc), n)),
        )

    assert clock.sleeps == [1.0]  # after the transient failure only
    assert seen == [("blip", 1)]  # the non-retriable failure is not reported


async def test_cancellation_is_never_retried() -> None:
    clock = StepClock(auto=False)
    task = asyncio.create_task(
        retry(Failing(TransientError("down")), name="op", backoff=FIXED, clock=clock)
    )
    async with asyncio.timeout(5):
        await clock.sleeping()  # the first failure's wait has begun
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    assert clock.sleeps == [1.0]


async def test_a_bounded_retry_raises_the_last_failure_and_counts_down(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="service.core.retry")
    clock = StepClock()
    op = Failing(*(OSError(f"refused {n}") for n in range(1, 5)))

    with pytest.raises(OSError, match="refused 3"):
        await retry(op, name="connect", backoff=FIXED, clock=clock, retriable=OSError, attempts=3)

    assert op.calls == 3
    assert clock.sleeps == [1.0, 1.0]
    assert [r.getMessage() for r in caplog.records] == [
        "connect failed (OSError: refused 1), attempt 1, 2 retries remaining, next try in 1.0s",
        "connect failed (OSError: refused 2), attempt 2, 1 retries remaining, next try in 1.0s",
    ]


async def test_one_attempt_means_no_retry_and_fewer_is_refused() -> None:
    clock = StepClock()
    with pytest.raises(TransientError):
        await retry(Failing(TransientError("x")), name="op", backoff=FIXED, clock=clock, attempts=1)
    assert clock.sleeps == []
    with pytest.raises(ValueError, match="at least 1"):
        await retry(Failing(), name="op", backoff=FIXED, clock=clock, attempts=0)


async def test_retriable_may_be_types_or_a_predicate() -> None:
    clock = StepClock()
    op = Failing(KeyError("k"), IndexError("i"))
    assert (
        await retry(op, name="op", backoff=FIXED, clock=clock, retriable=(KeyError, IndexError))
        == "ok"
    )

    op = Failing(ConnectionError("reset"), ConnectionError("for good"))
    with pytest.raises(ConnectionError, match="for good"):
        await retry(
            op, name="op", backoff=FIXED, clock=clock, retriable=lambda exc: "reset" in str(exc)
        )


async def test_on_failure_sees_each_failure_and_its_floor_only_lengthens_the_wait() -> None:
    clock = StepClock()
    seen: list[tuple[str, int]] = []
    floors = iter([10.0, 0.5, None])

    def on_failure(exc: BaseException, attempt: int) -> float | None:
        seen.append((str(exc), attempt))
        return next(floors)

    op = Failing(TransientError("a"), TransientError("b"), TransientError("c"))
    await retry(op, name="op", backoff=FIXED, clock=clock, on_failure=on_failure)

    assert seen == [("a", 1), ("b", 2), ("c", 3)]
    assert clock.sleeps == [10.0, 1.0, 1.0]


async def test_on_failure_also_sees_the_last_failure_of_a_bounded_retry() -> None:
    seen: list[int] = []
    with pytest.raises(TransientError):
        await retry(
            Failing(TransientError("a"), TransientError("b")),
            name="op",
            backoff=FIXED,
            clock=StepClock(),
            attempts=2,
            on_failure=lambda exc, n: seen.append(n),
        )
    assert seen == [1, 2]


async def test_a_stop_ends_the_wait_and_raises_the_last_failure() -> None:
    clock = StepClock(auto=False)
    stop = asyncio.Event()
    task = asyncio.create_task(
        retry(Failing(TransientError("down")), name="op", backoff=FIXED, clock=clock, stop=stop)
    )
    async with asyncio.timeout(5):
        await clock.sleeping()
        stop.set()
        with pytest.raises(TransientError, match="down"):
            await task
    assert clock.monotonic() == 0.0  # the clock never had to move


async def test_a_failure_after_the_stop_is_raised_without_waiting() -> None:
    clock = StepClock()
    stop = asyncio.Event()
    stop.set()
    seen: list[int] = []
    with pytest.raises(TransientError):
        await retry(
            Failing(TransientError("down")),
            name="op",
            backoff=FIXED,
            clock=clock,
            stop=stop,
            on_failure=lambda exc, n: seen.append(n),
        )
    assert clock.sleeps == [] and seen == [1]


async def test_a_retried_error_that_says_it_is_not_retriable_is_logged_as_an_error(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="service.core.retry")
    op = Failing(ServiceError("HTTP 401: bad token"), TransientError("HTTP 503"))
    await retry(op, name="GET", backoff=FIXED, clock=StepClock(), retriable=ServiceError)
    assert [r.levelno for r in caplog.records] == [logging.ERROR, logging.WARNING]


async def test_a_retried_error_of_another_library_is_a_warning_whatever_its_own_flag(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """aiokafka flags a request timeout not retriable; the caller's classifier decided."""
    caplog.set_level(logging.WARNING, logger="service.core.retry")
    op = Failing(KafkaTimeoutError())
    await retry(op, name="poll", backoff=FIXED, clock=StepClock(), retriable=KafkaTimeoutError)
    assert [r.levelno for r in caplog.records] == [logging.WARNING]


async def test_sleep_unless_stopped_sleeps_the_whole_time_when_not_stopped() -> None:
    clock = StepClock(auto=False)
    stop = asyncio.Event()
    task = asyncio.create_task(sleep_unless_stopped(clock, 5.0, stop))
    async with asyncio.timeout(5):
        await clock.sleeping()
        clock.advance(5.0)
        assert await task is True
    assert clock.sleeps == [5.0]


async def test_sleep_unless_stopped_ends_when_stopped_or_at_once_when_already_stopped() -> None:
    clock = StepClock(auto=False)
    stop = asyncio.Event()
    task = asyncio.create_task(sleep_unless_stopped(clock, 5.0, stop))
    async with asyncio.timeout(5):
        await clock.sleeping()
        stop.set()
        assert await task is False
    assert await sleep_unless_stopped(clock, 5.0, stop) is False
    assert clock.sleeps == [5.0]  # the second call did not even start a sleep


async def test_sleep_unless_stopped_without_an_event_is_a_plain_sleep() -> None:
    clock = StepClock()
    assert await sleep_unless_stopped(clock, 2.5, None) is True
    assert clock.sleeps == [2.5]


def test_describe_error_names_the_type_unless_the_message_already_does() -> None:
    assert describe_error(TransientError("PostgreSQL unreachable")) == "PostgreSQL unreachable"
    assert describe_error(ConnectionRefusedError("refused")) == "ConnectionRefusedError: refused"
    assert describe_error(TimeoutError()) == "TimeoutError"
    assert describe_error(ValueError("ValueError: twice")) == "ValueError: twice"


def test_is_retriable_reads_what_the_error_says_of_itself() -> None:
    assert is_retriable(TransientError("x")) and not is_retriable(ServiceError("x"))
    assert not is_retriable(OSError("no attribute"))
