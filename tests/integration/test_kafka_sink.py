"""KafkaSink against a real broker: message schema, keys, partitions, topics, errors."""

from __future__ import annotations

import asyncio
import base64
import re
import socket
from collections.abc import AsyncIterator
from dataclasses import replace
from types import MappingProxyType
from typing import Any

import orjson
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.partitioner import DefaultPartitioner

from service.config import KafkaConfig
from service.core.clock import SystemClock
from service.core.errors import PermanentError, TransientError
from service.core.events import Aggregate, DeadLetter
from service.metrics.collector import MetricsCollector
from service.sinks.kafka import KafkaSink, encode_aggregates

pytestmark = pytest.mark.integration

T0 = 1_700_000_040.0
ISO_Z = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z")


def agg(name: str, value: float = 1.0, count: int = 1, start: float = T0) -> Aggregate:
    return Aggregate(
        name=name,
        agg_func="avg",
        value=value,
        count=count,
        window_start=start,
        window_end=start + 60,
        emitted_at=start + 61.5,
    )


def config(bootstrap: str, topic: str) -> KafkaConfig:
    return KafkaConfig(
        bootstrap_servers=(bootstrap,), topic=topic, dlq_topic=f"{topic}.dlq", linger_ms=5
    )


async def consume(bootstrap: str, topic: str, n: int, timeout_s: float = 30.0) -> list[Any]:
    """The first ``n`` records of ``topic`` (all partitions); fails after the deadline."""
    consumer = AIOKafkaConsumer(
        topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest", enable_auto_commit=False
    )
    await consumer.start()
    records: list[Any] = []
    try:
        async with asyncio.timeout(timeout_s):
            while len(records) < n:
                batches = await consumer.getmany(timeout_ms=500)
                for batch in batches.values():
                    records.extend(batch)
    finally:
        await consumer.stop()
    return records


@pytest.fixture
async def sink(kafka_bootstrap: str, unique_name: str) -> AsyncIterator[KafkaSink]:
    async with KafkaSink(
        config(kafka_bootstrap, unique_name), MetricsCollector(), SystemClock()
    ) as s:
        yield s


async def test_aggregates_are_keyed_by_name_and_carry_exactly_the_contract_fields(
    sink: KafkaSink, kafka_bootstrap: str, unique_name: str
) -> None:
    await sink.write([agg("cpu.load", 0.5, 4), agg("héllo wörld", -2.0, 1)], [])

    records = await consume(kafka_bootstrap, unique_name, 2)
    by_key = {r.key: orjson.loads(r.value) for r in records}
    assert by_key == {
        b"cpu.load": {
            "name": "cpu.load",
            "agg_func": "avg",
            "value": 0.5,
            "count": 4,
            "window_start": "2023-11-14T22:14:00.000Z",
            "window_end": "2023-11-14T22:15:00.000Z",
            "emitted_at": "2023-11-14T22:15:01.500Z",
            "revision": 1,
        },
        "héllo wörld".encode(): {
            "name": "héllo wörld",
            "agg_func": "avg",
            "value": -2.0,
            "count": 1,
            "window_start": "2023-11-14T22:14:00.000Z",
            "window_end": "2023-11-14T22:15:00.000Z",
            "emitted_at": "2023-11-14T22:15:01.500Z",
            "revision": 1,
        },
    }
    times = ("window_start", "window_end", "emitted_at")
    assert all(ISO_Z.fullmatch(m[t]) for m in by_key.values() for t in times)


def test_the_fast_encoder_writes_the_contract_json() -> None:
    aggregates = [
        agg("cpu", 0.1 + 0.2, 3),
        agg("x" * 200, -1e300, 0, start=T0 + 0.001),
        replace(agg("cpu", 2.0, 9), revision=3, tags=MappingProxyType({"host": "a"})),
        replace(agg("lat", 0.5, 2), agg_func="p99", tags={}, sketch=b"\x00\x01\xff"),
    ]

    assert encode_aggregates(aggregates) == (
        [(a.name.encode(), orjson.dumps(a.to_json_obj())) for a in aggregates],
        [],
    )


