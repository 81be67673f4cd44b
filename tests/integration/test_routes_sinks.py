"""Routed outputs against the real broker and PostgreSQL: each aggregate in its route's
topic or table only, read back per topic, every table in the checkpoint's transaction."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from dataclasses import replace
from typing import Any

import orjson
import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition

from service.checkpoints.base import PartitionCheckpoint
from service.checkpoints.postgres import PostgresCheckpointStore
from service.config import KafkaConfig, PostgresConfig
from service.core.clock import SystemClock
from service.core.errors import PermanentError
from service.core.events import Aggregate, DeadLetter
from service.metrics.collector import MetricsCollector
from service.pipeline.flow import Checkpoint, Outputs
from service.pipeline.hub import Delivery
from service.pipeline.sender import DataSender, SharedTransaction
from service.postgres.schema import migrate
from service.routes import Route, Router, Routes
from service.sinks.kafka import KafkaSink
from service.sinks.postgres import PostgresSink

pytestmark = pytest.mark.integration

T0 = 1_700_000_040.0


def agg(name: str, count: int = 1, revision: int = 1) -> Aggregate:
    return Aggregate(name, "sum", float(count), count, T0, T0 + 60, T0 + 61, revision=revision)


def routes(table: str, topic: str) -> Routes:
    return Routes(
        rules=(
            Route("hosts", ("cpu.*",), ("postgres",), postgres_table=table),
            Route("billing", ("billing.*",), ("kafka", "postgres"), kafka_topic=topic),
        )
    )


def router(routes: Routes, kafka_topic: str, table: str) -> Router:
    return Router(
        routes, outputs=("kafka", "postgres"), kafka_topic=kafka_topic, postgres_table=table
    )


async def topic_records(bootstrap: str, topic: str) -> list[dict[str, Any]]:
    """Every record in ``topic`` now (all partitions, to their end)."""
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    await consumer.start()
    try:
        await consumer.topics()  # fetches the metadata of every topic
        tps = [TopicPartition(topic, p) for p in consumer.partitions_for_topic(topic) or ()]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        ends = await consumer.end_offsets(tps)
        out: list[dict[str, Any]] = []
        async with asyncio.timeout(30):
            while [tp for tp in tps if await consumer.position(tp) < ends[tp]]:
                for batch in (await consumer.getmany(timeout_ms=500)).values():
                    out.extend(orjson.loads(r.value) for r in batch)
    finally:
        await consumer.stop()
    return out


async def test_kafka_writes_each_route_to_its_topic_and_nothing_where_it_has_no_kafka(
    kafka_bootstrap: str, unique_name: str
) -> None:
    cfg = KafkaConfig(
        bootstrap_servers=(kafka_bootstrap,),
        topic=unique_name,
        dlq_topic=f"{unique_name}.dlq",
        linger_ms=5,
    )
    own = f"{unique_name}-billing"
    metrics = MetricsCollector()
    r = router(routes("unused", own), cfg.topic, "unused")
    dead = DeadLetter("{bad", "invalid_json", "not JSON", "kafka in/0 offset=7", T0)
    async with KafkaSink(cfg, metrics, SystemClock(), router=r) as sink:
        await sink.write([agg("cpu.user"), agg("billing.eur"), agg("web.hits")], [dead])
        assert set(sink.written_offsets()) >= {f"{own}:0", f"{unique_name}:0"}
    assert [x["name"] for x in await topic_records(kafka_bootstrap, own)] == ["billing.eur"]
    assert [x["name"] for x in await topic_records(kafka_bootstrap, cfg.topic)] == ["web.hits"]
    assert [x["reason"] for x in await topic_records(kafka_bootstrap, cfg.dlq_topic)] == [
        "invalid_json"
    ]
    written = metrics.snapshot()["route_aggregates_written"]
    assert written == {"billing": {f"kafka:{own}": 1}, "default": {f"kafka:{unique_name}": 1}}


async def test_kafka_read_back_covers_every_routed_topic(
    kafka_bootstrap: str, unique_name: str
) -> None:
    """A run writes past its checkpoint in both topics and dies; the next one reads back
    from the checkpoint and writes only what is new, in each topic."""
    cfg = KafkaConfig(
        bootstrap_servers=(kafka_bootstrap,),
        topic=unique_name,
        dlq_topic=f"{unique_name}.dlq",
        linger_ms=5,
    )
    own = f"{unique_name}-billing"
    r = routes("unused", own)
    async with KafkaSink(
        cfg, MetricsCollector(), SystemClock(), router=router(r, cfg.topic, "x")
    ) as first:
        await first.write([agg("billing.a"), agg("web.a")], [])
        checkpoint = first.written_offsets()
        await first.write([agg("billing.b", 2), agg("web.b", 2)], [])  # then the crash
    async with KafkaSink(
        cfg, MetricsCollector(), SystemClock(), router=router(r, cfg.topic, "x")
    ) as second:
        await second.read_back(checkpoint)
        replay = [replace(agg("billing.b", 2), emitted_at=T0 + 99), agg("web.b", 2)]
        await second.write(replay, [])
        await second.write([agg("billing.b", 3, revision=2), agg("web.c")], [])
    billing = [(x["name"], x["revision"]) for x in await topic_records(kafka_bootstrap, own)]
    default = [(x["name"], x["revision"]) for x in await topic_records(kafka_bootstrap, cfg.topic)]
    assert sorted(billing) == [("billing.a", 1), ("billing.b", 1), ("billing.b", 2)]
    assert sorted(default) == [("web.a", 1), ("web.b", 1), ("web.c", 1)]


async def test_a_route_identity_in_one_topic_does_not_hide_it_in_another(
    kafka_bootstrap: str, unique_name: str
) -> None:
    """The read-back is per topic: a record found in the default topic (written before
    the route existed) does not stop the route's first write to its own topic."""
    cfg = KafkaConfig(
        bootstrap_servers=(kafka_bootstrap,),
        topic=unique_name,
        dlq_topic=f"{unique_name}.dlq",
        linger_ms=5,
    )
    own = f"{unique_name}-billing"
    r = routes("unused", own)
    async with KafkaSink(cfg, MetricsCollector(), SystemClock()) as before:
        checkpoint = before.written_offsets()
        await before.write([agg("billing.a")], [])
    async with KafkaSink(
        cfg, MetricsCollector(), SystemClock(), router=router(r, cfg.topic, "x")
    ) as routed:
        await routed.read_back({**checkpoint, f"{own}:0": 0})
        await routed.write([agg("billing.a")], [])
    assert [x["name"] for x in await topic_records(kafka_bootstrap, own)] == ["billing.a"]


