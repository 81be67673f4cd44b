"""The aggregator as a hub subscriber: turns input items into outputs and checkpoints."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from service.aggregation.aggregator import CloseError, EventAggregator
from service.aggregation.recovery import Recovery, Step
from service.bus.base import PartitionsAssigned, PartitionsRevoked, SourceBatch
from service.checkpoints.base import PartitionCheckpoint
from service.core.clock import Clock
from service.core.confirmation import Confirmation
from service.core.retry import Backoff
from service.pipeline.flow import Checkpoint, CheckpointRequest, Outputs, ReadBack, Tick
from service.pipeline.hub import Delivery

__all__ = ["AggregatorStage", "Publish", "Rewind"]

log = logging.getLogger(__name__)

Publish = Callable[[Outputs | Checkpoint | ReadBack], Awaitable[None]]
"""Hands one item to whatever follows the stage (the wiring binds it to the hub's
output topic); may wait, which is how backpressure reaches the stage."""

Rewind = Callable[[Sequence[str]], None]
"""Asks the bus to deliver these partitions again from their stored checkpoints
(:meth:`~service.bus.base.Bus.rewind`); returns at once."""

_REWIND_BACKOFF = Backoff(initial_s=0.5, maximum_s=10.0)
"""Between failures that follow each other (a failure that no record causes would
otherwise rewind in a tight loop); short enough for a shutdown to get through."""
_FAILURES_FORGOTTEN_S = 60.0  # a failure this long after the previous one starts afresh

_SNAPSHOT_COST_RATIO = 10.0
"""Periodic checkpoints may take at most about 1/10 of the stage's time."""


def read_back_offsets(checkpoints: list[PartitionCheckpoint]) -> dict[str, int]:
    """Where the outputs must start reading back for these restored partitions: per
    output partition, the lowest offset any of their checkpoints recorded."""
    offsets: dict[str, int] = {}
    for cp in checkpoints:
        for tp, offset in (cp.outputs or {}).items():
            offsets[tp] = min(offset, offsets.get(tp, offset))
    return offsets


