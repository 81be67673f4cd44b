"""The archive (ARCHIVE_URL) across ``kill -9``: a live feed over four Kafka partitions,
the service killed at seeded random moments; afterwards the archive holds every accepted
input event exactly once (the Parquet files read back with pyarrow and compared with the
input), and none of the dead letters — in a directory and in an S3 bucket (moto).

``FAULT_SEED`` replays or explores other kill moments; ``ARCHIVE_CYCLES`` and
``ARCHIVE_EVENTS`` scale the run.
"""

from __future__ import annotations

import asyncio
import math
import os
import random
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from tests.archived import S3_ENV, Row, archive_rows, moto_s3, s3_rows
from tests.fault.harness import (
    Incarnation,
    Stream,
    build_stream,
    create_topic,
    feed_kafka,
    seed_from_env,
    service_env,
    wait_for,
)

pytestmark = [pytest.mark.integration, pytest.mark.e2e]

CYCLES = int(os.environ.get("ARCHIVE_CYCLES", "6"))
EVENTS = int(os.environ.get("ARCHIVE_EVENTS", "50000"))


def across_an_hour(stream: Stream) -> Stream:
    """The stream moved back in event time so that it spans an hour boundary: files
    of one slice then lie in two hour directories (the replay pitfall)."""
    first = min(e["timestamp"] for e in stream.valid)
    shift = first - (math.ceil(first / 3600) * 3600 - 40.0)

    def moved(ev: Any) -> Any:
        if isinstance(ev, dict) and type(ev.get("timestamp")) is float:
            return {**ev, "timestamp": round(ev["timestamp"] - shift, 3)}
        return ev

    messages = [(key, orjson.dumps(moved(orjson.loads(value)))) for key, value in stream.messages]
    return Stream(messages, [moved(e) for e in stream.valid], stream.rejects)


def expected_rows(stream: Stream) -> Counter[Row]:
    return Counter(
        (e["name"], e["agg_func"], float(e["value"]), round(e["timestamp"] * 1_000_000), None)
        for e in stream.valid
    )


@pytest.fixture
def s3() -> Iterator[tuple[Any, str]]:
    with moto_s3() as server:
        yield server


async def run_kill_cycles(
    env: dict[str, str],
    workdir: Path,
    stream: Stream,
    read: Callable[[], Counter[Row]],
    bootstrap: str,
    source: str,
    cycles: int,
) -> list[str]:
    """Feed ``stream`` live while the service is killed ``cycles`` times; then a last
    incarnation runs until the archive holds as many events as were accepted, and stops
    gracefully. Returns a line per kill for the report."""
    rng = random.Random(seed_from_env(19))
    feeder = asyncio.create_task(feed_kafka(bootstrap, source, stream, rate=1500))
    kills = []
    try:
        for cycle in range(cycles):
            inc = Incarnation(env, workdir, cycle)
            if rng.random() < 0.2 or feeder.done():  # maybe during start-up: connecting,
                await asyncio.sleep(rng.uniform(0.3, 4.0))  # restoring, joining, reading
            else:  # mid-processing, after some events and maybe some archive files
                await inc.wait_events(1, timeout=60)
                await asyncio.sleep(rng.uniform(0.0, 2.0))
            st = await inc.status()
            inc.kill9()
            got = 0 if st is None else st.get("events_received", 0)
            kills.append(f"kill {cycle}: {got} events in, archive {sum(read().values())} rows")
        await asyncio.wait_for(feeder, 120)
    finally:
        feeder.cancel()
    final = Incarnation(env, workdir, cycles)
    try:

        async def archived_all() -> bool:
            st = await final.status()
            return bool(st) and sum(read().values()) >= len(stream.valid)

        await wait_for(archived_all, 120, "every accepted event archived", final.proc)
    finally:
        code = final.terminate()
    assert code == 0, final.proc.log_text()[-3000:]
    return kills


def assert_exactly_once(got: Counter[Row], want: Counter[Row]) -> None:
    missing, extra = want - got, got - want
    assert not missing and not extra, (
        f"{sum(missing.values())} accepted events missing from the archive, e.g. "
        f"{list(missing)[:3]}; {sum(extra.values())} extra (duplicates or dead letters), "
        f"e.g. {list(extra)[:3]}"
    )


def kafka_env(bootstrap: str, unique_name: str, tmp_path: Path, archive: str) -> dict[str, str]:
    source, topic = f"in-{unique_name}", f"agg-{unique_name}"
    return service_env(
        bus_url=f"kafka://{bootstrap}/{source}?group=g-{unique_name}&metrics_topic=m-{unique_name}",
        storage="kafka",
        kafka_bootstrap=bootstrap,
        topic=topic,
        state_dir=tmp_path / "state",
        extra={"ARCHIVE_URL": archive},
    )


