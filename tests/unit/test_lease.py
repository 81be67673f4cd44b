"""One reader per HTTP bus: LeasedBus over a fake bus and an in-memory lease, and two
wired services of which one reads and the other stands by and takes over."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import orjson
from aiohttp.test_utils import TestClient, TestServer

from service.app import Service
from service.bus.base import (
    BusItem,
    Emit,
    PartitionsAssigned,
    PartitionsRevoked,
    Restore,
    SourceBatch,
)
from service.bus.http import HttpBus
from service.bus.leased import LeasedBus
from service.checkpoints.base import PartitionCheckpoint
from service.config import AggregationConfig, BusConfig, Config, PostgresConfig, Secret
from service.core.clock import ManualClock, SystemClock
from service.core.events import Metric
from service.dev.emulator import Emulator
from service.lease.postgres import PostgresLease, lease_key
from service.metrics.collector import MetricsCollector
from service.ops.web import build_web_app
from service.wiring import build_lease, checkpoint_namespace
from tests.fakes.lease import MemoryLease, MemoryLeaseServer
from tests.fakes.sinks import MemorySink

NS = "http:http://vabus:8081"
START = 1_699_999_980.0  # a multiple of 60


class ReplayBus:
    """Like the HTTP bus: one partition, restored at the start of every ``run``, records
    played from the restored position; ``add`` appends, as a producer would."""

    name = "fake"

    def __init__(self, records: Sequence[bytes] = ()) -> None:
        self.records = list(records)
        self.runs = 0
        self.restored: list[str | None] = []
        self.sent_metrics: list[Sequence[Metric]] = []
        self.intake_stopped = False
        self._wake = asyncio.Event()

    def add(self, records: Sequence[bytes]) -> None:
        self.records.extend(records)
        self._wake.set()

    async def start(self) -> None:
        pass

    async def stop(self) -> None:
        self.stop_intake()

    def stop_intake(self) -> None:
        self.intake_stopped = True
        self._wake.set()

    def rewind(self, partitions: Sequence[str]) -> None:
        """Not used here: nothing raises in these tests' stage."""

    async def run(self, emit: Emit, restore: Restore) -> None:
        self.runs += 1
        stored = await restore(["p"])
        cp = stored.get("p") or PartitionCheckpoint("p", None, None)
        self.restored.append(cp.position)
        await emit(PartitionsAssigned([cp]))
        pos = int(cp.position or 0)
        while not self.intake_stopped:
            if pos < len(self.records):
                pos += 1
                batch = SourceBatch("p", [self.records[pos - 1]], f"fake@{pos - 1}", str(pos), 0.0)
                await emit(batch)
                continue
            self._wake.clear()
            await self._wake.wait()

    async def commit(self, positions: Mapping[str, str]) -> None:
        pass

    async def send_metrics(self, metrics: Sequence[Metric]) -> None:
        self.sent_metrics.append(metrics)

    async def check(self) -> None:
        pass


class DictStore:
    """A checkpoint store every instance shares, as PostgreSQL is shared; ``load``
    answers what is stored at that moment."""

    def __init__(self) -> None:
        self.saved: dict[str, PartitionCheckpoint] = {}
        self.loads = 0

    async def start(self) -> None:
        pass

    async def stop(self) -> None:
        pass

    async def load(self, partitions: Sequence[str]) -> dict[str, PartitionCheckpoint]:
        self.loads += 1
        return {p: self.saved[p] for p in partitions if p in self.saved}

    async def save(self, checkpoints: Sequence[PartitionCheckpoint]) -> None:
        self.saved.update((c.partition, c) for c in checkpoints)


async def eventually(cond: Callable[[], bool], what: str, timeout: float = 5.0) -> None:
    async with asyncio.timeout(timeout):
        while not cond():
            await asyncio.sleep(0.005)


class Recorder:
    """An ``emit`` that keeps the items and resolves revocations as the pipeline would."""

    def __init__(self, confirm_revocations: bool = True) -> None:
        self.items: list[BusItem] = []
        self._confirm = confirm_revocations

    async def __call__(self, item: BusItem) -> None:
        self.items.append(item)
        if type(item) is PartitionsRevoked and self._confirm:
            item.done.confirm()

    def of(self, kind: type[Any]) -> list[Any]:
        return [i for i in self.items if type(i) is kind]