async def test_tags_revision_and_sketch_are_written_when_set(
    sink: KafkaSink, kafka_bootstrap: str, unique_name: str
) -> None:
    tagged = replace(
        agg("lat", 0.5, 2),
        agg_func="p99",
        tags={"host": "h\u00e9\u2028\"'\\", "region": "\U0001f600"},
        revision=2,
        sketch=bytes(range(256)),
    )
    await sink.write([tagged, agg("cpu")], [])

    records = await consume(kafka_bootstrap, unique_name, 2)
    by_key = {r.key: orjson.loads(r.value) for r in records}
    assert by_key[b"lat"]["tags"] == {"host": "h\u00e9\u2028\"'\\", "region": "\U0001f600"}
    assert by_key[b"lat"]["revision"] == 2
    assert base64.b64decode(by_key[b"lat"]["sketch"], validate=True) == bytes(range(256))
    assert "tags" not in by_key[b"cpu"] and "sketch" not in by_key[b"cpu"]
    assert by_key[b"cpu"]["revision"] == 1


def test_an_aggregate_utf8_cannot_carry_is_refused_by_the_encoder_not_raised() -> None:
    bad = agg("lone \ud800 surrogate")

    records, refused = encode_aggregates([agg("ok"), bad])

    assert [k for k, _ in records] == [b"ok"]
    assert [a for a, _ in refused] == [bad]


async def test_an_unencodable_aggregate_is_dead_lettered_and_the_rest_delivered(
    sink: KafkaSink, kafka_bootstrap: str, unique_name: str
) -> None:
    await sink.write([agg("good"), agg("bad \udcff name")], [])

    [record] = await consume(kafka_bootstrap, unique_name, 1)
    assert record.key == b"good"
    [letter] = await consume(kafka_bootstrap, f"{unique_name}.dlq", 1)
    value = orjson.loads(letter.value)
    assert letter.key == b"invalid_value" and value["reason"] == "invalid_value"
    assert "\\udcff" in value["raw"] and value["source"] == f"sink:kafka:{unique_name}"


async def test_dead_letters_go_to_the_dlq_topic_with_every_contract_field(
    sink: KafkaSink, kafka_bootstrap: str, unique_name: str
) -> None:
    letter = DeadLetter(
        raw='{"name": "x", "value": "NaN"}',
        reason="invalid_value",
        detail="value must be finite",
        source="kafka:events/2@99",
        received_at=T0 + 0.25,
    )

    await sink.write([], [letter])

    [record] = await consume(kafka_bootstrap, f"{unique_name}.dlq", 1)
    assert record.key == b"invalid_value"
    assert orjson.loads(record.value) == {
        "raw": '{"name": "x", "value": "NaN"}',
        "reason": "invalid_value",
        "detail": "value must be finite",
        "source": "kafka:events/2@99",
        "received_at": "2023-11-14T22:14:00.250Z",
    }


async def test_every_record_of_a_large_write_is_delivered_and_one_name_keeps_one_partition(
    sink: KafkaSink, kafka_bootstrap: str, unique_name: str
) -> None:
    names = [f"metric-{i}" for i in range(500)]
    batch = [agg(name, start=T0 + 60 * w) for w in range(10) for name in names]

    await sink.write(batch, [])

    records = await consume(kafka_bootstrap, unique_name, len(batch))
    assert len(records) == len(batch)
    partitions_of: dict[bytes, set[int]] = {}
    for r in records:
        partitions_of.setdefault(r.key, set()).add(r.partition)
    assert all(len(p) == 1 for p in partitions_of.values())
    # Same placement as the Java client's default partitioner, so mixed producers agree.
    partitioner = DefaultPartitioner()
    assert all(p == {partitioner(key, [0, 1, 2], [0, 1, 2])} for key, p in partitions_of.items())
    assert len({p for ps in partitions_of.values() for p in ps}) == 3