@pytest.mark.timeout(420)
async def test_kill9_cycles_leave_every_accepted_event_once_in_an_archive_directory(
    kafka_bootstrap: str, unique_name: str, tmp_path: Path
) -> None:
    started = time.monotonic()
    stream = across_an_hour(build_stream(seed_from_env(19), EVENTS, late_every=701))
    source = f"in-{unique_name}"
    await create_topic(kafka_bootstrap, source)
    root = tmp_path / "archive"
    env = kafka_env(kafka_bootstrap, unique_name, tmp_path, f"file://{root}")
    kills = await run_kill_cycles(
        env, tmp_path, stream, lambda: archive_rows(root), kafka_bootstrap, source, CYCLES
    )
    assert_exactly_once(archive_rows(root), expected_rows(stream))
    files = len(list(root.rglob("*.parquet")))
    assert len({p.parent.name for p in root.rglob("*.parquet")}) == 2  # two hours
    print(
        f"\n[archive] directory: {len(stream.valid)} accepted events (+ "
        f"{sum(stream.rejects.values())} dead letters) exactly once in {files} files "
        f"after {CYCLES} kill -9 cycles, {time.monotonic() - started:.0f} s"
    )
    for line in kills:
        print(f"[archive]   {line}")


@pytest.mark.timeout(420)
async def test_kill9_cycles_leave_every_accepted_event_once_in_an_s3_archive(
    kafka_bootstrap: str, unique_name: str, tmp_path: Path, s3: tuple[Any, str]
) -> None:
    client, endpoint = s3
    bucket, prefix = "raw-events", f"vabus/{unique_name}"
    client.create_bucket(Bucket=bucket)
    stream = across_an_hour(build_stream(seed_from_env(23), EVENTS // 2, late_every=701))
    source = f"in-{unique_name}"
    await create_topic(kafka_bootstrap, source)
    env = kafka_env(kafka_bootstrap, unique_name, tmp_path, f"s3://{bucket}/{prefix}")
    env.update(S3_ENV, AWS_ENDPOINT_URL=endpoint)
    cycles = max(2, CYCLES // 2)
    kills = await run_kill_cycles(
        env,
        tmp_path,
        stream,
        lambda: s3_rows(client, bucket, prefix + "/"),
        kafka_bootstrap,
        source,
        cycles,
    )
    assert_exactly_once(s3_rows(client, bucket, prefix + "/"), expected_rows(stream))
    print(f"\n[archive] s3: {len(stream.valid)} accepted events exactly once, {cycles} kills")
    for line in kills:
        print(f"[archive]   {line}")


@pytest.mark.timeout(420)
async def test_hand_offs_between_instances_and_a_kill9_keep_every_event_once(
    kafka_bootstrap: str, unique_name: str, tmp_path: Path
) -> None:
    """Two, then three instances in one consumer group share the partitions: each join
    hands partitions over (the old owner archives and checkpoints them first), and the
    ``kill -9`` of one hands its partitions over from their last checkpoints."""
    stream = across_an_hour(build_stream(seed_from_env(29), EVENTS // 2, late_every=701))
    source = f"in-{unique_name}"
    await create_topic(kafka_bootstrap, source)
    root = tmp_path / "archive"
    env = kafka_env(kafka_bootstrap, unique_name, tmp_path, f"file://{root}")
    feeder = asyncio.create_task(feed_kafka(kafka_bootstrap, source, stream, rate=1500))
    running: list[Incarnation] = []
    try:
        first = Incarnation(env, tmp_path, 0)
        running.append(first)
        await first.wait_events(1, timeout=60)
        running.append(Incarnation(env, tmp_path, 1))  # joins: a hand-off
        await running[1].wait_events(1, timeout=60)
        await asyncio.sleep(1.5)
        first.kill9()  # its partitions go over from their checkpoints
        running.remove(first)
        running.append(Incarnation(env, tmp_path, 2))  # joins: another hand-off
        await asyncio.wait_for(feeder, 120)

        async def archived_all() -> bool:
            return sum(archive_rows(root).values()) >= len(stream.valid)

        await wait_for(archived_all, 120, "every accepted event archived", running[0].proc)
    finally:
        feeder.cancel()
        codes = [inc.terminate() for inc in running]
    assert codes == [0] * len(running), [inc.proc.log_text()[-2000:] for inc in running]
    assert_exactly_once(archive_rows(root), expected_rows(stream))
    print(f"\n[archive] hand-offs: {len(stream.valid)} accepted events exactly once")
