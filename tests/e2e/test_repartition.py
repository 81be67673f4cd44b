"""``repartition=true``: input NOT keyed by name (each name spread over every partition),
fed live to two instances of one group, one of them killed with ``kill -9`` halfway and
not restarted. The routing stage sends every event by name through the internal topic,
so the windows are whole; replays of the routing stage are dropped, so none counts
twice."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from service.bus.repartition import internal_topic
from tests.e2e.test_e2e_http import stored_rows
from tests.e2e.workload import assert_matches
from tests.fault.harness import (
    Incarnation,
    build_stream,
    create_topic,
    feed_kafka,
    read_output_topic,
    service_env,
    wait_for,
)

pytestmark = [pytest.mark.e2e, pytest.mark.integration]

EVENTS = 40_000
RATE = 2_000.0


@pytest.mark.timeout(180)
async def test_unkeyed_input_over_two_instances_one_killed_is_exact(
    kafka_bootstrap: str, postgres_dsn: str, unique_name: str, tmp_path: Path
) -> None:
    stream = build_stream(7, EVENTS)
    # unkeyed: the feeder spreads messages with no key over the partitions round-robin
    stream.messages = [(None, value) for _, value in stream.messages]
    expected = stream.expected
    source, table, topic = f"in-{unique_name}", f"agg_{unique_name}", f"agg-{unique_name}"
    group = f"g-{unique_name}"
    await create_topic(kafka_bootstrap, source)
    env = service_env(
        bus_url=f"kafka://{kafka_bootstrap}/{source}?group={group}&repartition=true",
        storage="kafka,postgres",
        kafka_bootstrap=kafka_bootstrap,
        topic=topic,
        state_dir=tmp_path / "state",
        postgres_dsn=postgres_dsn,
        table=table,
        # the grace must cover a hand-off of the routing stage (README, "Unkeyed input"):
        # here ~3 s of wall time while event time runs 4x faster
        extra={"AGGREGATION_GRACE": "30"},
    )
    a, b = Incarnation(env, tmp_path, 0), Incarnation(env, tmp_path, 1)
    try:

        async def both_assigned() -> bool:
            states = [await a.status(), await b.status()]
            return all(s and s.get("partitions") for s in states)

        await wait_for(both_assigned, 60, "both instances holding internal partitions")
        feeder = asyncio.create_task(feed_kafka(kafka_bootstrap, source, stream, RATE))
        await b.wait_events(EVENTS // 4, timeout=90)  # b holds about half the partitions
        b.kill9()
        await asyncio.wait_for(feeder, 120)

        async def all_rows() -> bool:
            return len(await stored_rows(postgres_dsn, table)) >= len(expected)

        await wait_for(all_rows, 120, "every aggregate in PostgreSQL", a.proc)
        assert_matches(await stored_rows(postgres_dsn, table), expected, "PostgreSQL")
        out = await read_output_topic(kafka_bootstrap, topic, expected)
        assert_matches(out.latest, expected, "Kafka (last value per key)")
        final = await a.status()
        assert final is not None
        parts = final["partitions"]
        assert all(p.startswith(internal_topic(group)) for p in parts), parts
        print(
            f"\n[repartition] {len(stream.valid)} unkeyed events exact over 2 instances "
            f"(one kill -9ed); replays dropped by the survivor: "
            f"{final.get('replays_dropped')}"
        )
    finally:
        if b.proc.proc.poll() is None:  # the test failed before the kill
            b.kill9()
        code = a.terminate()
    assert code == 0, a.proc.log_text()[-3000:]
