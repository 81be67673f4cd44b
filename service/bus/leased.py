"""LeasedBus: a single-reader bus that is read only while this instance holds its lease.

The HTTP bus has one stream and no consumer group, so of several instances on it one
reads (the leader) and the others stand by (:mod:`service.lease`). The wrapper treats
the lease like a Kafka partition assignment, and reuses what the pipeline already does
for one:

* **Taking over.** Once the lease is held, the wrapped bus runs. Its ``run`` restores
  the checkpoint first and emits ``PartitionsAssigned``, so a standby loads the
  checkpoint only when it leads: it continues from the last checkpoint of the reader
  that died, not from whatever was stored when it started.
* **Losing the lease** (its connection is gone: PostgreSQL restarted, a network cut).
  Reading stops at once, the wrapped bus's ``run`` is cancelled (what it fetched but
  did not emit is fetched again by the next reader, from the cursor) and its partitions
  are revoked: ``PartitionsRevoked`` makes the aggregator checkpoint and forget them,
  waited for up to ``revoke_timeout_s``. Then the lease is competed for again; its next
  holder, this instance too, restores from the store.

A lost lease may already have a new holder while the old one still checkpoints: then
the lease's fence (:mod:`service.lease.fence`) refuses that checkpoint and every
PostgreSQL write of the old holder, which also ends its reading at once (``wait_lost``
returns). The new holder reads those events again from the checkpoint it restored.
(Against a server that ignores cursors the events handed out in that moment are split
between the two, as a crash there loses what was handed out.)

A standby sends no metrics to the bus: the bus's metric series carry no instance label,
and a standby's zeros would interleave with the reader's numbers.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping, Sequence
from typing import Final

from service.bus.base import Bus, BusItem, Emit, PartitionsAssigned, PartitionsRevoked, Restore
from service.core.events import Metric
from service.core.lifecycle import unless_stopped
from service.lease.base import Lease
from service.metrics.collector import MetricsCollector

__all__ = ["LeasedBus"]

log = logging.getLogger(__name__)

REVOKE_TIMEOUT_S: Final = 30.0


class LeasedBus:
    """Implements :class:`~service.bus.base.Bus` over ``bus``, guarded by ``lease``.

    ``bus`` must restore its partitions at the start of every ``run`` and accept a new
    ``run`` after a cancelled one (the HTTP bus does both). The lease is given up by
    :meth:`stop`, after the shutdown's final checkpoint is durable, never by
    :meth:`stop_intake`: a standby that took over earlier would start from an older one.
    """

    def __init__(
        self,
        bus: Bus,
        lease: Lease,
        metrics: MetricsCollector,
        *,
        revoke_timeout_s: float = REVOKE_TIMEOUT_S,
    ) -> None:
        self.name = bus.name
        self.lease = lease
        self._bus = bus
        self._metrics = metrics
        self._revoke_timeout_s = revoke_timeout_s
        self._stopping = asyncio.Event()
        metrics.set_lease_leader(False)

    @property
    def reading(self) -> bool:
        return self.lease.role == "leader" and not self._stopping.is_set()

    async def start(self) -> None:
        """Start the wrapped bus; the lease is competed for by :meth:`run`."""
        self._stopping.clear()
        await self._bus.start()

    async def stop(self) -> None:
        self.stop_intake()
        try:
            await self._bus.stop()
        finally:
            await self.lease.stop()
            self._metrics.set_lease_leader(False)

    def stop_intake(self) -> None:
        self._stopping.set()
        self._bus.stop_intake()

    async def run(self, emit: Emit, restore: Restore) -> None:
        """Stand by until the lease is held, read while it is, and again after a loss."""
        while not self._stopping.is_set():
            if not await unless_stopped(self.lease.acquire(), self._stopping):
                return
            if self._stopping.is_set():
                return  # acquired as the stop came: stop() gives the lease back
            self._metrics.set_lease_leader(True)
            lost = await self._read_while_held(emit, restore)
            if lost is None:
                return
            reason, partitions = lost
            self._metrics.set_lease_leader(False)
            self._metrics.on_lease_lost()
            log.error(
                "lease on %s lost (%s): reading stopped; checkpointing %s, then standing by",
                self.lease.namespace,
                reason,
                partitions or "nothing",
            )
            await self._revoke(emit, partitions)

    async def _read_while_held(self, emit: Emit, restore: Restore) -> tuple[str, list[str]] | None:
        """Run the wrapped bus until it returns (a stop: None) or the lease is lost:
        then the reason and the partitions it had assigned."""
        partitions: list[str] = []

        async def tracked(item: BusItem) -> None:
            if type(item) is PartitionsAssigned:  # again after a rewind: listed once
                assigned = [c.partition for c in item.checkpoints]
                partitions[:] = [p for p in partitions if p not in assigned] + assigned
            elif type(item) is PartitionsRevoked:
                partitions[:] = [p for p in partitions if p not in item.partitions]
            await emit(item)

        reader = asyncio.create_task(self._bus.run(tracked, restore), name="leased-reader")
        watch = asyncio.create_task(self.lease.wait_lost(), name="lease-watch")
        try:
            await asyncio.wait({reader, watch}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (reader, watch):
                if not task.done():
                    task.cancel()
            await asyncio.wait({reader, watch})
        if not reader.cancelled():
            reader.result()  # a failure of the reader propagates, lease or not
            if not watch.cancelled():
                watch.result()
            return None  # it returned: stop_intake
        return watch.result(), partitions

    async def _revoke(self, emit: Emit, partitions: list[str]) -> None:
        """Hand the partitions' state to a checkpoint and wait, within limits, until it
        is durable. A stop ends the wait, never the checkpoint; after the timeout the
        checkpoint is given up if it has not started (the sender skips it), since the
        next holder may have stored a newer one by then."""
        if not partitions:
            return
        item = PartitionsRevoked(list(partitions))
        if not await unless_stopped(emit(item), self._stopping):
            return  # stopping: the shutdown's checkpoint takes these partitions along
        settled = asyncio.ensure_future(item.done.until_settled())
        stop = asyncio.ensure_future(self._stopping.wait())
        try:
            await asyncio.wait(
                {settled, stop}, timeout=self._revoke_timeout_s, return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            settled.cancel()
            stop.cancel()
        if item.done.settled:
            failure = item.done.failure
            if failure is None:
                log.info("lease lost: %s checkpointed", partitions)
            else:
                log.error("lease lost: %s not checkpointed: %r", partitions, failure)
        elif not self._stopping.is_set():
            item.done.abandon()
            log.error(
                "lease lost: the checkpoint of %s was not durable within %.0f s; given up "
                "(the next reader resumes from the previous checkpoint)",
                partitions,
                self._revoke_timeout_s,
            )

    def rewind(self, partitions: Sequence[str]) -> None:
        self._bus.rewind(partitions)

    # -- side channels: the wrapped bus's, metrics only from the reader --------------
    async def commit(self, positions: Mapping[str, str]) -> None:
        await self._bus.commit(positions)

    async def send_metrics(self, metrics: Sequence[Metric]) -> None:
        if self.lease.role == "leader":
            await self._bus.send_metrics(metrics)

    async def check(self) -> None:
        await self._bus.check()
