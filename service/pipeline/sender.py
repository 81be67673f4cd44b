"""DataSender: writes outputs to every sink, then makes checkpoints durable and commits.

Every configured output is *required*: a checkpoint (and so the source commit) happens
only after all outputs before it are durable in every sink. A sink that fails
transiently is retried on its own, while the others go on; the hub's bounded queues
turn the wait into backpressure up to the bus.

Retries: each sink (and the checkpoint store) has a :class:`Backoff` between attempts
and a :class:`CircuitBreaker`: after ``breaker_threshold`` consecutive failures the
sink is left alone for ``breaker_cooldown_s``, then one probe write goes through. Every
retry is counted (``sink_retries_total{sink}``), as is the time from the first failure
to the next success (``sink_degraded_seconds_total{sink}``). :meth:`readiness_check`
makes ``/readyz`` report a sink whose writes are failing, even when a bare ping works.
A failure that is not retried here (a :class:`PermanentError` such as a refused
privilege or login, or any other exception: a read-only or full disk) counts as
failing just the same: the hub runs the handler again until the cause is fixed.

The archive (ARCHIVE_URL): the accepted events a checkpoint covers are archived right
before it is saved, retried like an output (its own breaker, ``degraded`` entry and
readiness check), so a checkpoint never covers events the archive does not hold.

One transaction for the last rows and the checkpoint: when the wiring hands over a
:class:`SharedTransaction` (the PostgreSQL sink and a checkpoint store in the same
database), the rows written just before a checkpoint and the checkpoint rows commit in
one transaction, after every other sink has acknowledged those rows. So the stored
positions can never name rows that PostgreSQL does not hold, and a checkpoint costs no
extra commit.

Fenced writes: when a lease guards the bus, a PostgreSQL write of an instance that has
lost it fails with :class:`~service.lease.fence.FencedError`. That write (rows, or a
checkpoint with its rows) is dropped, not retried: the lease's new holder reads those
events again from the checkpoint it restored, and this instance stands by.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from functools import partial
from typing import TYPE_CHECKING, Any, Protocol

from service.checkpoints.base import CheckpointStore, PartitionCheckpoint
from service.core.clock import Clock
from service.core.errors import TransientError, describe_error
from service.core.events import Aggregate, DeadLetter
from service.core.retry import Backoff, CircuitBreaker, output_backoff, retry
from service.lease.fence import FencedError
from service.metrics.collector import MetricsCollector
from service.pipeline.flow import Checkpoint, Outputs, ReadBack
from service.pipeline.hub import Delivery
from service.sinks.base import Sink

if TYPE_CHECKING:  # pyarrow is imported only when ARCHIVE_URL is set
    from service.archive.writer import ArchiveWriter

__all__ = [
    "CHECKPOINT_STORE",
    "DataSender",
    "ReadBackSink",
    "SharedTransaction",
    "TransactionalSink",
    "TransactionalStore",
]

log = logging.getLogger(__name__)

Commit = Callable[[Mapping[str, str]], Awaitable[None]]
InTransaction = Callable[[Any], Awaitable[None]]
"""A step run on the sink's open connection, inside the write's transaction."""

CHECKPOINT_STORE = "checkpoints"
"""The name the checkpoint store has in retry logs, metrics and ``degraded``."""


class TransactionalSink(Sink, Protocol):
    """A sink that can also write rows and run ``then`` in one transaction."""

    async def write_in_transaction(
        self,
        aggregates: Sequence[Aggregate],
        dead_letters: Sequence[DeadLetter],
        then: InTransaction,
    ) -> None: ...


class ReadBackSink(Sink, Protocol):
    """A sink whose output can be read back, so that a replay never writes twice what
    the run before it had already written (the Kafka sink: it has no transactions)."""

    def written_offsets(self) -> dict[str, int]:
        """How far each output partition is written, as far as this sink knows; a
        value may be lower than the truth (more is read back), never higher."""

    async def read_back(self, offsets: Mapping[str, int]) -> None:
        """Read what is in the output past ``offsets``; do not write it again."""


class TransactionalStore(Protocol):
    """Store capability: save checkpoints inside a sink's transaction."""

    async def save_in(self, conn: Any, checkpoints: Sequence[PartitionCheckpoint]) -> None: ...