async def _no_commit(positions: Mapping[str, str]) -> None:
    return None


async def test_postgres_upserts_each_route_into_its_table_with_the_checkpoint(
    postgres_dsn: str, unique_name: str, conn: Any, pg_outputs: PostgresConfig
) -> None:
    cfg = pg_outputs
    own = f"{unique_name}_hosts"
    cp_table = f"{unique_name}_cp"
    metrics = MetricsCollector()
    r = router(routes(own, "unused"), "unused", cfg.table)
    try:
        async with (
            PostgresSink(cfg, metrics, SystemClock(), router=r) as pg,
            PostgresCheckpointStore(postgres_dsn, unique_name, table=cp_table) as store,
        ):
            # start-up created the route's table with the default table's DDL
            assert await conn.fetchval("SELECT to_regclass($1) IS NOT NULL", own)
            sender = DataSender(
                [pg],
                store,
                _no_commit,
                metrics,
                SystemClock(),
                shared_transaction=SharedTransaction(pg, store),
            )
            batch = [agg("cpu.user"), agg("billing.eur"), agg("web.hits"), agg("cpu.sys")]
            await sender.handle(
                Delivery([Outputs(batch, []), Checkpoint([PartitionCheckpoint("p0", "3", b"")])])
            )
            hosts = await conn.fetch(f"SELECT name FROM {own} ORDER BY name")
            default = await conn.fetch(f"SELECT name FROM {cfg.table} ORDER BY name")
            assert [x["name"] for x in hosts] == ["cpu.sys", "cpu.user"]
            assert [x["name"] for x in default] == ["billing.eur", "web.hits"]
            written = metrics.snapshot()["route_aggregates_written"]
            assert written == {
                "hosts": {f"postgres:{own}": 2},
                "billing": {f"postgres:{cfg.table}": 1},
                "default": {f"postgres:{cfg.table}": 1},
            }

            # A checkpoint that cannot be stored takes the rows of every table with it.
            await conn.execute(f"DROP TABLE {cp_table}")
            with pytest.raises(PermanentError):
                await sender.handle(
                    Delivery(
                        [
                            Outputs([agg("cpu.new"), agg("web.new")], []),
                            Checkpoint([PartitionCheckpoint("p0", "4", b"")]),
                        ]
                    )
                )
            assert await conn.fetchval(f"SELECT count(*) FROM {own}") == 2
            assert await conn.fetchval(f"SELECT count(*) FROM {cfg.table}") == 2
            # an upsert per table: a replay of a higher revision replaces, once
            await pg.write([agg("cpu.user", 5, revision=2), agg("cpu.user", 5, revision=2)], [])
            row = await conn.fetchrow(f"SELECT count, revision FROM {own} WHERE name='cpu.user'")
            assert (row["count"], row["revision"]) == (5, 2)
    finally:
        await conn.execute(
            f"DROP TABLE IF EXISTS {cfg.table}, {own}, {cfg.dead_letter_table}, {cp_table}"
        )


