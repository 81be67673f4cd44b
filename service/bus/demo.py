"""DemoBus: the built-in generator behind ``demo://?rate=R&names=N``.

Event ``i`` is a pure function of ``(seed, i)`` (name, agg_func, value); only its event
time comes from the injected clock, at generation. The position of partition ``"demo"``
is the next ``i``, so a restart from a checkpoint regenerates exactly the events that
were not yet durable, and none twice.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from functools import partial
from typing import Any, Final

from service.bus.base import Emit, PartitionsAssigned, Restore, RewindByRerun, SourceBatch
from service.checkpoints.base import PartitionCheckpoint
from service.config import BusConfig
from service.core.clock import Clock
from service.core.events import AGG_FUNCS, Metric
from service.core.lifecycle import AsyncResource
from service.metrics.collector import MetricsCollector

__all__ = ["PARTITION", "DemoBus", "demo_event"]

log = logging.getLogger(__name__)

PARTITION: Final = "demo"
_MASK: Final = (1 << 64) - 1


def _mix(x: int) -> int:
    """splitmix64's finaliser: a cheap, well-spread 64-bit hash."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK
    return x ^ (x >> 31)


def demo_event(seed: int, index: int, names: int, timestamp: float) -> dict[str, Any]:
    """Event ``index`` of the stream ``seed``. Name ``k`` always uses the same agg_func
    (every function appears once there are 12 names) and values around ``10 * (k % 10)``."""
    h = _mix(_mix(seed & _MASK) ^ index)
    k = h % names
    return {
        "name": f"demo.{k:03d}",
        "value": (k % 10) * 10 + ((h >> 24) % 10_000) / 1000,
        "timestamp": timestamp,
        "agg_func": AGG_FUNCS[k % len(AGG_FUNCS)],
    }


class DemoBus(AsyncResource):
    """Paced by ``clock.sleep``: at ``rate`` events/s of the injected clock, in batches of
    at most ``max_batch``. If the pipeline falls behind by more than a second's (or one
    batch's) worth of events, that backlog of *time* is forgiven (positions never skip).
    :meth:`stop_intake` takes effect at the next tick."""

    name = "demo"

    def __init__(
        self,
        config: BusConfig,
        metrics: MetricsCollector,
        clock: Clock,
        *,
        seed: int = 0,
        tick_s: float = 0.05,
        max_batch: int = 5000,
    ) -> None:
        if config.demo_rate <= 0 or config.demo_names < 1:
            raise ValueError(
                f"demo bus needs rate > 0 and names >= 1, got {config.demo_rate}, "
                f"{config.demo_names}"
            )
        self._rate = config.demo_rate
        self._names = config.demo_names
        self._metrics = metrics
        self._clock = clock
        self._seed = seed
        self._tick = tick_s
        self._max_batch = max_batch
        self._intake_stopped = False
        self._rewinds = RewindByRerun()
        self.last_metrics: list[Metric] = []  # what send_metrics got last, for /status and tests

    async def start(self) -> None:
        self._intake_stopped = False

    async def stop(self) -> None:
        self.stop_intake()

    def stop_intake(self) -> None:
        self._intake_stopped = True

    def rewind(self, partitions: Sequence[str]) -> None:
        self._rewinds.rewind(partitions)

    async def run(self, emit: Emit, restore: Restore) -> None:
        await self._rewinds.run(partial(self._read, emit, restore))

    async def _read(self, emit: Emit, restore: Restore) -> None:
        stored = await restore([PARTITION])
        checkpoint = stored.get(PARTITION) or PartitionCheckpoint(PARTITION, None, None)
        await emit(PartitionsAssigned([checkpoint]))
        position = _position(checkpoint.position)
        base, started = position, self._clock.monotonic()
        while not self._intake_stopped:
            due = base + int((self._clock.monotonic() - started) * self._rate)
            if due - position > max(self._rate, self._max_batch):
                base, started = position, self._clock.monotonic()
                due = position + self._max_batch
            if due <= position:
                await self._clock.sleep(self._tick)
                continue
            end = min(due, position + self._max_batch)
            now = self._clock.now()
            records = [demo_event(self._seed, i, self._names, now) for i in range(position, end)]
            self._metrics.on_messages_received(self.name, len(records), len(records))
            await emit(
                SourceBatch(
                    partition=PARTITION,
                    records=records,
                    source=f"demo position={position}",
                    next_position=str(end),
                    received_at=now,
                    caught_up=end >= due,
                    polled_at=self._clock.monotonic(),
                )
            )
            position = end

    async def commit(self, positions: Mapping[str, str]) -> None:
        """Nothing to do: the position is stored with the checkpoint."""

    async def send_metrics(self, metrics: Sequence[Metric]) -> None:
        self.last_metrics = list(metrics)
        log.debug("demo bus: %d metrics", len(metrics))

    async def check(self) -> None:
        """Always reachable."""


def _position(stored: str | None) -> int:
    if stored is None:
        return 0
    if not stored.isdigit():
        log.warning("ignoring stored demo position %r: not a number; starting at 0", stored)
        return 0
    return int(stored)