class AggregatorStage:
    """Feeds :class:`EventAggregator` and publishes what it produces, in order.

    What it produces goes to ``publish``, never to a hub it would have to know: the
    wiring binds it to the output topic, and tests hand it a recorder.

    A checkpoint is taken every ``checkpoint_interval_s`` while something changed,
    right after an idle flush, on a revocation (for the revoked partitions) and on
    request (shutdown). The periodic ones are spaced by at least
    ``_SNAPSHOT_COST_RATIO`` times what the last snapshot took: a snapshot serialises
    every open window on the event loop (about 70 ms per 100k windows), so with a large
    state a fixed 1 s period would spend most of the stage's time checkpointing. The
    price is a longer replay after a crash, never a wrong result.

    At most one periodic checkpoint is in flight: when the next is due and the previous
    one is not durable yet (an output or the store is down), the stage waits for it. So
    while an output is down the queues hold at most one snapshot, intake stops within
    about one checkpoint interval and the events wait in the bus, instead of every
    second adding a snapshot of the whole state to the output queue.

    Idle streams need nothing from the stage: the bus reports silent partitions, and
    the aggregator flushes when a report shows that no partition holds the watermark
    any more (:mod:`service.aggregation.partition` keeps that rule, in one place).

    Applying a batch that raises, whatever the exception, drops the state of every
    partition held and has ``rewind`` deliver them again from their last durable
    checkpoints; a record that raises on every replay is dead-lettered
    (:mod:`service.aggregation.recovery`). Without ``rewind`` (tests of the stage
    alone) the exception propagates, as before.
    """

    def __init__(
        self,
        aggregator: EventAggregator,
        publish: Publish,
        clock: Clock,
        checkpoint_interval_s: float,
        *,
        rewind: Rewind | None = None,
    ) -> None:
        self._agg = aggregator
        self._rewind = rewind
        self._recovery = Recovery()
        self._failures = 0  # failures in a row, each within _FAILURES_FORGOTTEN_S
        self._failed_at = 0.0
        self._emit = publish
        self._clock = clock
        self._interval = checkpoint_interval_s
        self._last_checkpoint = clock.monotonic()
        self._snapshot_s = 0.0  # what the last snapshot took
        self._pending: Confirmation | None = None  # the last periodic checkpoint's outcome
        # checkpoints sent and not settled yet: once durable, the state drops what they
        # covered (a snapshot itself changes nothing, it may still be given up)
        self._unconfirmed: list[tuple[Confirmation, list[PartitionCheckpoint]]] = []
        self._dirty = False

    async def handle(self, delivery: Delivery[Any]) -> None:
        """Hub handler. Each item is marked done as soon as it is handled, so after a
        crash the hub re-delivers only the items after it: no batch is aggregated twice.
        A batch that raises while applied does not reach the hub (see :meth:`_apply`)."""
        for item in delivery.items:
            await self._handle_one(item)
            delivery.done += 1

    async def _handle_one(self, item: Any) -> None:
        if type(item) is SourceBatch:
            await self._apply(item)
            self._dirty = True
        elif type(item) is Tick:
            self._forget_durable()
            if self._dirty and self._checkpoint_due():
                await self._previous_checkpoint_durable()
                await self._checkpoint(None)
        elif type(item) is PartitionsAssigned:
            self._agg.restore(item.checkpoints)
            self._recovery.assigned(item.checkpoints)
            log.info("partitions assigned: %s", [c.partition for c in item.checkpoints])
            offsets = read_back_offsets(item.checkpoints)
            if offsets:  # ahead of every output of the replay
                await self._emit(ReadBack(offsets))
            # A partition whose checkpoint says nothing about the outputs (never
            # checkpointed) gets one now, before it writes anything: a crash before its
            # first periodic checkpoint then still has offsets to read back from.
            fresh = [c.partition for c in item.checkpoints if c.outputs is None]
            if fresh:
                await self._send_checkpoint(self._snapshot(fresh), Confirmation())
        elif type(item) is PartitionsRevoked:
            snapshot = self._agg.release(item.partitions)
            self._recovery.checkpointed(snapshot)
            archive = self._agg.archived(snapshot, released=True)
            await self._emit(Checkpoint(snapshot, item.done, archive))
            log.info("partitions revoked: %s", item.partitions)
        elif type(item) is CheckpointRequest:
            await self._checkpoint(item)
        else:
            raise TypeError(f"unexpected input item {type(item).__name__}")

    async def _emit_outputs(self, out: Outputs) -> None:
        if out:
            await self._emit(out)

    def _snapshot(self, partitions: Sequence[str] | None = None) -> list[PartitionCheckpoint]:
        snapshot = self._agg.snapshot(partitions)
        self._recovery.checkpointed(snapshot)
        return snapshot

    async def _apply(self, batch: SourceBatch) -> None:
        """Apply one batch so that a failure leaves nothing half-applied behind: its
        outputs go out only when all of it applied, else the state is dropped and
        the bus delivers it again (:mod:`service.aggregation.recovery`). Without a
        bus to rewind (tests of the stage alone) a failure propagates."""
        recovery = self._recovery
        partition = batch.partition
        rewind = self._rewind
        if rewind is None:
            await self._emit_outputs(self._agg.process(batch))
            return
        if partition in recovery.rewinding:
            return  # read before the rewind: it comes again after the re-assignment
        steps = recovery.plan(batch)
        n = len(batch.records)
        if steps is None:
            steps = [("apply", 0, n)]
        elif steps[-1][0] == "reject":  # the position and the report still apply
            steps.append(("apply", n, n))
        out = Outputs()
        for step in steps:
            kind, i, j = step
            try:
                if kind == "reject":
                    why = recovery.why_bad(partition, i)
                    out.extend(self._agg.reject_record(batch, i, "internal_error", why))
                else:
                    out.extend(self._agg.process(_piece(batch, step, last=step is steps[-1])))
            except Exception as exc:
                if not isinstance(exc, CloseError):
                    recovery.failed(partition, i, j, f"{type(exc).__name__}: {exc}")
                await self._rewind_all(rewind, batch, step, exc)
                return
        recovery.applied(partition, n)
        await self._emit_outputs(out)

    async def _rewind_all(
        self, rewind: Rewind, batch: SourceBatch, step: Step, exc: Exception
    ) -> None:
        """Drop every partition's state (a failure while closing windows may have
        touched them all) and have the bus deliver them again from their checkpoints.
        Their batches until then are stale; checkpoints leave them out. Failures that
        follow each other closely are spaced out with a backoff."""
        partitions = self._agg.partition_ids()
        log.error(
            "applying records %d..%d of a batch of %s (%s) raised; its state is not "
            "trusted: %s go back to their last durable checkpoints and are delivered again",
            step[1],
            step[2] - 1,
            batch.partition,
            batch.source,
            partitions,
            exc_info=exc,
        )
        self._agg.discard(partitions)
        self._recovery.rewinding.update(partitions)
        now = self._clock.monotonic()
        self._failures = 1 if now - self._failed_at > _FAILURES_FORGOTTEN_S else self._failures + 1
        self._failed_at = now
        if self._failures > 1:
            await self._clock.sleep(_REWIND_BACKOFF.delay(self._failures - 1))
        rewind(partitions)

    async def _send_checkpoint(
        self, snapshot: list[PartitionCheckpoint], done: Confirmation
    ) -> None:
        await self._emit(Checkpoint(snapshot, done, self._agg.archived(snapshot)))
        self._unconfirmed.append((done, snapshot))

    def _forget_durable(self) -> None:
        """Drop from the state what the checkpoints confirmed since covered; those that
        failed or were given up are forgotten (the next one covers the same again)."""
        pending, self._unconfirmed = self._unconfirmed, []
        for done, snapshot in pending:
            if done.confirmed:
                self._agg.on_durable(snapshot)
            elif not done.settled and not done.abandoned:
                self._unconfirmed.append((done, snapshot))

    def _checkpoint_due(self) -> bool:
        spacing = max(self._interval, _SNAPSHOT_COST_RATIO * self._snapshot_s)
        return self._clock.monotonic() - self._last_checkpoint >= spacing

    async def _previous_checkpoint_durable(self) -> None:
        pending = self._pending
        if pending is not None:
            await pending.until_settled()

    async def _checkpoint(self, request: CheckpointRequest | None) -> None:
        started = self._clock.monotonic()
        snapshot = self._snapshot()
        self._snapshot_s = self._clock.monotonic() - started
        done = Confirmation() if request is None else request.done
        await self._send_checkpoint(snapshot, done)
        if request is None:
            # Pending only once published: if the publish failed, the re-delivered tick
            # must not wait for a checkpoint that never left.
            self._pending = done
        self._last_checkpoint = self._clock.monotonic()
        self._dirty = False


def _piece(batch: SourceBatch, step: Step, *, last: bool) -> SourceBatch:
    """Records ``[i, j)`` of ``batch`` as a batch of their own. Only the last piece
    carries what applies after every record: the position, the report, progress."""
    _, i, j = step
    if i == 0 and last:
        return batch
    return dataclasses.replace(
        batch,
        records=batch.records[i:j],
        offsets=None if batch.offsets is None else batch.offsets[i:j],
        origins=None if batch.origins is None else batch.origins[i:j],
        next_position=batch.next_position if last else None,
        caught_up=batch.caught_up if last else False,
        progress=batch.progress if last else None,
    )