def leased(bus: ReplayBus, lease: MemoryLease, **kwargs: Any) -> tuple[LeasedBus, MetricsCollector]:
    metrics = MetricsCollector(ManualClock())
    return LeasedBus(bus, lease, metrics, **kwargs), metrics


async def test_a_standby_neither_restores_nor_reads_until_the_lease_is_free() -> None:
    server = MemoryLeaseServer()
    other = server.lease(NS)
    await other.acquire()
    bus = ReplayBus([b"1", b"2"])
    guarded, metrics = leased(bus, server.lease(NS))
    store = DictStore()
    emit = Recorder()
    task = asyncio.create_task(guarded.run(emit, store.load))
    for _ in range(20):
        await asyncio.sleep(0)
    assert (bus.runs, store.loads, emit.items) == (0, 0, [])
    assert guarded.lease.describe()["role"] == "standby" and not guarded.reading
    assert metrics.lease_leader is False

    store.saved["p"] = PartitionCheckpoint("p", "1", None)  # what the leader stored last
    await other.stop()  # the leader is gone
    await eventually(lambda: len(emit.of(SourceBatch)) == 1, "the rest of the stream")
    assert bus.restored == ["1"]  # loaded on taking over, not at start
    assert [b.records for b in emit.of(SourceBatch)] == [[b"2"]]
    assert guarded.lease.describe()["role"] == "leader" and guarded.reading
    assert metrics.lease_leader is True
    guarded.stop_intake()
    await asyncio.wait_for(task, 5)
    assert guarded.lease.role == "leader", "the lease is kept until stop()"
    await guarded.stop()
    assert guarded.lease.role == "standby" and server.holders == {}


async def test_losing_the_lease_stops_reading_revokes_and_competes_again() -> None:
    server = MemoryLeaseServer()
    bus = ReplayBus([b"1"])
    guarded, metrics = leased(bus, server.lease(NS))
    store = DictStore()
    emit = Recorder()
    task = asyncio.create_task(guarded.run(emit, store.load))
    await eventually(lambda: len(emit.of(SourceBatch)) == 1, "the first record")
    other = server.lease(NS)
    contender = asyncio.create_task(other.acquire())

    await server.cut(NS, "PostgreSQL restarted")  # the other instance gets it first
    await asyncio.wait_for(contender, 5)
    await eventually(lambda: bool(emit.of(PartitionsRevoked)), "the revocation")
    assert emit.of(PartitionsRevoked)[0].partitions == ["p"]
    assert metrics.lease_lost == 1 and metrics.lease_leader is False
    bus.add([b"2"])
    for _ in range(20):
        await asyncio.sleep(0)
    assert bus.runs == 1 and len(emit.of(SourceBatch)) == 1, "read on without the lease"

    store.saved["p"] = PartitionCheckpoint("p", "2", None)  # the other one read on
    await other.stop()
    await eventually(lambda: bus.runs == 2, "reading again")
    await eventually(lambda: len(emit.of(PartitionsAssigned)) == 2, "reassigned")
    assert bus.restored == [None, "2"]  # the state comes back from the store
    assert metrics.lease_leader is True
    guarded.stop_intake()
    await asyncio.wait_for(task, 5)
    await guarded.stop()


async def test_a_revocation_not_durable_in_time_is_given_up() -> None:
    server = MemoryLeaseServer()
    guarded, _ = leased(ReplayBus(), server.lease(NS), revoke_timeout_s=0.05)
    emit = Recorder(confirm_revocations=False)  # an output is down: nothing gets durable
    task = asyncio.create_task(guarded.run(emit, DictStore().load))
    await eventually(lambda: bool(emit.of(PartitionsAssigned)), "assigned")
    await server.cut(NS)
    await eventually(lambda: bool(emit.of(PartitionsRevoked)), "the revocation")
    revoked = emit.of(PartitionsRevoked)[0]
    await eventually(lambda: revoked.done.abandoned, "the revocation given up")
    await eventually(lambda: guarded.lease.role == "leader", "competing again")
    guarded.stop_intake()
    await asyncio.wait_for(task, 5)
    await guarded.stop()


async def test_stop_intake_ends_a_standby_without_it_ever_reading() -> None:
    server = MemoryLeaseServer()
    await server.lease(NS).acquire()
    bus = ReplayBus([b"1"])
    guarded, _ = leased(bus, server.lease(NS))
    task = asyncio.create_task(guarded.run(Recorder(), DictStore().load))
    await asyncio.sleep(0)
    guarded.stop_intake()
    await asyncio.wait_for(task, 5)
    await guarded.stop()
    assert bus.runs == 0