async def test_start_creates_both_topics_and_accepts_them_when_they_exist(
    kafka_bootstrap: str, unique_name: str
) -> None:
    cfg = config(kafka_bootstrap, unique_name)
    async with (
        KafkaSink(cfg, MetricsCollector(), SystemClock()),
        KafkaSink(cfg, MetricsCollector(), SystemClock()) as second,
    ):
        await second.check()

    admin = AIOKafkaAdminClient(bootstrap_servers=kafka_bootstrap)
    await admin.start()
    try:
        topics = await admin.describe_topics([unique_name, f"{unique_name}.dlq"])
    finally:
        await admin.close()
    assert [(t["topic"], t["error_code"], len(t["partitions"])) for t in topics] == [
        (unique_name, 0, 3),
        (f"{unique_name}.dlq", 0, 3),
    ]


async def test_a_record_over_the_request_size_limit_is_a_permanent_error_naming_the_setting(
    kafka_bootstrap: str, unique_name: str
) -> None:
    cfg = replace(config(kafka_bootstrap, unique_name), max_request_size=300)
    async with KafkaSink(cfg, MetricsCollector(), SystemClock()) as sink:
        with pytest.raises(PermanentError, match="KAFKA_MAX_REQUEST_SIZE"):
            await sink.write([agg("x" * 200)], [])


async def test_a_dead_letter_over_the_request_size_limit_is_delivered_with_raw_cut(
    kafka_bootstrap: str, unique_name: str
) -> None:
    cfg = replace(config(kafka_bootstrap, unique_name), max_request_size=4096)
    letter = DeadLetter(
        raw="x" * 10_000, reason="too_large", detail="", source="http:cursor=1", received_at=T0
    )
    async with KafkaSink(cfg, MetricsCollector(), SystemClock()) as sink:
        await sink.write([agg("cpu")], [letter])

    [record] = await consume(kafka_bootstrap, f"{unique_name}.dlq", 1)
    assert len(record.value) <= 4096
    raw = orjson.loads(record.value)["raw"]
    assert raw.startswith("xxx") and raw.endswith("...[truncated]")


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_an_unreachable_broker_is_a_transient_error_naming_the_servers(
    unique_name: str,
) -> None:
    servers = f"127.0.0.1:{_closed_port()}"

    with pytest.raises(TransientError, match=re.escape(servers)):
        await KafkaSink(config(servers, unique_name), MetricsCollector(), SystemClock()).start()


async def test_check_passes_while_the_broker_answers_metadata(sink: KafkaSink) -> None:
    await sink.check()


async def test_check_on_a_stopped_sink_is_a_transient_error(sink: KafkaSink) -> None:
    await sink.stop()

    with pytest.raises(TransientError, match="not started"):
        await sink.check()


async def test_after_a_read_back_a_replay_writes_nothing_twice(
    kafka_bootstrap: str, unique_name: str
) -> None:
    """A run writes past its checkpoint and dies; the next one reads back from the
    checkpoint's offsets and writes only what is new (a replay stamps new times)."""
    cfg = config(kafka_bootstrap, unique_name)
    dead = DeadLetter("{bad", "invalid_json", "not JSON", "kafka in/0 offset=7", T0)
    async with KafkaSink(cfg, MetricsCollector(), SystemClock()) as first:
        await first.write([agg("before")], [])
        checkpoint = first.written_offsets()  # the checkpoint is taken here
        await first.write([agg("a", 2.0, 3), agg("b", 5.0, 1)], [dead])  # then the crash
    async with KafkaSink(cfg, MetricsCollector(), SystemClock()) as second:
        await second.read_back(checkpoint)
        replayed = [replace(agg("a", 2.0, 3), emitted_at=T0 + 99), agg("b", 5.0, 1)]
        await second.write(replayed, [replace(dead, received_at=T0 + 99)])
        await second.write([agg("a", 2.0, 3)], [])  # a second replay: still skipped
        await second.write([agg("c")], [])
    records = await consume(kafka_bootstrap, cfg.topic, 4)
    seen = [(orjson.loads(r.value)["name"], orjson.loads(r.value)["count"]) for r in records]
    assert sorted(seen) == [("a", 3), ("b", 1), ("before", 1), ("c", 1)]
    assert len(await consume(kafka_bootstrap, cfg.dlq_topic, 1)) == 1


