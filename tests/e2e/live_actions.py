"""What runs alongside a live feed (``LiveRun.stream(during=...)``): the disruptions the
live tests share, each waiting for its moment by the share of the stream sent."""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from typing import Any

from tests.e2e.live import Action, LiveRun
from tests.fault.harness import wait_for

__all__ = ["FAST_TAKEOVER", "join_at", "kill_and_replace_at", "kill_second_at", "progress"]

# a killed instance's partitions move after this session timeout, not the default 45 s
FAST_TAKEOVER = {"VABUS_KAFKA_SESSION_TIMEOUT_MS": "3000"}


def progress(run: LiveRun, fraction: float) -> Callable[[], Coroutine[Any, Any, bool]]:
    async def reached() -> bool:
        return run.feed.progress >= fraction

    return reached


async def _sent(run: LiveRun, fraction: float) -> None:
    """Until ``fraction`` of the stream is sent (the feed runs at its own pace: a long
    stream gets its time, and a minute more)."""
    timeout = fraction * run.workload.duration + 60
    await wait_for(progress(run, fraction), timeout, f"{fraction:.0%} of the stream sent")


async def _kill(run: LiveRun, index: int, at: float, *, replace: bool) -> None:
    await _sent(run, at)
    run.kill9(index)
    if replace:
        run.start_instance()

    async def one_holds_all() -> bool:
        return await run.assigned() == [run.workload.partitions]

    await wait_for(one_holds_all, 60, "the remaining instance holding every partition")


def kill_and_replace_at(*fractions: float) -> Action:
    """At each share of the stream, ``kill -9`` the newest instance and start another,
    which must take every partition over (from the checkpoints)."""

    async def cycles(run: LiveRun) -> None:
        for at in fractions:
            await _kill(run, len(run.instances) - 1, at, replace=True)

    return cycles


def kill_second_at(fraction: float) -> Action:
    """``kill -9`` instance 1 of two; instance 0 must take every partition over."""

    async def kill_one(run: LiveRun) -> None:
        await _kill(run, 1, fraction, replace=False)

    return kill_one


def join_at(fraction: float) -> Action:
    """A second instance joins: half of the partitions move to it (a hand-off)."""

    async def join(run: LiveRun) -> None:
        await _sent(run, fraction)
        run.feed.disrupt()  # windows written just before may not be checkpointed yet
        run.start_instance()
        half = run.workload.partitions // 2

        async def split() -> bool:
            return sorted(await run.assigned()) == [half, half]

        await wait_for(split, 60, "the partitions split over both instances")

    return join