@dataclass(frozen=True, slots=True)
class SharedTransaction:
    """A sink and the checkpoint store that writes to the same database: the store saves
    checkpoints inside the sink's write transaction. Only the wiring knows they match."""

    sink: TransactionalSink
    store: TransactionalStore


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
        breaker_threshold: int = 5,
        breaker_cooldown_s: float = 15.0,
        shared_transaction: SharedTransaction | None = None,
        read_back: Sequence[ReadBackSink] = (),
        archive: ArchiveWriter | None = None,
    ) -> None:
        self._sinks = list(sinks)
        self._archive = archive
        self._store = store
        self._commit = commit
        self._metrics = metrics
        self._clock = clock
        self._batch_size = batch_size
        self._backoff = backoff or output_backoff()
        names = [s.name for s in self._sinks] + [CHECKPOINT_STORE]
        if archive is not None:
            names.append(archive.name)
        self.breakers = {n: CircuitBreaker(breaker_threshold, breaker_cooldown_s) for n in names}
        self.degraded: dict[str, str] = {}  # sink -> last error, while it is failing
        self._degraded_since: dict[str, float] = {}
        self._shared = shared_transaction
        self._read_back = list(read_back)
        if shared_transaction is not None:
            if shared_transaction.sink not in self._sinks:
                raise ValueError(f"{shared_transaction.sink.name!r} is not one of the outputs")
            log.info(
                "checkpoints commit in the same transaction as output %s",
                shared_transaction.sink.name,
            )

    @property
    def checkpoint_partner(self) -> str | None:
        """The output whose transaction also stores checkpoints, if any."""
        return None if self._shared is None else self._shared.sink.name

    async def handle(self, delivery: Delivery[Any]) -> None:
        """Hub handler: consecutive outputs are written together; a checkpoint first
        flushes what came before it. Once a checkpoint is durable, it and the outputs
        before it are marked done: a failure further on makes the hub re-deliver only
        what follows, so a durable checkpoint is never saved (nor its rows written) again.
        """
        aggregates: list[Aggregate] = []
        dead_letters: list[DeadLetter] = []
        for i, item in enumerate(delivery.items):
            if type(item) is Outputs:
                aggregates.extend(item.aggregates)
                dead_letters.extend(item.dead_letters)
            elif type(item) is Checkpoint:
                await self._write_then_checkpoint(aggregates, dead_letters, item)
                delivery.done = i + 1
                aggregates, dead_letters = [], []
            elif type(item) is ReadBack:
                await self.write(aggregates, dead_letters)
                aggregates, dead_letters = [], []
                for sink in self._read_back:
                    await self._retrying(sink.name, partial(sink.read_back, item.offsets))
                delivery.done = i + 1
            else:
                raise TypeError(f"unexpected output item {type(item).__name__}")
        await self.write(aggregates, dead_letters)

    def _chunks(
        self, aggregates: list[Aggregate], dead_letters: list[DeadLetter]
    ) -> Iterator[tuple[list[Aggregate], list[DeadLetter]]]:
        step = self._batch_size
        for i in range(0, max(len(aggregates), len(dead_letters)), step):
            yield aggregates[i : i + step], dead_letters[i : i + step]

    async def write(self, aggregates: list[Aggregate], dead_letters: list[DeadLetter]) -> None:
        for chunk_a, chunk_d in self._chunks(aggregates, dead_letters):
            await self._write_all(self._sinks, chunk_a, chunk_d)
            if chunk_a:
                self._metrics.on_aggregates_durable([a.emitted_at for a in chunk_a])

    async def _write_all(
        self, sinks: Sequence[Sink], aggregates: list[Aggregate], dead_letters: list[DeadLetter]
    ) -> None:
        # Sinks report their own write/error metrics: only they know how many rows they
        # stored and how many they had to dead-letter.
        await asyncio.gather(*(self._write_one(s, aggregates, dead_letters) for s in sinks))

    async def _write_one(
        self, sink: Sink, aggregates: list[Aggregate], dead_letters: list[DeadLetter]
    ) -> None:
        try:
            await self._retrying(sink.name, partial(sink.write, aggregates, dead_letters))
        except FencedError as exc:
            log.error(
                "output %s: %d aggregate(s) and %d dead letter(s) dropped: %s",
                sink.name,
                len(aggregates),
                len(dead_letters),
                exc,
            )

    async def _retrying(self, name: str, attempt_once: Callable[[], Awaitable[None]]) -> None:
        """Run ``attempt_once`` until it succeeds: :class:`TransientError` is retried with
        backoff behind the output's circuit breaker; anything else propagates, and the
        hub runs the handler again on the same items."""
        breaker = self.breakers[name]

        async def through_breaker() -> None:
            wait = breaker.wait_s(self._clock.monotonic())
            if wait > 0:
                await self._clock.sleep(wait)
            try:
                await attempt_once()
            except Exception as exc:
                # Not retried here (a permission, an auth, a full disk: whatever the
                # class), the hub runs the handler again; it is failing all the same,
                # and /readyz must say so (it reads ``degraded``). A fenced write is no
                # output failure: the lease moved on, and the lease reports it.
                if not isinstance(exc, (TransientError, FencedError)):
                    self._record_failure(name, exc)
                raise

        def on_failure(exc: BaseException, attempt: int) -> float:
            return self._record_failure(name, exc)

        await retry(
            through_breaker,
            name=f"output {name}",
            backoff=self._backoff,
            clock=self._clock,
            on_failure=on_failure,
        )
        breaker.record_success()
        self._degraded_since.pop(name, None)
        if self.degraded.pop(name, None) is not None:
            self._metrics.on_sink_recovered(name)
            self._metrics.set_sink_circuit(name, False)

    def _record_failure(self, name: str, exc: BaseException) -> float:
        """Count a failed attempt of output ``name`` (degraded since, breaker, retry
        metrics); returns how long its circuit wants the next attempt to wait."""
        breaker = self.breakers[name]
        now = self._clock.monotonic()
        if name not in self.degraded:
            self._metrics.on_sink_degraded(name)
            self._degraded_since[name] = now
        self.degraded[name] = describe_error(exc)
        opens = breaker.opens
        breaker.record_failure(now)
        self._metrics.set_sink_circuit(name, breaker.state(now) == "open")
        self._metrics.on_sink_retry(name)
        if breaker.opens > opens:
            log.warning(
                "output %s: circuit open after %d failures in a row, next probe in %.0fs",
                name,
                breaker.consecutive_failures,
                breaker.wait_s(now),
            )
        return breaker.wait_s(now)  # an open circuit waits out its cool-down

    async def _write_then_checkpoint(
        self, aggregates: list[Aggregate], dead_letters: list[DeadLetter], cp: Checkpoint
    ) -> None:
        shared = self._shared
        if cp.done is not None and cp.done.abandoned:
            # Its waiter gave up: the bus lets revoked partitions go after its timeout
            # (their new owner may have saved newer state than this), the shutdown at
            # its deadline. Not a redelivery: those never repeat a durable checkpoint.
            await self.write(aggregates, dead_letters)
            if self._archive is not None:  # its slices are not written: intents unknown
                self._archive.forget(c.partition for c in cp.checkpoints)
            log.warning(
                "checkpoint of %s given up by its waiter; not saved",
                [c.partition for c in cp.checkpoints],
            )
            return
        if shared is None:
            await self.write(aggregates, dead_letters)
            await self._archived(cp)
            await self._checkpoint(cp, None)
            return
        *head, (last_a, last_d) = [*self._chunks(aggregates, dead_letters)] or [([], [])]
        for chunk_a, chunk_d in head:
            await self._write_all(self._sinks, chunk_a, chunk_d)
            if chunk_a:
                self._metrics.on_aggregates_durable([a.emitted_at for a in chunk_a])
        # The other sinks must hold the last rows before the checkpoint can commit.
        partner = shared.sink
        await self._write_all([s for s in self._sinks if s is not partner], last_a, last_d)
        await self._archived(cp)
        await self._checkpoint(cp, (partner, shared.store, last_a, last_d))
        if last_a:
            self._metrics.on_aggregates_durable([a.emitted_at for a in last_a])

    async def _archived(self, cp: Checkpoint) -> None:
        """The archive holds the events ``cp`` covers (retried until it does)."""
        archive = self._archive
        if archive is not None and cp.archive:
            await self._retrying(archive.name, partial(archive.write, cp.archive))

    def _with_outputs(self, checkpoints: list[PartitionCheckpoint]) -> list[PartitionCheckpoint]:
        """The checkpoints, each recording how far the outputs are written: everything
        before them is durable now, so these offsets are where a replay's read-back
        starts."""
        if not self._read_back:
            return checkpoints
        outputs: dict[str, int] = {}
        for sink in self._read_back:
            outputs.update(sink.written_offsets())
        return [replace(c, outputs=outputs) for c in checkpoints]

    async def _checkpoint(
        self,
        cp: Checkpoint,
        with_rows: (
            tuple[TransactionalSink, TransactionalStore, list[Aggregate], list[DeadLetter]] | None
        ),
    ) -> None:
        started = self._clock.monotonic()
        checkpoints = self._with_outputs(cp.checkpoints)
        try:
            if with_rows is None:
                await self._retrying(CHECKPOINT_STORE, lambda: self._store.save(checkpoints))
            else:
                sink, store, rows_a, rows_d = with_rows

                async def save(conn: Any) -> None:
                    await store.save_in(conn, checkpoints)

                await self._retrying(
                    sink.name, lambda: sink.write_in_transaction(rows_a, rows_d, save)
                )
        except FencedError as exc:
            log.error(
                "checkpoint of %s (and the rows written with it) dropped: %s",
                [c.partition for c in checkpoints],
                exc,
            )
            if cp.done is not None:
                cp.done.fail(exc)
            return
        positions = cp.positions
        if positions:
            try:
                await self._commit(positions)
            except Exception as exc:  # the stored checkpoint is the source of truth
                log.warning("committing positions to the bus failed: %s", exc)
        self._metrics.on_checkpoint(self._clock.monotonic() - started)
        if cp.done is not None:
            cp.done.confirm()

    def readiness_check(
        self, sink: Sink | ArchiveWriter, failing_for_s: float = 0.0
    ) -> Callable[[], Awaitable[None]]:
        """``sink.check`` that also fails once the sink's writes have been failing for
        ``failing_for_s`` (so a sink that answers a ping but refuses writes is not
        reported ready)."""

        async def check() -> None:
            self._raise_if_failing(sink.name, failing_for_s)
            await sink.check()

        return check

    def store_readiness_check(self, failing_for_s: float = 0.0) -> Callable[[], Awaitable[None]]:
        """Fails once saving checkpoints has been failing for ``failing_for_s``: by the
        store, or by the output whose transaction also saves them (when it fails,
        nothing is checkpointed either)."""

        async def check() -> None:
            self._raise_if_failing(CHECKPOINT_STORE, failing_for_s)
            if self._shared is not None:
                partner = self._shared.sink.name
                try:
                    self._raise_if_failing(partner, failing_for_s)
                except TransientError as exc:
                    raise TransientError(f"saved in output {partner}'s transaction: {exc}") from exc

        return check

    def _raise_if_failing(self, name: str, failing_for_s: float) -> None:
        failing = self.degraded.get(name)
        since = self._degraded_since.get(name)
        now = self._clock.monotonic()
        if failing is None or since is None or now - since < failing_for_s:
            return
        breaker = self.breakers[name]
        state = breaker.state(now)
        circuit = (
            f"circuit open for {breaker.wait_s(now):.0f} s more"
            if state == "open"
            else f"circuit {state.replace('_', '-')}"
        )
        raise TransientError(
            f"writes failing ({breaker.consecutive_failures} in a row, {circuit}): {failing}"
        )
