"""EventHub: isolated subscribers, backpressure, crash restarts."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from service.core.clock import ManualClock
from service.core.retry import Backoff
from service.metrics.collector import MetricsCollector
from service.pipeline.hub import Delivery, EventHub


def make_hub() -> tuple[EventHub, ManualClock]:
    clock = ManualClock()
    return EventHub(MetricsCollector(clock), clock, Backoff("fixed", 1.0, 1.0)), clock


async def wait_for(cond: Any) -> None:
    async with asyncio.timeout(5):
        while not cond():
            await asyncio.sleep(0)


async def sit_out_restarts(clock: ManualClock, n: int) -> None:
    """Let ``n`` restart backoffs (1 s each) pass: each time the hub is parked in one on
    the clock, move the clock on by its length."""
    async with asyncio.timeout(5):
        for _ in range(n):
            await clock.sleeping()
            clock.advance(1.0)


async def test_items_reach_every_subscriber_of_the_topic_in_order() -> None:
    hub, _ = make_hub()
    got: dict[str, list[int]] = {"a": [], "b": [], "other": []}

    def collect(key: str) -> Any:
        async def handle(d: Delivery[int]) -> None:
            got[key].extend(d.items)

        return handle

    hub.subscribe("t", "a", collect("a"))
    hub.subscribe("t", "b", collect("b"))
    hub.subscribe("u", "other", collect("other"))
    await hub.start()
    for i in range(10):
        await hub.publish("t", i)
    await hub.drain()
    await hub.stop()
    assert got == {"a": list(range(10)), "b": list(range(10)), "other": []}


async def test_crashing_subscriber_is_retried_while_others_go_on() -> None:
    hub, clock = make_hub()
    healthy: list[int] = []
    flaky: list[int] = []
    failures = 2

    async def ok(d: Delivery[int]) -> None:
        healthy.extend(d.items)

    async def fails_twice(d: Delivery[int]) -> None:
        nonlocal failures
        if failures:
            failures -= 1
            raise RuntimeError("boom")
        flaky.extend(d.items)

    hub.subscribe("t", "healthy", ok)
    hub.subscribe("t", "flaky", fails_twice)
    await hub.start()
    await hub.publish("t", 1)
    await wait_for(lambda: healthy == [1])
    await sit_out_restarts(clock, 2)
    await wait_for(lambda: flaky == [1])
    stats = hub.stats()
    assert (stats["flaky"].errors, stats["flaky"].processed) == (2, 1)
    assert stats["healthy"].errors == 0
    await hub.stop()


async def test_a_failed_delivery_hands_back_only_the_items_not_done() -> None:
    hub, clock = make_hub()
    calls: list[tuple[int, list[int]]] = []
    finished: list[int] = []

    async def crashes_on_2_once(d: Delivery[int]) -> None:
        calls.append((d.attempt, list(d.items)))
        for item in d.items:
            if item == 2 and d.attempt == 1:
                raise RuntimeError("boom")
            finished.append(item)
            d.done += 1

    hub.subscribe("t", "stage", crashes_on_2_once, max_batch=8)
    for i in range(5):  # queued before the start: drained as one batch
        await hub.publish("t", i)
    await hub.start()
    await sit_out_restarts(clock, 1)
    await wait_for(lambda: len(finished) == 5)
    assert finished == [0, 1, 2, 3, 4]  # 0 and 1 were not handed over again
    assert calls == [(1, [0, 1, 2, 3, 4]), (2, [2, 3, 4])]
    stats = hub.stats()["stage"]
    assert (stats.processed, stats.errors, stats.dropped) == (5, 1, 0)
    await hub.stop()


async def test_nothing_is_delivered_again_when_every_item_was_done() -> None:
    hub, _ = make_hub()
    calls: list[list[int]] = []

    async def raises_after_finishing(d: Delivery[int]) -> None:
        calls.append(list(d.items))
        d.done = len(d.items)
        if 0 in d.items:
            raise RuntimeError("boom after the work")

    hub.subscribe("t", "x", raises_after_finishing, max_batch=1)
    await hub.start()
    await hub.publish("t", 0)
    await hub.publish("t", 1)
    await hub.drain()  # no backoff sleep: the clock is never advanced
    assert calls == [[0], [1]]
    stats = hub.stats()["x"]
    assert (stats.processed, stats.errors) == (2, 1)
    await hub.stop()


async def test_a_miscounted_progress_is_clamped_to_the_delivery() -> None:
    hub, clock = make_hub()
    calls: list[list[int]] = []

    async def miscounts(d: Delivery[int]) -> None:
        calls.append(list(d.items))
        if len(calls) == 1:
            d.done = -1
            raise RuntimeError("boom")

    hub.subscribe("t", "x", miscounts)
    await hub.publish("t", 0)
    await hub.publish("t", 1)
    await hub.start()
    await sit_out_restarts(clock, 1)
    await wait_for(lambda: len(calls) == 2)
    await hub.drain()
    assert calls == [[0, 1], [0, 1]]  # a negative count: nothing was done
    assert hub.stats()["x"].processed == 2
    await hub.stop()


async def test_a_full_queue_makes_the_publisher_wait() -> None:
    hub, _ = make_hub()
    gate = asyncio.Event()
    seen: list[int] = []

    async def slow(d: Delivery[int]) -> None:
        await gate.wait()
        seen.extend(d.items)

    hub.subscribe("t", "slow", slow, maxsize=2, max_batch=1)
    await hub.start()
    await hub.publish("t", 0)  # taken by the task
    await wait_for(lambda: hub.stats()["slow"].depth == 0)
    await hub.publish("t", 1)
    await hub.publish("t", 2)
    blocked = asyncio.create_task(hub.publish("t", 3))
    # One yield runs the new task up to its first suspension: publish reaches the queue
    # without awaiting anything else, so it is either done now or waiting for room.
    await asyncio.sleep(0)
    assert not blocked.done()
    gate.set()
    await asyncio.wait_for(blocked, 5)
    await hub.drain()
    assert seen == [0, 1, 2, 3]
    await hub.stop()


async def test_subscriber_added_at_run_time_starts_receiving() -> None:
    hub, _ = make_hub()
    await hub.start()
    got: list[int] = []

    async def handle(d: Delivery[int]) -> None:
        got.extend(d.items)

    hub.subscribe("t", "late", handle)
    await hub.publish("t", 5)
    await hub.drain()
    assert got == [5]
    await hub.stop()


def test_duplicate_subscriber_name_is_refused() -> None:
    hub, _ = make_hub()

    async def h(d: Delivery[int]) -> None: ...

    hub.subscribe("t", "x", h)
    with pytest.raises(ValueError, match="already exists"):
        hub.subscribe("t", "x", h)
