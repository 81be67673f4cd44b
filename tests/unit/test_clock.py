"""ManualClock: sleeps end only when the test advances the clock, and the test can wait
until something is parked in a sleep before it does."""

from __future__ import annotations

import asyncio

from service.core.clock import ManualClock


async def test_a_sleep_ends_once_the_clock_has_been_advanced_far_enough() -> None:
    clock = ManualClock(100.0)
    task = asyncio.create_task(clock.sleep(3.0))
    async with asyncio.timeout(5):
        await clock.sleeping()
        clock.advance(2.0)
        await clock.sleeping()  # still parked: 1 s to go
        assert not task.done()
        clock.advance(1.0)
        await task
    assert (clock.now(), clock.monotonic()) == (103.0, 3.0)


async def test_sleeping_waits_for_the_count_and_a_sleep_ended_by_advance_leaves_at_once() -> None:
    clock = ManualClock()
    short = asyncio.create_task(clock.sleep(1.0))
    long = asyncio.create_task(clock.sleep(5.0))
    async with asyncio.timeout(5):
        await clock.sleeping(2)
        assert clock.sleepers == 2
        clock.advance(1.0)
        assert clock.sleepers == 1  # before ``short`` has even resumed
        await short

        async def sleepers_when_two() -> int:
            await clock.sleeping(2)
            return clock.sleepers

        waiter = asyncio.create_task(sleepers_when_two())  # runs before ``third`` parks
        third = asyncio.create_task(clock.sleep(1.0))
        assert await waiter == 2
        clock.advance(4.0)
        await asyncio.gather(long, third)
    assert clock.sleepers == 0


async def test_neither_a_zero_sleep_nor_a_cancelled_one_counts_as_a_sleeper() -> None:
    clock = ManualClock()
    await clock.sleep(0)
    assert clock.sleepers == 0
    task = asyncio.create_task(clock.sleep(1.0))
    async with asyncio.timeout(5):
        await clock.sleeping()
        task.cancel()
        await asyncio.wait({task})
    assert task.cancelled() and clock.sleepers == 0
