"""The whole service as a process over HTTP (emulator) into Kafka and PostgreSQL,
checked against an independent computation for every function."""

from __future__ import annotations

import asyncio
from collections import Counter
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import orjson
import pytest
from aiokafka import AIOKafkaConsumer
from prometheus_client.parser import text_string_to_metric_families

from service.dev.emulator import Emulator
from tests.e2e.workload import (
    Key,
    ServiceProcess,
    assert_matches,
    build_workload,
    expected_aggregates,
    free_port,
)

pytestmark = [pytest.mark.e2e, pytest.mark.integration]


async def wait_until(cond: Any, timeout: float, what: str, proc: ServiceProcess) -> Any:
    async with asyncio.timeout(timeout):
        while True:
            assert proc.proc.poll() is None, f"service exited early:\n{proc.log_text()[-3000:]}"
            result = await cond()
            if result:
                return result
            await asyncio.sleep(0.2)


async def stored_rows(dsn: str, table: str) -> dict[Key, tuple[float, int]]:
    conn = await asyncpg.connect(dsn)
    try:
        exists = await conn.fetchval("SELECT to_regclass($1)", table)
        if exists is None:
            return {}
        rows = await conn.fetch(
            "SELECT name, agg_func, extract(epoch from window_start)::float8 AS ws, value, count"
            f' FROM "{table}"'
        )
    finally:
        await conn.close()
    return {(r["name"], r["agg_func"], r["ws"]): (r["value"], r["count"]) for r in rows}


async def read_topic(bootstrap: str, topic: str, expected_at_least: int) -> list[Any]:
    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=bootstrap,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        group_id=None,
    )
    await consumer.start()
    out: list[Any] = []
    try:
        async with asyncio.timeout(30):
            while len(out) < expected_at_least:
                batches = await consumer.getmany(timeout_ms=500)
                for msgs in batches.values():
                    out.extend((m.key, orjson.loads(m.value)) for m in msgs)
    except TimeoutError:
        raise AssertionError(f"{topic}: {len(out)} of {expected_at_least}: {out}") from None
    finally:
        await consumer.stop()
    return out


async def test_http_to_kafka_and_postgres_matches_independent_computation(
    kafka_bootstrap: str, postgres_dsn: str, unique_name: str, tmp_path: Path
) -> None:
    workload = build_workload()
    expected = expected_aggregates(workload.valid)
    table, topic = f"agg_{unique_name}", f"agg-{unique_name}"
    async with Emulator() as emulator:
        emulator.append(workload.messages)
        http_port = free_port()
        proc = ServiceProcess(
            {
                "VABUS_URL": emulator.url,
                "VABUS_WAIT": "0.5",
                "VABUS_BATCH_LIMIT": "37",  # many small batches: exercises cursors
                "STORAGE_TYPE": "kafka,postgres",
                "KAFKA_BOOTSTRAP_SERVERS": kafka_bootstrap,
                "KAFKA_TOPIC": topic,
                "POSTGRES_DSN": postgres_dsn,
                "POSTGRES_TABLE": table,
                "AGGREGATION_INTERVAL": "10",
                "AGGREGATION_IDLE_TIMEOUT": "2",
                "METRICS_INTERVAL": "1",
                "HTTP_HOST": "127.0.0.1",
                "HTTP_PORT": str(http_port),
                "STATE_DIR": str(tmp_path / "state"),
                "LOG_LEVEL": "INFO",
            },
            tmp_path,
        )
        try:

            async def all_stored() -> bool:
                return len(await stored_rows(postgres_dsn, table)) >= len(expected)

            await wait_until(all_stored, 90, "aggregates in PostgreSQL", proc)
            assert_matches(await stored_rows(postgres_dsn, table), expected, "PostgreSQL")

            messages = await read_topic(kafka_bootstrap, topic, len(expected))
            latest: dict[Key, tuple[float, int]] = {}
            for key, value in messages:
                assert key.decode() == value["name"]
                assert value["window_start"].endswith("Z") and value["emitted_at"].endswith("Z")
                ws = _epoch(value["window_start"])
                assert _epoch(value["window_end"]) == ws + 10
                latest[(value["name"], value["agg_func"], ws)] = (value["value"], value["count"])
            assert_matches(latest, expected, "Kafka")

            dead = await read_topic(
                kafka_bootstrap, f"{topic}.dlq", sum(workload.expected_rejects.values())
            )
            reasons = Counter(v["reason"] for _, v in dead)
            assert reasons == Counter(workload.expected_rejects)
            assert all(v["source"].startswith("http cursor=") for _, v in dead)
            assert all(
                set(v) >= {"raw", "reason", "detail", "source", "received_at"} for _, v in dead
            )

            async with aiohttp.ClientSession() as http:
                async with http.get(f"http://127.0.0.1:{http_port}/metrics") as r:
                    assert r.status == 200
                    families = {f.name for f in text_string_to_metric_families(await r.text())}
                assert "vabus_aggregator_events_received" in families
                async with http.get(f"http://127.0.0.1:{http_port}/readyz") as r:
                    assert r.status == 200, await r.text()
                async with http.get(f"http://127.0.0.1:{http_port}/status") as r:
                    status = await r.json()
                    assert status["phase"] == "running"

            async def metrics_arrived() -> bool:
                return any(m.get("name", "").endswith("events_received") for m in emulator.metrics)

            await wait_until(metrics_arrived, 15, "metrics on the bus", proc)
        finally:
            code = proc.terminate()
        assert code == 0, proc.log_text()[-3000:]
        assert "shutdown 5/5" in proc.log_text()


def _epoch(iso: str) -> float:
    from datetime import datetime

    return datetime.fromisoformat(iso).timestamp()
