"""EventHub: in-process publish/subscribe where every subscriber owns its queue and task.

A subscriber's failure, slowness or restart stays its own. ``publish`` waits for room
in each subscriber's queue, so a slow stage slows the publisher (backpressure) and
nothing is ever dropped. A handler that raises is handed its unfinished items again,
with backoff, until it succeeds.

The handler contract. The subscriber task drains up to ``max_batch`` queued items at
once and calls the handler once per drained batch with a :class:`Delivery`:

* ``items``: what to handle, in publish order; ``attempt``: 1 on the first call for
  a batch, n on its n-th (so a handler can tell a re-delivery without guessing).
* ``done``: starts at 0; the handler advances it past each item whose effect must not
  be repeated (a batch aggregated, a checkpoint made durable). Returning normally
  means every item is done: ``done`` only matters when the handler raises.
* When the handler raises, the items before ``done`` count as processed and only
  ``items[done:]`` are delivered again, in a new :class:`Delivery` (``done`` 0,
  ``attempt`` + 1); nothing is re-delivered when every item was done.

So a handler keeps no memory of earlier calls to avoid repeating work: what it is
handed is exactly what is left. The cost is one small object per batch, never per item.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from service.core.clock import Clock
from service.core.retry import Backoff
from service.metrics.collector import MetricsCollector

__all__ = ["Delivery", "EventHub", "Handler", "SubscriberStats"]

log = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass(slots=True)
class Delivery(Generic[T]):
    """One handler call: the items left of a drained batch, and the handler's progress
    through them. See the module docstring for the contract."""

    items: Sequence[T]
    attempt: int = 1
    done: int = 0
    """How many of ``items``, from the front, the handler has finished."""


Handler = Callable[[Delivery[Any]], Awaitable[None]]


@dataclass(slots=True)
class SubscriberStats:
    """Per-subscriber counters for ``/status``. ``errors`` counts handler failures, each
    followed by a re-delivery unless nothing was left."""

    processed: int = 0  # items done
    errors: int = 0
    dropped: int = 0  # always 0 (the hub never drops); kept for /status's format
    depth: int = 0  # items waiting in its queue (updated by EventHub.stats)


class _Subscriber:
    def __init__(
        self,
        name: str,
        topic: str,
        handler: Handler,
        *,
        maxsize: int,
        max_batch: int,
    ) -> None:
        self.name = name
        self.topic = topic
        self.handler = handler
        self.queue: asyncio.Queue[Any] = asyncio.Queue(maxsize)
        self.max_batch = max_batch
        self.stats = SubscriberStats()
        self.task: asyncio.Task[None] | None = None


class EventHub:
    """Routes items by topic to subscribers; see the module docstring for the guarantees."""

    def __init__(
        self,
        metrics: MetricsCollector,
        clock: Clock,
        restart_backoff: Backoff | None = None,
    ) -> None:
        self._metrics = metrics
        metrics.set_queue_view(self._depths)
        self._clock = clock
        self._backoff = restart_backoff or Backoff(initial_s=0.1, maximum_s=30.0)
        self._subs: dict[str, _Subscriber] = {}
        self._started = False

    def subscribe(
        self,
        topic: str,
        name: str,
        handler: Handler,
        *,
        maxsize: int = 64,
        max_batch: int = 64,
    ) -> None:
        """Add a subscriber to ``topic``. May be called while the hub runs."""
        if name in self._subs:
            raise ValueError(f"subscriber {name!r} already exists")
        if maxsize < 1 or max_batch < 1:
            raise ValueError("maxsize and max_batch must be at least 1")
        sub = _Subscriber(name, topic, handler, maxsize=maxsize, max_batch=max_batch)
        self._subs[name] = sub
        if self._started:
            self._spawn(sub)

    async def publish(self, topic: str, item: Any) -> None:
        for sub in list(self._subs.values()):
            if sub.topic == topic:
                await sub.queue.put(item)

    async def start(self) -> None:
        if self._started:
            return
        self._started = True
        for sub in self._subs.values():
            self._spawn(sub)

    async def drain(self) -> None:
        """Wait until every queue is empty and every handler idle, in subscription order,
        so that a stage's outputs reach the next stage before that one is waited for."""
        for sub in list(self._subs.values()):
            await sub.queue.join()

    async def stop(self) -> None:
        """Cancel every subscriber task; undelivered items are discarded (drain first)."""
        self._started = False
        for sub in list(self._subs.values()):
            await self._cancel(sub)

    def _depths(self) -> dict[str, int]:
        return {name: sub.queue.qsize() for name, sub in self._subs.items()}

    def stats(self) -> dict[str, SubscriberStats]:
        for sub in self._subs.values():
            sub.stats.depth = sub.queue.qsize()
        return {name: sub.stats for name, sub in self._subs.items()}

    def _spawn(self, sub: _Subscriber) -> None:
        sub.task = asyncio.create_task(self._serve(sub), name=f"hub:{sub.name}")

    async def _cancel(self, sub: _Subscriber) -> None:
        if sub.task is None:
            return
        sub.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await sub.task
        sub.task = None

    async def _serve(self, sub: _Subscriber) -> None:
        while True:
            batch = [await sub.queue.get()]
            while len(batch) < sub.max_batch:
                try:
                    batch.append(sub.queue.get_nowait())
                except asyncio.QueueEmpty:
                    break
            self._metrics.set_queue_depth(sub.name, sub.queue.qsize())
            try:
                await self._deliver(sub, batch)
            finally:
                for _ in batch:
                    sub.queue.task_done()

    async def _deliver(self, sub: _Subscriber, batch: list[Any]) -> None:
        delivery: Delivery[Any] = Delivery(batch)
        while True:
            try:
                await sub.handler(delivery)
            except asyncio.CancelledError:
                raise
            except Exception:
                items = delivery.items
                done = min(max(delivery.done, 0), len(items))  # clamp a miscount
                sub.stats.processed += done
                sub.stats.errors += 1
                self._metrics.on_subscriber_crash(sub.name)
                left = len(items) - done
                if left == 0:
                    log.exception(
                        "subscriber %s failed after finishing its %d item(s); nothing to retry",
                        sub.name,
                        done,
                    )
                    return
                delay = self._backoff.delay(delivery.attempt)
                log.exception(
                    "subscriber %s failed (attempt %d, %d of %d item(s) left); restarting in %.1fs",
                    sub.name,
                    delivery.attempt,
                    left,
                    len(items),
                    delay,
                )
                await self._clock.sleep(delay)
                delivery = Delivery(items[done:] if done else items, delivery.attempt + 1)
            else:
                sub.stats.processed += len(delivery.items)
                return
