"""DataSender: writes outputs to every sink, then makes checkpoints durable and commits.

Every configured output is *required*: a checkpoint (and so the source commit) happens
only after all outputs before it are durable in every sink. A sink that fails
transiently is retried with backoff, on its own, while the others go on; the hub's
bounded queues turn the wait into backpressure up to the bus.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any

from service.aggregation.aggregator import Outputs
from service.checkpoint import CheckpointStore
from service.clock import Clock
from service.errors import TransientError
from service.events import Aggregate, DeadLetter
from service.flow import Checkpoint
from service.metrics import MetricsCollector
from service.retry import Backoff
from service.sinks.base import Sink

__all__ = ["DataSender"]

log = logging.getLogger(__name__)

Commit = Callable[[Mapping[str, str]], Awaitable[None]]


class DataSender:
    def __init__(
        self,
        sinks: Sequence[Sink],
        store: CheckpointStore,
        commit: Commit,
        metrics: MetricsCollector,
        clock: Clock,
        *,
        batch_size: int = 5000,
        backoff: Backoff | None = None,
    ) -> None:
        self._sinks = list(sinks)
        self._store = store
        self._commit = commit
        self._metrics = metrics
        self._clock = clock
        self._batch_size = batch_size
        self._backoff = backoff or Backoff(initial_s=0.2, maximum_s=30.0)
        self.degraded: dict[str, str] = {}  # sink -> last error, while it is failing

    async def handle(self, items: list[Any]) -> None:
        """Hub handler: consecutive outputs are written together; a checkpoint first
        flushes what came before it."""
        aggregates: list[Aggregate] = []
        dead_letters: list[DeadLetter] = []
        for item in items:
            if type(item) is Outputs:
                aggregates.extend(item.aggregates)
                dead_letters.extend(item.dead_letters)
            elif type(item) is Checkpoint:
                await self.write(aggregates, dead_letters)
                aggregates, dead_letters = [], []
                await self._checkpoint(item)
            else:
                raise TypeError(f"unexpected output item {type(item).__name__}")
        await self.write(aggregates, dead_letters)

    async def write(self, aggregates: list[Aggregate], dead_letters: list[DeadLetter]) -> None:
        step = self._batch_size
        for i in range(0, max(len(aggregates), len(dead_letters)), step):
            chunk_a, chunk_d = aggregates[i : i + step], dead_letters[i : i + step]
            await asyncio.gather(*(self._write_one(s, chunk_a, chunk_d) for s in self._sinks))
            if chunk_a:
                self._metrics.on_aggregates_durable([a.emitted_at for a in chunk_a])

    # Sinks report their own write/error metrics: only they know how many rows they
    # stored and how many they had to dead-letter.
    async def _write_one(
        self, sink: Sink, aggregates: list[Aggregate], dead_letters: list[DeadLetter]
    ) -> None:
        attempt = 0
        while True:
            try:
                await sink.write(aggregates, dead_letters)
            except TransientError as exc:
                attempt += 1
                self.degraded[sink.name] = str(exc)
                delay = self._backoff.delay(attempt)
                log.warning(
                    "output %s failed (attempt %d, retrying in %.1fs): %s",
                    sink.name, attempt, delay, exc,
                )  # fmt: skip
                await self._clock.sleep(delay)
                continue
            if self.degraded.pop(sink.name, None) is not None:
                log.info("output %s recovered after %d failed attempt(s)", sink.name, attempt)
            return

    async def _checkpoint(self, cp: Checkpoint) -> None:
        if cp.done is not None and cp.done.done():
            return  # a retried hub delivery: already done
        started = self._clock.monotonic()
        attempt = 0
        while True:
            try:
                await self._store.save(cp.checkpoints)
                break
            except TransientError as exc:
                attempt += 1
                delay = self._backoff.delay(attempt)
                log.warning("checkpoint store failed (attempt %d, retrying in %.1fs): %s",
                            attempt, delay, exc)  # fmt: skip
                await self._clock.sleep(delay)
        positions = cp.positions
        if positions:
            try:
                await self._commit(positions)
            except Exception as exc:  # the stored checkpoint is the source of truth
                log.warning("committing positions to the bus failed: %s", exc)
        self._metrics.on_checkpoint(self._clock.monotonic() - started)
        if cp.done is not None and not cp.done.done():
            cp.done.set_result(None)
