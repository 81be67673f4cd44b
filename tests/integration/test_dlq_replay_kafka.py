"""``dlq replay`` with the Kafka output only: the dead letters are read from the
dead-letter topic and marked in ``<dlq topic>.replayed``. With the limits raised, the
latest record of every window equals an independent computation including the redriven
events; each dead letter has a "done" marker holding its counts; a second run adds
nothing; a run killed after the archive write is finished by the next, exactly."""

from __future__ import annotations

import asyncio
import io
import math
from collections.abc import AsyncIterator
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
from service.dlq.command import dlq_replay
from service.dlq.kafka import MARKER_SUFFIX
from service.kafka.reading import read_to_end
from service.metrics.collector import MetricsCollector
from service.sinks.kafka import KafkaSink
from tests.archived import archive_rows
from tests.fakes.bus import MemoryBus
from tests.integration.test_dlq_replay_postgres import SMALL, Feed, expected, raised
from tests.integration.test_replay_kafka import latest, seconds, topic_records

pytestmark = pytest.mark.integration

START = 1_699_999_200.0
END = START + 2 * 3600  # the second hour's end: later windows may still be open

Setup = tuple[Config, ManualClock, Feed]


@pytest.fixture
async def running(kafka_bootstrap: str, unique_name: str, tmp_path: Path) -> AsyncIterator[Setup]:
    archive = f"{tmp_path}/archive"
    config = Config(
        bus=SMALL,
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
    feed = Feed()
    clock = ManualClock(START + 5 * 3600)
    metrics = MetricsCollector(clock)
    bus = MemoryBus(feed.records, batch_size=25, clock=clock)
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
    total = {p: len(r) for p, r in feed.records.items()}
    task = asyncio.create_task(service.run())
    try:
        async with asyncio.timeout(90):
            while (
                any(bus.positions.get(p) != n for p, n in total.items())
                or (sum(archive_rows(Path(archive)).values()) if Path(archive).exists() else 0)
                < len(feed.first) + 2
            ):
                assert not task.done(), task.exception()
                clock.advance(1.0)
                await asyncio.sleep(0.02)
        yield config, clock, feed
    finally:
        service.request_stop()
        await asyncio.wait_for(task, 30)


async def markers(bootstrap: str, topic: str) -> dict[str, Any]:
    """The latest marker per key."""
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    await consumer.start()
    out: dict[str, Any] = {}
    try:
        await consumer.topics()
        tps = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic))]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)

        def keep(_: Any, r: Any) -> None:
            out[r.key.decode()] = orjson.loads(r.value)

        await read_to_end(consumer, tps, keep, timeout_s=60)
    finally:
        await consumer.stop()
    return out


def assert_exact(records: list[dict[str, Any]], feed: Feed) -> None:
    got = latest([r for r in records if r["name"] != "zz" and seconds(r["window_end"]) <= END])
    want = {k[:3]: v for k, v in expected(feed.first + feed.redriven).items()}
    assert set(got) == set(want)
    for key, (value, count) in want.items():
        r = got[key]
        assert r["count"] == count, key
        assert math.isclose(r["value"], value, rel_tol=1e-12, abs_tol=1e-9), (key, r)


async def test_raised_limits_redrive_the_dlq_topic_exactly_once(
    running: Setup, kafka_bootstrap: str
) -> None:
    config, clock, feed = running
    letters = feed.big + feed.past
    before = await topic_records(kafka_bootstrap, config.kafka.topic)
    summary = await dlq_replay(raised(config), "too_large", None, clock=clock, err=io.StringIO())
    assert (summary.selected, summary.accepted, summary.events) == (
        letters,
        letters,
        len(feed.redriven),
    )
    assert summary.written and not summary.failed and summary.deferred == 0
    after = await topic_records(kafka_bootstrap, config.kafka.topic)
    assert len(after) == len(before) + sum(summary.written.values())
    assert_exact(after, feed)
    marks = await markers(kafka_bootstrap, config.kafka.dlq_topic + MARKER_SUFFIX)
    assert len(marks) == letters
    assert {m["state"] for m in marks.values()} == {"done"}
    assert sum(m["counts"]["redriven:accepted"] for m in marks.values()) == len(feed.redriven)
    again = await dlq_replay(raised(config), "too_large", None, clock=clock, err=io.StringIO())
    assert (again.selected, again.skipped, again.events, again.windows) == (0, letters, 0, 0)
    assert len(await topic_records(kafka_bootstrap, config.kafka.topic)) == len(after)


class Crash(Exception):
    pass


async def test_a_run_killed_after_the_archive_write_is_finished_by_the_next(
    running: Setup, kafka_bootstrap: str
) -> None:
    config, clock, feed = running

    def crash(step: str) -> None:
        if step == "archived":
            raise Crash(step)

    with pytest.raises(Crash):
        await dlq_replay(raised(config), "too_large", None, clock=clock, step=crash)
    marks = await markers(kafka_bootstrap, config.kafka.dlq_topic + MARKER_SUFFIX)
    assert {m["state"] for m in marks.values()} == {"pending"}
    rerun = await dlq_replay(raised(config), "too_large", None, clock=clock, err=io.StringIO())
    assert rerun.resumed == 1 and rerun.selected == 0
    assert_exact(await topic_records(kafka_bootstrap, config.kafka.topic), feed)
    marks = await markers(kafka_bootstrap, config.kafka.dlq_topic + MARKER_SUFFIX)
    assert {m["state"] for m in marks.values()} == {"done"}
    assert sum(m["counts"]["redriven"] for m in marks.values()) == len(feed.redriven)
