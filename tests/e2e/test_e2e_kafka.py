"""The whole service as a process over the Kafka transport (consumer group, several
partitions) into Kafka and PostgreSQL, checked against an independent computation."""

from __future__ import annotations

import asyncio
from collections import Counter
from pathlib import Path

import orjson
import pytest
from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from tests.e2e.test_e2e_http import read_topic, stored_rows, wait_until
from tests.e2e.workload import (
    Key,
    ServiceProcess,
    assert_matches,
    build_workload,
    expected_aggregates,
    free_port,
)

pytestmark = [pytest.mark.e2e, pytest.mark.integration]

PARTITIONS = 3


async def produce(bootstrap: str, topic: str, messages: list[tuple[bytes | None, bytes]]) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=5)
    await producer.start()
    try:
        futures = [await producer.send(topic, value, key=key) for key, value in messages]
        await asyncio.gather(*futures)
    finally:
        await producer.stop()


async def test_kafka_to_kafka_and_postgres_matches_independent_computation(
    kafka_bootstrap: str, postgres_dsn: str, unique_name: str, tmp_path: Path
) -> None:
    workload = build_workload(seed=11)
    expected = expected_aggregates(workload.valid)
    source, table, topic = f"in-{unique_name}", f"agg_{unique_name}", f"agg-{unique_name}"
    admin = AIOKafkaAdminClient(bootstrap_servers=kafka_bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(source, PARTITIONS, 1)])
    finally:
        await admin.close()

    # keyed by name, so each name's events stay in order in one partition; late events are
    # sent later, once their windows are known to be emitted (lateness across partitions
    # depends on how far each partition was read, which no test can pin down)
    late = [m for m in workload.messages if isinstance(m, dict) and m.get("name") == "e2e.late"]
    first: list[tuple[bytes | None, bytes]] = []
    for m in workload.messages:
        if m in late:
            continue
        key = m["name"].encode() if isinstance(m.get("name"), str) else None
        first.append((key, orjson.dumps(m)))
    # one message carrying a JSON array, and messages that are not JSON at all
    first.append((b"e2e.array", orjson.dumps([{"name": "e2e.array", "value": 1}, []])))
    first.append((None, b"{not json"))
    first.append((None, b"\xff\xfe"))
    await produce(kafka_bootstrap, source, first)

    http_port = free_port()
    proc = ServiceProcess(
        {
            "VABUS_URL": f"kafka://{kafka_bootstrap}/{source}?group=g-{unique_name}"
            f"&metrics_topic=m-{unique_name}",
            "VABUS_KAFKA_SESSION_TIMEOUT_MS": "3000",
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
        },
        tmp_path,
    )
    try:

        async def all_stored() -> bool:
            return len(await stored_rows(postgres_dsn, table)) >= len(expected)

        await wait_until(all_stored, 120, "aggregates in PostgreSQL", proc)
        await produce(kafka_bootstrap, source, [(b"e2e.late", orjson.dumps(m)) for m in late])
        assert_matches(await stored_rows(postgres_dsn, table), expected, "PostgreSQL")

        messages = await read_topic(kafka_bootstrap, topic, len(expected))
        latest: dict[Key, tuple[float, int]] = {}
        for key, value in messages:
            assert key.decode() == value["name"]
            ws = _epoch(value["window_start"])
            latest[(value["name"], value["agg_func"], ws)] = (value["value"], value["count"])
        assert_matches(latest, expected, "Kafka")

        rejects: Counter[str] = Counter(workload.expected_rejects)
        rejects.update({"missing_timestamp": 1, "not_an_object": 1, "invalid_json": 2})
        dead = await read_topic(kafka_bootstrap, f"{topic}.dlq", sum(rejects.values()))
        assert Counter(v["reason"] for _, v in dead) == rejects
        assert all(v["source"].startswith(f"kafka {source}/") for _, v in dead)
        assert all(" offset=" in v["source"] for _, v in dead)

        metrics = await read_topic(kafka_bootstrap, f"m-{unique_name}", 1)
        assert any(str(v.get("name", "")).startswith("vabus_aggregator.") for _, v in metrics)
    finally:
        code = proc.terminate()
    assert code == 0, proc.log_text()[-3000:]


def _epoch(iso: str) -> float:
    from datetime import datetime

    return datetime.fromisoformat(iso).timestamp()
