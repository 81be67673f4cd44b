"""kill -9 at seeded random moments, at least 10 times per transport, during a stream of
100k valid events (plus invalid and late ones); the final stored aggregates must equal an
independent computation exactly, and the Kafka topics hold each aggregate and each
dead letter once: a restart reads back what the dead run wrote past its checkpoint (the
PostgreSQL dead-letter table too: its rows carry a natural key).

* Kafka bus (4 partitions, keyed by name) -> Kafka + PostgreSQL; checkpoints in PostgreSQL.
* HTTP bus (emulator, cursors) -> Kafka only; checkpoints in a file in STATE_DIR.

``FAULT_SEED`` replays or explores other kill moments; ``FAULT_CYCLES`` and
``FAULT_EVENTS`` scale the run.
"""

from __future__ import annotations

import asyncio
import os
import random
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from service.dev.emulator import Emulator
from tests.e2e.test_e2e_http import stored_rows
from tests.e2e.workload import assert_matches
from tests.fault.harness import (
    Incarnation,
    KafkaOutput,
    Stream,
    build_stream,
    create_topic,
    feed_http,
    feed_kafka,
    ledger_problems,
    ledger_totals,
    read_dead_letters,
    read_output_topic,
    seed_from_env,
    service_env,
    wait_for,
)

pytestmark = [pytest.mark.integration, pytest.mark.e2e]

CYCLES = int(os.environ.get("FAULT_CYCLES", "10"))
EVENTS = int(os.environ.get("FAULT_EVENTS", "100000"))


@dataclass
class Kill:
    cycle: int
    after_s: float  # from process start
    events_received: int  # by this incarnation, at the last /status before the kill
    positions: dict[str, Any]


async def kill_cycles(
    env: dict[str, str], workdir: Path, rng: random.Random, *, first_checkpoint: bool = False
) -> list[Kill]:
    """Start, let it work for a seeded random moment, ``kill -9``; ``CYCLES`` times.

    Most kills land a seeded 0-1.5 s after the incarnation received its first events
    (mid-processing); about one in five lands at a random moment of start-up instead
    (connecting, restoring, joining the consumer group). ``first_checkpoint``: the
    first incarnation is not killed before its first checkpoint (see
    ``test_kill9_before_the_first_http_checkpoint_loses_nothing``)."""
    kills: list[Kill] = []
    for cycle in range(CYCLES):
        inc = Incarnation(env, workdir, cycle)
        st: dict[str, Any] | None
        if cycle == 0 and first_checkpoint:

            async def checkpointed(inc: Incarnation = inc) -> bool:
                now = await inc.status()
                return bool(now and now.get("checkpoints", 0) >= 1)

            await wait_for(checkpointed, 60, "the first checkpoint", inc.proc)
            await asyncio.sleep(rng.uniform(0.0, 1.5))
            st = await inc.status()
        elif rng.random() < 0.2:
            await asyncio.sleep(rng.uniform(0.3, 2.5))
            st = await inc.status()
        else:
            await inc.wait_events(1, timeout=60)
            await asyncio.sleep(rng.uniform(0.0, 1.5))
            st = await inc.status()
        inc.kill9()
        kills.append(
            Kill(
                cycle,
                round(time.monotonic() - inc.started, 2),
                0 if st is None else st.get("events_received", 0),
                {} if st is None else {k: p["position"] for k, p in st["partitions"].items()},
            )
        )
    return kills


def report(name: str, stream: Stream, kills: list[Kill], out: KafkaOutput, seconds: float) -> None:
    print(
        f"\n[fault] {name}: {len(stream.valid)} valid events + {sum(stream.rejects.values())} "
        f"rejected, {len(kills)} kill -9 cycles, {seconds:.0f} s; Kafka output "
        f"{out.messages} messages for {len(out.latest)} aggregates, {out.duplicates} duplicate "
        f"messages over {out.keys_with_duplicates} keys (same value each time)"
    )
    for k in kills:
        print(
            f"[fault]   kill {k.cycle}: at {k.after_s} s, {k.events_received} events in, "
            f"positions {k.positions}"
        )


def assert_dead_letters(got: Counter[str], expected: Counter[str]) -> None:
    """Each expected dead letter arrived exactly once, nothing else did."""
    assert got == expected, f"dead letters by reason (got, expected): {got} {expected}"


async def postgres_dead_letters(dsn: str, source_prefix: str) -> Counter[str]:
    """Reasons of the dead letters in PostgreSQL whose source starts with the prefix."""
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch(
            "SELECT reason FROM dead_letters WHERE starts_with(source, $1)", source_prefix
        )
    finally:
        await conn.close()
    return Counter(r["reason"] for r in rows)


def assert_no_duplicates(out: KafkaOutput) -> None:
    assert out.duplicates == 0, (
        f"{out.duplicates} duplicate aggregate messages over {out.keys_with_duplicates} keys"
    )


