"""Output retries: backoff, the circuit breaker, retry/degraded metrics, readiness, and the
shared-transaction checkpoint path (with fakes)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any

import pytest

from service.checkpoints.base import PartitionCheckpoint
from service.core.clock import ManualClock
from service.core.errors import PermanentError, TransientError, describe_error
from service.core.events import Aggregate, DeadLetter
from service.core.retry import Backoff, CircuitBreaker
from service.metrics.collector import MetricsCollector
from service.pipeline.flow import Checkpoint, Outputs
from service.pipeline.hub import Delivery
from service.pipeline.sender import DataSender, SharedTransaction
from tests.fakes.sinks import MemorySink


def agg(name: str) -> Aggregate:
    return Aggregate(name, "sum", 1.0, 1, 0.0, 60.0, 100.0)


def test_breaker_opens_after_the_threshold_probes_once_after_the_cooldown_and_closes() -> None:
    b = CircuitBreaker(failure_threshold=3, cooldown_s=10.0)
    b.record_failure(0.0)
    b.record_failure(1.0)
    assert (b.state(1.0), b.wait_s(1.0)) == ("closed", 0.0)
    b.record_failure(2.0)
    assert (b.state(2.0), b.wait_s(5.0), b.opens) == ("open", 7.0, 1)
    assert (b.state(12.0), b.wait_s(12.0)) == ("half_open", 0.0)
    b.record_failure(12.0)  # the probe failed: a new cool-down
    assert (b.state(12.0), b.wait_s(12.0), b.opens) == ("open", 10.0, 2)
    b.record_success()
    assert (b.state(13.0), b.consecutive_failures) == ("closed", 0)


@pytest.mark.parametrize(
    ("kind", "expected"),
    [("fixed", [2.0, 2.0, 2.0]), ("linear", [2.0, 4.0, 6.0]), ("exponential", [2.0, 4.0, 8.0])],
)
def test_backoff_kinds_without_jitter(kind: Any, expected: list[float]) -> None:
    b = Backoff(kind, initial_s=2.0, maximum_s=7.0 if kind == "linear" else 30.0, jitter=False)
    assert [b.delay(n) for n in (1, 2, 3)] == [min(d, b.maximum_s) for d in expected]


async def drive(clock: ManualClock, task: asyncio.Task[None], step: float = 1.0) -> None:
    """Move the clock on by ``step`` whenever something sleeps on it, until ``task`` ends."""
    async with asyncio.timeout(5):
        while not task.done():
            parked = asyncio.ensure_future(clock.sleeping())
            try:
                await asyncio.wait({task, parked}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                parked.cancel()
            if not task.done():
                clock.advance(step)
        await task


async def test_a_failing_sink_opens_its_circuit_counts_retries_and_degraded_time() -> None:
    clock = ManualClock()
    metrics = MetricsCollector(clock)
    sink = MemorySink("s0")
    await sink.start()
    sender = DataSender(
        [sink],
        _NoStore(),
        _no_commit,
        metrics,
        clock,
        backoff=Backoff("fixed", 1.0, 1.0),
        breaker_threshold=3,
        breaker_cooldown_s=10.0,
    )
    check = sender.readiness_check(sink)
    await check()
    sink.fail_next(7)  # failures at t=0,1,2 (opens), probes at 12,22,32,42, success at 52
    task = asyncio.create_task(sender.handle(Delivery([Outputs([agg("a")], [])])))
    async with asyncio.timeout(5):
        await clock.sleeping()  # the first write failed: the sender waits out its backoff
    assert sink.failed_writes == 1
    with pytest.raises(TransientError, match=r"writes failing \(1 in a row, circuit closed\)"):
        await check()

    async with asyncio.timeout(5):
        while sink.failed_writes < 3:
            clock.advance(1.0)
            await clock.sleeping()  # the next write failed and its wait has begun
    assert clock.monotonic() == 2.0
    assert metrics.sink_circuit_open == {"s0": True}
    with pytest.raises(TransientError, match="circuit open for 10 s more"):
        await check()
    assert b'vabus_aggregator_sink_circuit_open{sink="s0"} 1.0' in metrics.exposition()

    await drive(clock, task)
    assert sink.failed_writes == 7 and len(sink.aggregates) == 1
    assert metrics.sink_retries == {"s0": 7}
    assert metrics.sink_degraded_seconds() == {"s0": 52.0}
    assert metrics.sink_circuit_open == {"s0": False}
    assert sender.breakers["s0"].opens == 5
    assert sender.degraded == {}
    await check()
    text = metrics.exposition()
    assert b'vabus_aggregator_sink_retries_total{sink="s0"} 7.0' in text
    assert b'vabus_aggregator_sink_degraded_seconds_total{sink="s0"} 52.0' in text
    snap = metrics.snapshot()
    assert snap["sink_retries"] == {"s0": 7} and snap["sink_degraded_seconds"] == {"s0": 52.0}


async def test_degraded_time_includes_an_outage_still_going_on() -> None:
    clock = ManualClock()
    metrics = MetricsCollector(clock)
    metrics.on_sink_degraded("pg")
    clock.advance(4.0)
    metrics.on_sink_degraded("pg")  # a second failure does not restart the count
    clock.advance(1.5)
    assert metrics.sink_degraded_seconds() == {"pg": 5.5}


async def test_a_failing_checkpoint_store_is_retried_and_named_checkpoints() -> None:
    clock = ManualClock()
    metrics = MetricsCollector(clock)
    store = _NoStore(fail=2)
    sender = DataSender([], store, _no_commit, metrics, clock, backoff=Backoff("fixed", 1.0, 1.0))
    task = asyncio.create_task(
        sender.handle(Delivery([Checkpoint([PartitionCheckpoint("p", "1", None)])]))
    )
    await drive(clock, task)
    assert store.saved == 1 and metrics.sink_retries == {"checkpoints": 2}


async def test_readiness_names_a_checkpoint_store_failing_for_the_set_time() -> None:
    clock = ManualClock()
    store = _NoStore(fail=10_000)
    sender = DataSender(
        [], store, _no_commit, MetricsCollector(clock), clock, backoff=Backoff("fixed", 1.0, 1.0)
    )
    check = sender.store_readiness_check(failing_for_s=5.0)
    await check()  # nothing failing yet
    task = asyncio.create_task(
        sender.handle(Delivery([Checkpoint([PartitionCheckpoint("p", "1", None)])]))
    )
    try:
        async with asyncio.timeout(5):
            await clock.sleeping()  # the first failure is in, the retry waits
        await check()  # failing, but not for 5 s yet
        for _ in range(5):
            clock.advance(1.0)
            async with asyncio.timeout(5):
                await clock.sleeping()
        with pytest.raises(TransientError, match="writes failing"):
            await check()
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


class _NoStore:
    def __init__(self, fail: int = 0) -> None:
        self.fail = fail
        self.saved = 0

    async def start(self) -> None: ...
    async def stop(self) -> None: ...

    async def load(self, partitions: Sequence[str]) -> dict[str, PartitionCheckpoint]:
        return {}

    async def save(self, checkpoints: Sequence[PartitionCheckpoint]) -> None:
        if self.fail:
            self.fail -= 1
            raise TransientError("store down")
        self.saved += 1


async def _no_commit(positions: Mapping[str, str]) -> None:
    return None


class _TxSink(MemorySink):
    """A MemorySink that can also run a step "in the same transaction"."""

    def __init__(self, log: list[str]) -> None:
        super().__init__("tx")
        self.log = log

    async def write_in_transaction(
        self,
        aggregates: Sequence[Aggregate],
        dead_letters: Sequence[DeadLetter],
        then: Callable[[Any], Awaitable[None]],
    ) -> None:
        self.log.append(f"tx rows {[a.name for a in aggregates]}")
        await then("conn")
        await self.write(aggregates, dead_letters)


class _TxStore(_NoStore):
    def __init__(self, log: list[str]) -> None:
        super().__init__()
        self.log = log

    async def save_in(self, conn: Any, checkpoints: Sequence[PartitionCheckpoint]) -> None:
        self.log.append(f"checkpoint on {conn}")


async def test_the_last_chunk_and_the_checkpoint_share_the_partners_transaction() -> None:
    log: list[str] = []
    clock = ManualClock()
    other, tx = MemorySink("other"), _TxSink(log)
    for s in (other, tx):
        await s.start()
    store = _TxStore(log)
    sender = DataSender(
        [other, tx],
        store,
        _no_commit,
        MetricsCollector(clock),
        clock,
        batch_size=2,
        shared_transaction=SharedTransaction(tx, store),
    )
    assert sender.checkpoint_partner == "tx"

    outputs = Outputs([agg("a"), agg("b"), agg("c")], [])
    await sender.handle(Delivery([outputs, Checkpoint([PartitionCheckpoint("p", "1", None)])]))

    assert log == ["tx rows ['c']", "checkpoint on conn"]  # a, b went by plain writes
    assert [[a.name for a in w[0]] for w in other.writes] == [["a", "b"], ["c"]]
    assert [[a.name for a in w[0]] for w in tx.writes] == [["a", "b"], ["c"]]
    assert store.saved == 0  # never the separate save

    await sender.handle(Delivery([Checkpoint([PartitionCheckpoint("p", "2", None)])]))
    assert log[-2:] == ["tx rows []", "checkpoint on conn"]


class _RefusingStore(_NoStore):
    """A store whose every save raises ``exc`` until told to stop."""

    def __init__(self, exc: Exception) -> None:
        super().__init__()
        self.exc: Exception | None = exc

    async def save(self, checkpoints: Sequence[PartitionCheckpoint]) -> None:
        if self.exc is not None:
            raise self.exc
        self.saved += 1


NOT_RETRIED_HERE = [
    PermissionError(13, "Permission denied", "state/.ns.checkpoint.tmp"),
    OSError(28, "No space left on device", "state/.ns.checkpoint.tmp"),
    OSError(30, "Read-only file system", "state/.ns.checkpoint.tmp"),
    IsADirectoryError(21, "Is a directory", "state/.ns.checkpoint.tmp"),
    PermanentError("PostgreSQL refused the request (SQLSTATE 42501): permission denied"),
    PermanentError("PostgreSQL refused the login (SQLSTATE 28P01): password authentication"),
    PermanentError("Kafka refused the request: TopicAuthorizationFailedError"),
    RuntimeError("anything else"),
]


@pytest.mark.parametrize("exc", NOT_RETRIED_HERE, ids=lambda e: type(e).__name__ + str(e)[:12])
async def test_readiness_names_a_store_that_fails_with_any_error_class(exc: Exception) -> None:
    # Errors the sender does not retry itself go to the hub, which runs the handler again
    # on the same items: they are failing writes all the same, and readiness says so.
    clock = ManualClock()
    store = _RefusingStore(exc)
    sender = DataSender([], store, _no_commit, MetricsCollector(clock), clock)
    check = sender.store_readiness_check(failing_for_s=5.0)
    checkpoint = Checkpoint([PartitionCheckpoint("p", "1", None)])
    for _ in range(3):  # the hub's re-deliveries, each failing
        with pytest.raises(type(exc)):
            await sender.handle(Delivery([checkpoint]))
        await check()  # failing, not for 5 s yet
        clock.advance(2.0)
    with pytest.raises(TransientError, match=r"writes failing \(3 in a row") as info:
        await check()
    assert type(exc).__name__ in str(info.value) or str(exc) in str(info.value)
    assert sender.degraded == {"checkpoints": describe_error(exc)}

    store.exc = None  # the cause removed: the next re-delivery saves
    clock.advance(sender.breakers["checkpoints"].cooldown_s)
    await sender.handle(Delivery([checkpoint]))
    await check()
    assert store.saved == 1 and sender.degraded == {}


@pytest.mark.parametrize("exc", NOT_RETRIED_HERE[4:], ids=lambda e: str(e)[:20])
async def test_readiness_names_an_output_that_fails_with_any_error_class(exc: Exception) -> None:
    clock = ManualClock()
    sink = MemorySink("pg")
    await sink.start()
    sender = DataSender([sink], _NoStore(), _no_commit, MetricsCollector(clock), clock)
    check = sender.readiness_check(sink, failing_for_s=0.0)
    sink.fail_next(1, exc)
    with pytest.raises(type(exc)):
        await sender.handle(Delivery([Outputs([agg("a")], [])]))
    with pytest.raises(TransientError, match="writes failing"):
        await check()
    await sender.handle(Delivery([Outputs([agg("a")], [])]))
    await check()
    assert len(sink.aggregates) == 1


async def test_checkpoints_saved_in_a_failing_partners_transaction_fail_readiness() -> None:
    log: list[str] = []
    clock = ManualClock()
    tx = _TxSink(log)
    await tx.start()
    store = _TxStore(log)
    sender = DataSender(
        [tx],
        store,
        _no_commit,
        MetricsCollector(clock),
        clock,
        shared_transaction=SharedTransaction(tx, store),
    )
    check = sender.store_readiness_check()
    await check()
    tx.fail_next(1, PermanentError("permission denied for table agg (SQLSTATE 42501)"))
    with pytest.raises(PermanentError):
        await sender.handle(Delivery([Checkpoint([PartitionCheckpoint("p", "1", None)])]))
    with pytest.raises(TransientError, match="saved in output tx's transaction"):
        await check()