async def test_only_the_leader_sends_metrics_to_the_bus() -> None:
    server = MemoryLeaseServer()
    other = server.lease(NS)
    await other.acquire()
    bus = ReplayBus()
    guarded, _ = leased(bus, server.lease(NS))
    sample = [Metric("vabus_aggregator.events_received", 0.0, START)]
    await guarded.send_metrics(sample)
    assert bus.sent_metrics == []
    await other.stop()
    await guarded.lease.acquire()
    await guarded.send_metrics(sample)
    assert bus.sent_metrics == [sample]
    await guarded.stop()


async def test_a_failing_reader_fails_the_run() -> None:
    class Broken(ReplayBus):
        async def run(self, emit: Emit, restore: Restore) -> None:
            raise RuntimeError("checkpoint of an unknown format")

    server = MemoryLeaseServer()
    guarded, _ = leased(Broken(), server.lease(NS))
    try:
        await asyncio.wait_for(guarded.run(Recorder(), DictStore().load), 5)
    except RuntimeError as exc:
        assert "unknown format" in str(exc)
    else:
        raise AssertionError("the reader's failure was swallowed")
    await guarded.stop()
    assert server.holders == {}


async def test_the_http_bus_reads_on_from_the_stored_cursor_after_a_lost_lease() -> None:
    async with Emulator() as emulator:
        emulator.append([{"name": "n", "value": i, "timestamp": START + i} for i in range(5)])
        url = emulator.url
        config = BusConfig(url=url, kind="http", http_base_url=url, http_wait_s=0.2)
        server, store, emit = MemoryLeaseServer(), DictStore(), Recorder()
        metrics = MetricsCollector()
        guarded = LeasedBus(HttpBus(config, metrics, SystemClock()), server.lease(NS), metrics)
        await guarded.start()
        task = asyncio.create_task(guarded.run(emit, store.load))

        def values() -> list[int]:
            return [r["value"] for b in emit.of(SourceBatch) for r in b.records]

        await eventually(lambda: values() == [0, 1, 2, 3, 4], "the first events")
        cursor = emit.of(SourceBatch)[-1].next_position
        store.saved["http"] = PartitionCheckpoint("http", cursor, None)  # what is durable
        await server.cut(NS)
        await eventually(lambda: len(emit.of(PartitionsAssigned)) == 2, "reading again")
        assert emit.of(PartitionsAssigned)[1].checkpoints[0].position == cursor
        emulator.append([{"name": "n", "value": 5, "timestamp": START + 5}])
        await eventually(lambda: values() == [0, 1, 2, 3, 4, 5], "on from the cursor")
        guarded.stop_intake()
        await asyncio.wait_for(task, 5)
        await guarded.stop()


def test_only_an_http_bus_with_postgresql_as_an_output_gets_a_lease() -> None:
    url = "http://vabus:8081"
    http = BusConfig(url=url, kind="http", http_base_url=url)
    pg = PostgresConfig(dsn=Secret("postgresql://app@db:5432/app"))
    with_pg = Config(bus=http, outputs=("kafka", "postgres"), postgres=pg)
    lease = build_lease(with_pg, ManualClock())
    assert isinstance(lease, PostgresLease)
    assert lease.namespace == checkpoint_namespace(with_pg) == f"http:{url}"
    assert build_lease(Config(bus=http, outputs=("kafka",)), ManualClock()) is None
    kafka = BusConfig(
        url="kafka://k:9092/events", kind="kafka", kafka_bootstrap_servers=("k:9092",)
    )
    assert build_lease(Config(bus=kafka, outputs=("postgres",), postgres=pg), ManualClock()) is None
    assert build_lease(Config(outputs=("postgres",), postgres=pg), ManualClock()) is None  # demo


def test_the_lease_key_is_a_stable_signed_64_bit_hash_of_the_namespace() -> None:
    key = lease_key(NS)
    assert key == lease_key(NS) and -(2**63) <= key < 2**63
    assert key != lease_key("http:http://vabus:8082")
    # pinned: instances of different releases must compete for the same lock
    assert key == -7909064451421432988


# -- two wired services: one reads, the other stands by and continues ----------------


def ev(name: str, value: float, ts: float) -> bytes:
    return orjson.dumps({"name": name, "value": value, "timestamp": ts, "agg_func": "sum"})