def identities(records: list[Any]) -> list[tuple[Any, ...]]:
    values = [orjson.loads(r.value) for r in records]
    return sorted(
        (v["name"], sorted(v.get("tags", {}).items()), v["revision"], v["count"]) for v in values
    )


async def test_each_revision_is_written_once_across_a_restart(
    kafka_bootstrap: str, unique_name: str
) -> None:
    """Revision 1 before the checkpoint, revision 2 and a tagged series after it, then
    the crash; the replay recomputes the last two and goes on to revision 3."""
    cfg = config(kafka_bootstrap, unique_name)
    eu = {"region": "eu", "host": "é"}
    first_rev = agg("cpu", 1.0, 2)
    second_rev = replace(agg("cpu", 2.0, 3), revision=2)
    tagged = replace(agg("cpu", 7.0, 1), tags=eu)
    async with KafkaSink(cfg, MetricsCollector(), SystemClock()) as first:
        await first.write([first_rev], [])
        checkpoint = first.written_offsets()
        await first.write([second_rev, tagged], [])
    async with KafkaSink(cfg, MetricsCollector(), SystemClock()) as second:
        await second.read_back(checkpoint)
        await second.write([replace(second_rev, emitted_at=T0 + 99), tagged], [])
        other_series = replace(agg("cpu", 7.0, 1), tags={**eu, "host": "e"})
        await second.write([replace(agg("cpu", 3.0, 4), revision=3), other_series], [])

    records = await consume(kafka_bootstrap, cfg.topic, 5)
    assert identities(records) == [
        ("cpu", [], 1, 2),
        ("cpu", [], 2, 3),
        ("cpu", [], 3, 4),
        ("cpu", [("host", "e"), ("region", "eu")], 1, 1),
        ("cpu", [("host", "é"), ("region", "eu")], 1, 1),
    ]


async def test_records_of_the_previous_release_are_not_written_again_after_an_upgrade(
    kafka_bootstrap: str, unique_name: str
) -> None:
    """v1.2 wrote ``revision`` = count and died past its checkpoint; this release
    replays those windows from the v1.2 checkpoint as revision 1."""
    cfg = config(kafka_bootstrap, unique_name)
    async with KafkaSink(cfg, MetricsCollector(), SystemClock()) as sink:
        checkpoint = sink.written_offsets()
    v12 = [{**a.to_json_obj(), "revision": a.count} for a in (agg("a", 2.0, 3), agg("b"))]
    producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap)
    await producer.start()
    try:
        for value in v12:
            await producer.send_and_wait(cfg.topic, orjson.dumps(value), key=value["name"].encode())
    finally:
        await producer.stop()

    async with KafkaSink(cfg, MetricsCollector(), SystemClock()) as upgraded:
        await upgraded.read_back(checkpoint)
        await upgraded.write([agg("a", 2.0, 3), agg("b")], [])  # the replay: nothing new
        await upgraded.write([replace(agg("a", 2.5, 4), revision=2)], [])  # a correction

    records = await consume(kafka_bootstrap, cfg.topic, 3)
    assert identities(records) == [("a", [], 2, 4), ("a", [], 3, 3), ("b", [], 1, 1)]


async def test_written_offsets_cover_every_output_partition_and_move_with_acks(
    sink: KafkaSink, unique_name: str
) -> None:
    before = sink.written_offsets()
    assert set(before) == {
        f"{t}:{p}" for t in (unique_name, f"{unique_name}.dlq") for p in range(3)
    }
    await sink.write([agg(f"n{i}") for i in range(30)], [])
    after = sink.written_offsets()
    moved = sum(after[k] - before[k] for k in before)
    assert moved == 30
