"""Values at the edge of the double range through the real checkpoint stores: the
aggregator's state is written, read back by a new aggregator, continued and emitted;
every value is finite and exact, and the sum event that would overflow is rejected
before and after the restart."""

from __future__ import annotations

import math
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from fractions import Fraction
from pathlib import Path
from typing import Any

import asyncpg
import orjson
import pytest

from service.aggregation.aggregator import EventAggregator
from service.bus.base import SourceBatch
from service.checkpoints.file import FileCheckpointStore
from service.checkpoints.kafka import KafkaCheckpointStore, checkpoint_topic
from service.checkpoints.postgres import PostgresCheckpointStore
from service.config import AggregationConfig
from service.core.clock import ManualClock
from service.metrics.collector import MetricsCollector

pytestmark = pytest.mark.integration

NOW = 1_700_000_000.0
START = NOW // 60 * 60 - 60
StoreFactory = Callable[[], AbstractAsyncContextManager[Any]]


def make(clock: ManualClock) -> tuple[EventAggregator, MetricsCollector]:
    metrics = MetricsCollector(clock)
    return EventAggregator(AggregationConfig(interval_s=60.0), metrics, clock), metrics


def batch(records: list[bytes], position: str) -> SourceBatch:
    return SourceBatch("p0", records, "test p0", position, NOW, None, False)


def ev(name: str, value: float, ts: float, func: str = "sum") -> bytes:
    return orjson.dumps({"name": name, "value": value, "timestamp": ts, "agg_func": func})


async def _overflow_values_survive_a_restart(stores: StoreFactory) -> None:
    clock = ManualClock(NOW)
    first, metrics = make(clock)
    out = first.process(
        batch(
            [
                ev("a", 1.7e308, START + 1),
                ev("a", 1.7e308, START + 2),  # would overflow: rejected
                ev("m", 1.7e308, START + 1, "avg"),
                ev("m", 1.7e308, START + 2, "avg"),
                ev("s", 1e308, START + 1, "stddev"),
                ev("s", -1e308, START + 2, "stddev"),
                ev("p", -1.7e308, START + 1, "p99"),
                ev("p", 1.7e308, START + 2, "p99"),
            ],
            "8",
        )
    )
    assert [d.reason for d in out.dead_letters] == ["overflow"]
    assert metrics.events_rejected["overflow"] == 1
    async with stores() as store:
        await store.save(first.snapshot())

    async with stores() as store:
        loaded = await store.load(["p0"])
    second, metrics = make(clock)
    second.restore(list(loaded.values()))
    assert second.positions() == {"p0": "8"}
    assert metrics.state_dropped == {}
    out = second.process(batch([ev("a", 1.7e308, START + 3), ev("a", -1e308, START + 4)], "10"))
    assert [d.reason for d in out.dead_letters] == ["overflow"]
    out = second.process(batch([ev("later", 1.0, START + 120)], "11"))
    got = {(a.name, a.agg_func): (a.value, a.count) for a in out.aggregates}
    assert all(math.isfinite(v) for v, _ in got.values())
    assert got[("a", "sum")] == (1.7e308 - 1e308, 2)  # exact (Sterbenz)
    assert got[("m", "avg")] == (1.7e308, 2)
    assert got[("s", "stddev")] == (1e308, 2)
    p99, n = got[("p", "p99")]
    exact = Fraction(-1.7e308) + Fraction(99, 100) * (Fraction(1.7e308) - Fraction(-1.7e308))
    assert n == 2 and math.isclose(p99, float(exact), rel_tol=1e-15)
    ledger = second.ledger()
    assert ledger["rejected:overflow"] == 2
    assert ledger["imbalance"] == 0


async def test_overflow_values_survive_a_restart_through_postgres(
    postgres_dsn: str, unique_name: str
) -> None:
    table = f"{unique_name}_cp"
    try:
        await _overflow_values_survive_a_restart(
            lambda: PostgresCheckpointStore(postgres_dsn, "ns", table=table)
        )
    finally:
        conn = await asyncpg.connect(postgres_dsn)
        try:
            await conn.execute(f"DROP TABLE IF EXISTS {table}")
        finally:
            await conn.close()


async def test_overflow_values_survive_a_restart_through_a_file(tmp_path: Path) -> None:
    await _overflow_values_survive_a_restart(lambda: FileCheckpointStore(str(tmp_path), "ns"))


async def test_overflow_values_survive_a_restart_through_kafka(
    kafka_bootstrap: str, unique_name: str
) -> None:
    topic = checkpoint_topic(unique_name)
    await _overflow_values_survive_a_restart(
        lambda: KafkaCheckpointStore({"bootstrap_servers": kafka_bootstrap}, topic, "ns")
    )