def service(bus: ReplayBus, lease: MemoryLease, store: DictStore, sink: MemorySink) -> Service:
    clock = ManualClock(START + 600)
    metrics = MetricsCollector(clock)
    return Service(
        Config(aggregation=AggregationConfig(interval_s=60.0)),
        bus=LeasedBus(bus, lease, metrics),
        sinks=[sink],
        store=store,
        metrics=metrics,
        clock=clock,
        serve_http=False,
        lease=lease,
    )


async def test_the_standby_takes_over_from_the_leaders_last_checkpoint_exactly() -> None:
    server, store, sink = MemoryLeaseServer(), DictStore(), MemorySink()
    first_sink = MemorySink()  # stopped with the first service
    records = [ev("a", 1, START + 1), ev("a", 2, START + 2), ev("a", 4, START + 61)]
    first_bus, second_bus = ReplayBus(records[:2]), ReplayBus(records[:2])
    first = service(first_bus, server.lease(NS), store, first_sink)
    second = service(second_bus, server.lease(NS), store, sink)
    first_run = asyncio.create_task(first.run())
    await eventually(lambda: first.status()["lease"] == "leader", "a leader")
    second_run = asyncio.create_task(second.run())
    await eventually(lambda: second.phase == "running", "the second one running")
    await eventually(lambda: first.metrics.events_aggregated == 2, "the leader reading")
    assert second.status()["lease"] == "standby" and second_bus.runs == 0
    assert second.readiness_details()["reading"] is False
    assert second.readiness_details()["reason"].startswith("standby: another instance holds")
    assert first.readiness_details() == {"lease": "leader", "reading": True}

    first.request_stop()  # its final checkpoint, then the lease goes
    await asyncio.wait_for(first_run, 10)
    await eventually(lambda: second.status()["lease"] == "leader", "the takeover")
    second_bus.add(records[2:])  # the stream goes on; window [START, START+60) closes
    await eventually(lambda: len(sink.aggregates) == 1, "the first window")
    assert second_bus.restored == ["2"]
    ((_, aggregate),) = sink.aggregates.items()
    assert (aggregate.value, aggregate.count) == (3.0, 2)  # nothing lost, nothing twice
    assert first_sink.aggregates == {}
    second.request_stop()
    await asyncio.wait_for(second_run, 10)
    assert store.saved["p"].position == "3"


async def test_a_leader_that_loses_its_lease_checkpoints_and_resumes_from_the_store() -> None:
    server, store, sink = MemoryLeaseServer(), DictStore(), MemorySink()
    records = [ev("a", 1, START + 1), ev("a", 2, START + 2), ev("a", 4, START + 61)]
    bus = ReplayBus(records[:2])
    svc = service(bus, server.lease(NS), store, sink)
    run = asyncio.create_task(svc.run())
    await eventually(lambda: svc.metrics.events_aggregated == 2, "reading")
    # no periodic checkpoint on the manual clock: only the one a fresh partition gets
    # at once (so that a read-back after a crash has offsets to start from)
    assert store.saved["p"].position is None

    await server.cut(NS, "PostgreSQL restarted")
    await eventually(lambda: bus.runs == 2, "reading again")
    assert store.saved["p"].position == "2"  # the revocation checkpointed the partition
    assert bus.restored == [None, "2"]  # and the state came back from the store
    assert svc.metrics.lease_lost == 1 and svc.status()["lease"] == "leader"
    bus.add(records[2:])
    await eventually(lambda: len(sink.aggregates) == 1, "the first window")
    ((_, aggregate),) = sink.aggregates.items()
    assert (aggregate.value, aggregate.count) == (3.0, 2)
    svc.request_stop()
    await asyncio.wait_for(run, 10)


async def test_readyz_of_a_standby_is_ready_and_says_it_does_not_read() -> None:
    server = MemoryLeaseServer()
    await server.lease(NS).acquire()
    standby = service(ReplayBus(), server.lease(NS), DictStore(), MemorySink())
    app = build_web_app(
        standby.metrics, {}, standby.status, readiness_details=standby.readiness_details
    )
    async with TestClient(TestServer(app)) as client:
        resp = await client.get("/readyz")
        assert resp.status == 200
        body = await resp.json()
        assert body["status"] == "ready" and body["lease"] == "standby"
        assert body["reading"] is False and NS in body["reason"]
        metrics = await (await client.get("/metrics")).text()
        assert "vabus_aggregator_lease_leader 0.0" in metrics
        status = await (await client.get("/status")).json()
        assert status["lease"] == "standby"
