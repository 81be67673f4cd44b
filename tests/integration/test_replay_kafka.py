"""``replay`` with the Kafka output while the service runs: a bug's wrong revisions of
one hour are superseded by the next revision from the archive (the latest record per
window then equals an independent computation), no record is added for the other
hours, and a second run writes nothing."""

from __future__ import annotations

import asyncio
import io
import math
from collections.abc import AsyncIterator
from dataclasses import replace
from datetime import datetime
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition

from service.app import Service
from service.archive.stores import DirectoryStore
from service.archive.writer import ArchiveWriter
from service.checkpoints.file import FileCheckpointStore
from service.config import AggregationConfig, Config, KafkaConfig
from service.config.archive import ArchiveConfig
from service.core.clock import ManualClock
from service.core.events import Aggregate
from service.kafka.reading import read_to_end
from service.metrics.collector import MetricsCollector
from service.replay.command import replay
from service.replay.span import ReplaySpan
from service.sinks.kafka import KafkaSink
from tests.fakes.bus import MemoryBus
from tests.integration.test_replay_postgres import HOUR2, START, archived, expected_hour2, feed

pytestmark = pytest.mark.integration

Key = tuple[str, str, float]


def seconds(text: str) -> float:
    return datetime.fromisoformat(text).timestamp()


async def topic_records(bootstrap: str, topic: str) -> list[dict[str, Any]]:
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    await consumer.start()
    out: list[dict[str, Any]] = []
    try:
        await consumer.topics()
        tps = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic))]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        await read_to_end(
            consumer, tps, lambda _, r: out.append(orjson.loads(r.value)), timeout_s=60
        )
    finally:
        await consumer.stop()
    return out


def latest(records: list[dict[str, Any]]) -> dict[Key, dict[str, Any]]:
    """The consumer rule: per window the greatest (revision, count, emitted_at)."""
    best: dict[Key, dict[str, Any]] = {}
    for r in records:
        key = (r["name"], r["agg_func"], seconds(r["window_start"]))
        seen = best.get(key)
        rank = (r["revision"], r["count"], seconds(r["emitted_at"]))
        if seen is None or rank > (seen["revision"], seen["count"], seconds(seen["emitted_at"])):
            best[key] = r
    return best


def outside(records: list[dict[str, Any]]) -> list[bytes]:
    return sorted(orjson.dumps(r, option=orjson.OPT_SORT_KEYS) for r in records if not in_hour2(r))


def in_hour2(r: dict[str, Any]) -> bool:
    return HOUR2 <= seconds(r["window_start"]) < HOUR2 + 3600


@pytest.fixture
async def running(
    kafka_bootstrap: str, unique_name: str, tmp_path: Path
) -> AsyncIterator[tuple[Config, ManualClock, list[Any]]]:
    archive = f"{tmp_path}/archive"
    config = Config(
        aggregation=AggregationConfig(interval_s=60.0),
        outputs=("kafka",),
        kafka=KafkaConfig(
            bootstrap_servers=(kafka_bootstrap,),
            topic=unique_name,
            dlq_topic=f"{unique_name}.dlq",
            linger_ms=5,
        ),
        archive=ArchiveConfig(kind="file", url=f"file://{archive}", path=archive),
    )
    feeds, events = feed()
    clock = ManualClock(START + 5 * 3600)
    metrics = MetricsCollector(clock)
    bus = MemoryBus(feeds, batch_size=25, clock=clock)
    sink = KafkaSink(config.kafka, metrics, clock)
    service = Service(
        config,
        bus=bus,
        sinks=[sink],
        read_back=[sink],
        store=FileCheckpointStore(str(tmp_path / "state"), "test"),
        metrics=metrics,
        clock=clock,
        serve_http=False,
        archive=ArchiveWriter(DirectoryStore(archive), metrics),
    )
    total = {p: len(r) for p, r in feeds.items()}
    task = asyncio.create_task(service.run())
    try:
        async with asyncio.timeout(90):
            while any(bus.positions.get(p) != n for p, n in total.items()) or (
                archived(Path(archive)) < len(events) + 2
            ):
                assert not task.done(), task.exception()
                clock.advance(1.0)
                await asyncio.sleep(0.02)
        yield config, clock, events
    finally:
        service.request_stop()
        await asyncio.wait_for(task, 30)


async def test_wrong_revisions_of_an_hour_are_superseded_and_a_second_run_writes_nothing(
    running: tuple[Config, ManualClock, list[Any]], kafka_bootstrap: str
) -> None:
    config, clock, events = running
    topic = config.kafka.topic
    before = await topic_records(kafka_bootstrap, topic)
    assert len(before) > 1000 and all(r["revision"] == 1 for r in before)
    # a bug wrote wrong revisions for hour 2: n0's values, n1's counts
    wrong = [
        Aggregate(
            r["name"], r["agg_func"],
            r["value"] + (1.0 if r["name"] == "n0" else 0.0),
            r["count"] + (1 if r["name"] == "n1" else 0),
            seconds(r["window_start"]), seconds(r["window_end"]), clock.now(), None, 2,
        )
        for r in before
        if in_hour2(r) and r["name"] in ("n0", "n1")
    ]  # fmt: skip
    async with KafkaSink(config.kafka, MetricsCollector(), clock) as bug:
        await bug.write(wrong, ())
    span = ReplaySpan(HOUR2, HOUR2 + 3600)
    summary = await replay(config, span, clock=clock, err=io.StringIO(), tty=False)
    assert (summary.changed, summary.new, summary.skipped_open) == (len(wrong), 0, 0)
    assert summary.written == {f"kafka:{topic}": len(wrong)}
    after = await topic_records(kafka_bootstrap, topic)
    assert len(after) == len(before) + 2 * len(wrong)
    assert outside(after) == outside(before)  # not one record more for the other hours
    now = latest([r for r in after if in_hour2(r)])
    want = expected_hour2(events)
    assert set(now) == set(want)
    for key, (value, count) in want.items():
        r = now[key]
        assert r["count"] == count and math.isclose(r["value"], value, rel_tol=1e-12, abs_tol=1e-9)
        assert r["revision"] == (3 if key[0] in ("n0", "n1") else 1), key
    again = await replay(config, span, clock=clock, err=io.StringIO(), tty=False)
    assert (again.changed, again.new, sum(again.written.values())) == (0, 0, 0)
    assert len(await topic_records(kafka_bootstrap, topic)) == len(after)


async def test_with_lateness_the_still_correctable_windows_are_not_written(
    running: tuple[Config, ManualClock, list[Any]], kafka_bootstrap: str
) -> None:
    config, clock, _ = running
    late = replace(config, aggregation=replace(config.aggregation, allowed_lateness_s=3 * 3600.0))
    summary = await replay(late, ReplaySpan(HOUR2, HOUR2 + 3600), clock=clock, err=io.StringIO())
    assert summary.windows > 100 and summary.skipped_open == summary.windows
    assert not summary.written