async def test_migrate_creates_the_route_tables_like_the_default_table(
    postgres_dsn: str, unique_name: str, conn: Any
) -> None:
    table, own, dlq = f"{unique_name}_agg", f"{unique_name}_own", f"{unique_name}_dlq"
    try:
        await migrate(postgres_dsn, table, dlq, route_tables=[own])
        columns = """SELECT array_agg(attname::text || ':' || format_type(atttypid, atttypmod)
                     ORDER BY attnum) FROM pg_attribute WHERE attrelid = $1::regclass
                     AND attnum > 0 AND NOT attisdropped"""
        key = """SELECT pg_get_constraintdef(oid) FROM pg_constraint
                 WHERE conrelid = $1::regclass AND contype = 'p'"""
        assert await conn.fetchval(columns, own) == await conn.fetchval(columns, table)
        assert await conn.fetchval(key, own) == await conn.fetchval(key, table)
    finally:
        await conn.execute(f"DROP TABLE IF EXISTS {table}, {own}, {dlq}")


async def test_postgres_routes_series_by_their_tags(
    postgres_dsn: str, unique_name: str, conn: Any, pg_outputs: PostgresConfig
) -> None:
    """A rule with tags takes only the series carrying them: one name, two tables."""
    cfg = pg_outputs
    eu = f"{unique_name}_eu"
    rules = Routes(
        rules=(Route("eu", ("cpu.*",), ("postgres",), tags=(("region", "eu"),), postgres_table=eu),)
    )
    r = router(rules, "unused", cfg.table)
    try:
        async with PostgresSink(cfg, MetricsCollector(), SystemClock(), router=r) as pg:
            await pg.write(
                [
                    replace(agg("cpu.user"), tags={"region": "eu", "host": "a"}),
                    replace(agg("cpu.user"), tags={"region": "us", "host": "a"}),
                    replace(agg("cpu.user"), tags={}),
                ],
                [],
            )
        in_eu = await conn.fetch(f"SELECT tags::text AS t FROM {eu}")
        rest = await conn.fetch(f"SELECT tags::text AS t FROM {cfg.table}")
        assert [x["t"] for x in in_eu] == ['{"host": "a", "region": "eu"}']
        assert sorted(x["t"] for x in rest) == ['{"host": "a", "region": "us"}', "{}"]
    finally:
        await conn.execute(f"DROP TABLE IF EXISTS {cfg.table}, {eu}, {cfg.dead_letter_table}")