@pytest.mark.timeout(420)
async def test_kill9_cycles_over_kafka_leave_exact_aggregates_in_postgres_and_kafka(
    kafka_bootstrap: str, postgres_dsn: str, unique_name: str, tmp_path: Path
) -> None:
    started = time.monotonic()
    seed = seed_from_env(101)
    rng = random.Random(seed)
    stream = build_stream(seed, EVENTS)
    expected = stream.expected
    source, topic, table = f"in-{unique_name}", f"agg-{unique_name}", f"agg_{unique_name}"
    await create_topic(kafka_bootstrap, source)
    env = service_env(
        bus_url=f"kafka://{kafka_bootstrap}/{source}?group=g-{unique_name}"
        f"&metrics_topic=m-{unique_name}",
        storage="kafka,postgres",
        kafka_bootstrap=kafka_bootstrap,
        topic=topic,
        state_dir=tmp_path / "state",
        postgres_dsn=postgres_dsn,
        table=table,
    )
    feeder = asyncio.create_task(feed_kafka(kafka_bootstrap, source, stream, rate=2500))
    try:
        kills = await kill_cycles(env, tmp_path, rng)
        await asyncio.wait_for(feeder, 120)
    finally:
        feeder.cancel()
    final = Incarnation(env, tmp_path, CYCLES)
    try:

        async def all_rows() -> bool:
            return len(await stored_rows(postgres_dsn, table)) >= len(expected)

        await wait_for(all_rows, 150, "every aggregate in PostgreSQL", final.proc)
        assert_matches(await stored_rows(postgres_dsn, table), expected, "PostgreSQL")
        out = await read_output_topic(kafka_bootstrap, topic, expected)
        assert_matches(out.latest, expected, "Kafka (last value per key)")
        assert_no_duplicates(out)
        dead = await read_dead_letters(
            kafka_bootstrap, f"{topic}.dlq", sum(stream.rejects.values())
        )
        assert_dead_letters(dead, stream.rejects)
        # ... and so does PostgreSQL's dead-letter table
        pg_dead = await postgres_dead_letters(postgres_dsn, f"kafka {source}/")
        assert_dead_letters(pg_dead, stream.rejects)
        # the ledger in PostgreSQL is exact across every kill -9 and replay
        ledger = await ledger_totals(postgres_dsn, f"kafka:{source}:g-{unique_name}")
        received = len(stream.valid) + sum(stream.rejects.values())
        problems = ledger_problems(ledger, received, len(stream.valid), stream.rejects)
        assert not problems, problems
    finally:
        code = final.terminate()
    assert code == 0, final.proc.log_text()[-3000:]
    report("kafka -> kafka,postgres", stream, kills, out, time.monotonic() - started)


@pytest.mark.timeout(420)
async def test_kill9_cycles_over_http_with_cursors_leave_exact_aggregates_in_kafka(
    kafka_bootstrap: str, unique_name: str, tmp_path: Path
) -> None:
    started = time.monotonic()
    seed = seed_from_env(202)
    rng = random.Random(seed)
    stream = build_stream(seed, EVENTS, late_every=997)
    expected = stream.expected
    topic = f"agg-{unique_name}"
    async with Emulator() as emulator:
        env = service_env(
            bus_url=emulator.url,
            storage="kafka",
            kafka_bootstrap=kafka_bootstrap,
            topic=topic,
            state_dir=tmp_path / "state",
            extra={"VABUS_BATCH_LIMIT": "2000"},
        )
        feeder = asyncio.create_task(feed_http(emulator, stream, rate=4000))
        try:
            kills = await kill_cycles(env, tmp_path, rng, first_checkpoint=True)
            await asyncio.wait_for(feeder, 120)
        finally:
            feeder.cancel()
        assert list((tmp_path / "state").glob("*.checkpoint")), "no checkpoint file was written"
        final = Incarnation(env, tmp_path, CYCLES)
        try:
            out = await read_output_topic(kafka_bootstrap, topic, expected, timeout=150)
            assert_matches(out.latest, expected, "Kafka (last value per key)")
            assert_no_duplicates(out)
            dead = await read_dead_letters(
                kafka_bootstrap, f"{topic}.dlq", sum(stream.rejects.values())
            )
            assert_dead_letters(dead, stream.rejects)
        finally:
            code = final.terminate()
    assert code == 0, final.proc.log_text()[-3000:]
    report("http (cursors) -> kafka", stream, kills, out, time.monotonic() - started)


@pytest.mark.timeout(120)
async def test_kill9_before_the_first_http_checkpoint_loses_nothing(
    postgres_dsn: str, kafka_bootstrap: str, unique_name: str, tmp_path: Path
) -> None:
    stream = build_stream(seed_from_env(9), 3_000)
    expected = stream.expected
    table = f"agg_{unique_name}"
    async with Emulator() as emulator:
        emulator.append([v for _, v in stream.messages])
        env = service_env(
            bus_url=emulator.url,
            storage="postgres",
            kafka_bootstrap=kafka_bootstrap,
            topic=f"agg-{unique_name}",
            state_dir=tmp_path / "state",
            postgres_dsn=postgres_dsn,
            table=table,
            extra={"CHECKPOINT_INTERVAL": "60", "VABUS_BATCH_LIMIT": "500"},
        )
        first = Incarnation(env, tmp_path, 0)
        try:
            await first.wait_events(1, timeout=60)  # handed out, not yet checkpointed
        finally:
            first.kill9()
        second = Incarnation(env, tmp_path, 1)
        try:

            async def settled() -> bool:
                st = await second.status()
                if not (st and st.get("open_windows") == 0 and st.get("events_received")):
                    return False
                # an emitted window is in PostgreSQL a moment later, not at once
                return len(await stored_rows(postgres_dsn, table)) >= len(expected)

            await wait_for(settled, 60, "every window emitted and stored", second.proc)
            assert_matches(await stored_rows(postgres_dsn, table), expected, "PostgreSQL")
        finally:
            second.terminate()
