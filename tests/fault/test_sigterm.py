"""SIGTERM mid-run: exit 0 within SHUTDOWN_TIMEOUT with every shutdown phase logged, and
a restart continues exactly (a graceful stop replays nothing: even the dead letters,
which are only at-least-once across crashes, are stored exactly once). A second signal
during the drain exits at once, non-zero."""

from __future__ import annotations

import asyncio
import random
import re
import signal
import time
from collections import Counter
from pathlib import Path

import asyncpg
import pytest

from service.dev.emulator import Emulator
from service.dev.postgres_server import EmbeddedPostgres
from tests.e2e.test_e2e_http import stored_rows
from tests.e2e.workload import assert_matches
from tests.fault.harness import (
    Incarnation,
    build_stream,
    feed_http,
    seed_from_env,
    service_env,
    wait_for,
)

pytestmark = [pytest.mark.integration, pytest.mark.e2e]

SHUTDOWN_TIMEOUT_S = 10
PHASES = [f"shutdown {n}/5" for n in range(1, 6)]


async def wait_exit(inc: Incarnation, timeout: float) -> tuple[int, float]:
    """(exit code, seconds it took)."""
    started = time.monotonic()
    while inc.proc.proc.poll() is None:
        if time.monotonic() - started > timeout:
            raise AssertionError(
                f"still running {timeout} s after the signal:\n{inc.proc.log_text()[-3000:]}"
            )
        await asyncio.sleep(0.05)
    return inc.proc.proc.returncode, time.monotonic() - started


def assert_phases_in_order(log: str) -> None:
    positions = [log.find(p) for p in PHASES]
    assert all(p >= 0 for p in positions), f"phases missing: {positions}\n{log[-3000:]}"
    assert positions == sorted(positions), f"phases out of order: {positions}"


async def dead_letter_reasons(dsn: str) -> Counter[str]:
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch("SELECT reason, count(*) AS n FROM dead_letters GROUP BY reason")
    finally:
        await conn.close()
    return Counter({r["reason"]: r["n"] for r in rows})


@pytest.mark.timeout(240)
async def test_sigterm_mid_run_exits_0_logs_every_phase_and_restart_continues_exactly(
    pg_restartable: EmbeddedPostgres, kafka_bootstrap: str, unique_name: str, tmp_path: Path
) -> None:
    seed = seed_from_env(303)
    rng = random.Random(seed)
    stream = build_stream(seed, 40_000, late_every=499)
    dsn, table = pg_restartable.dsn, f"agg_{unique_name}"
    async with Emulator() as emulator:
        env = service_env(
            bus_url=emulator.url,
            storage="postgres",
            kafka_bootstrap=kafka_bootstrap,
            topic=f"agg-{unique_name}",
            state_dir=tmp_path / "state",
            postgres_dsn=dsn,
            table=table,
            extra={"SHUTDOWN_TIMEOUT": str(SHUTDOWN_TIMEOUT_S), "VABUS_BATCH_LIMIT": "1000"},
        )
        feeder = asyncio.create_task(feed_http(emulator, stream, rate=4000))
        stops = []
        try:
            for cycle in range(3):
                inc = Incarnation(env, tmp_path, cycle)
                await inc.wait_events(1, timeout=60)
                await asyncio.sleep(rng.uniform(0.0, 1.5))
                inc.proc.proc.send_signal(signal.SIGTERM)
                code, took = await wait_exit(inc, SHUTDOWN_TIMEOUT_S + 5)
                log = inc.proc.log_text()
                assert code == 0, log[-3000:]
                assert took < SHUTDOWN_TIMEOUT_S, took
                assert_phases_in_order(log)
                windows = re.search(r"checkpointing (\d+) open window", log)
                stops.append((round(took, 2), windows and int(windows.group(1))))
            await asyncio.wait_for(feeder, 60)
        finally:
            feeder.cancel()
        final = Incarnation(env, tmp_path, 3)
        try:
            expected = stream.expected

            async def all_rows() -> bool:
                return len(await stored_rows(dsn, table)) >= len(expected)

            await wait_for(all_rows, 90, "every aggregate in PostgreSQL", final.proc)
            assert_matches(await stored_rows(dsn, table), expected, "PostgreSQL")

            async def all_dead_letters() -> bool:
                return (await dead_letter_reasons(dsn)).total() >= stream.rejects.total()

            await wait_for(all_dead_letters, 30, "every dead letter", final.proc)
            # graceful stops replay nothing: exactly once, not merely at least once
            assert await dead_letter_reasons(dsn) == stream.rejects
        finally:
            code = final.terminate()
        assert code == 0
    print(
        f"\n[fault] SIGTERM: {len(stream.valid)} events, 3 graceful stops "
        f"(seconds to exit, open windows checkpointed): {stops}"
    )


@pytest.mark.timeout(120)
async def test_second_signal_during_a_stuck_drain_exits_at_once_non_zero(
    pg_restartable: EmbeddedPostgres, kafka_bootstrap: str, unique_name: str, tmp_path: Path
) -> None:
    """PostgreSQL (output and checkpoint store) goes away, so the drain gets stuck (in
    phase 2 while the queued outputs cannot be written, or in phase 3 waiting for the
    checkpoint, depending on timing); SIGINT then ends the process immediately."""
    stream = build_stream(5, 5_000)
    async with Emulator() as emulator:
        emulator.append([v for _, v in stream.messages])
        env = service_env(
            bus_url=emulator.url,
            storage="postgres",
            kafka_bootstrap=kafka_bootstrap,
            topic=f"agg-{unique_name}",
            state_dir=tmp_path / "state",
            postgres_dsn=pg_restartable.dsn,
            table=f"agg_{unique_name}",
            extra={"SHUTDOWN_TIMEOUT": "60"},
        )
        inc = Incarnation(env, tmp_path, 0)
        try:
            await inc.wait_events(1000, timeout=60)
            await pg_restartable.stop()
            inc.proc.proc.send_signal(signal.SIGTERM)

            async def draining() -> bool:
                return "shutdown 2/5" in inc.proc.log_text()

            await wait_for(draining, 20, "the drain (shutdown phase 2)", inc.proc)
            inc.proc.proc.send_signal(signal.SIGINT)
            code, took = await wait_exit(inc, 5)
        finally:
            inc.kill9()
            await pg_restartable.start()
    assert code != 0
    assert took < 2, took
    assert "second SIGINT: exiting immediately" in inc.proc.log_text()


@pytest.mark.timeout(120)
async def test_sigterm_while_the_output_is_down_still_exits_within_the_deadline(
    pg_restartable: EmbeddedPostgres, kafka_bootstrap: str, unique_name: str, tmp_path: Path
) -> None:
    stream = build_stream(6, 5_000)
    async with Emulator() as emulator:
        emulator.append([v for _, v in stream.messages])
        env = service_env(
            bus_url=emulator.url,
            storage="postgres",
            kafka_bootstrap=kafka_bootstrap,
            topic=f"agg-{unique_name}",
            state_dir=tmp_path / "state",
            postgres_dsn=pg_restartable.dsn,
            table=f"agg_{unique_name}",
            extra={"SHUTDOWN_TIMEOUT": "4"},
        )
        inc = Incarnation(env, tmp_path, 0)
        try:
            await inc.wait_events(1000, timeout=60)
            await pg_restartable.stop()
            await asyncio.sleep(0.5)
            inc.proc.proc.send_signal(signal.SIGTERM)
            code, took = await wait_exit(inc, 15)
        finally:
            inc.kill9()
            await pg_restartable.start()
    log = inc.proc.log_text()
    assert took < 4 + 2, f"{took:.1f} s\n{log[-3000:]}"
    assert "did not finish within" in log
    assert "shutdown 5/5" in log
    print(f"\n[fault] SIGTERM with PostgreSQL down: exit {code} after {took:.1f} s")


@pytest.mark.timeout(120)
async def test_sigterm_while_the_kafka_output_is_down_still_exits_within_the_deadline(
    kafka_bootstrap: str, unique_name: str, tmp_path: Path
) -> None:
    """The broker of the Kafka output goes away: closing the producer must not hang
    past the deadline either."""
    from service.dev.broker import EmbeddedKafka

    broker = EmbeddedKafka(tmp_path / "tansu")
    await broker.start()
    stream = build_stream(7, 5_000)
    try:
        async with Emulator() as emulator:
            emulator.append([v for _, v in stream.messages])
            env = service_env(
                bus_url=emulator.url,
                storage="kafka",
                kafka_bootstrap=broker.bootstrap_servers,
                topic=f"agg-{unique_name}",
                state_dir=tmp_path / "state",
                extra={"SHUTDOWN_TIMEOUT": "4"},
            )
            inc = Incarnation(env, tmp_path, 0)
            try:
                await inc.wait_events(1000, timeout=60)
                await broker.stop()
                emulator.append([v for _, v in build_stream(8, 2_000).messages])
                await asyncio.sleep(1)
                inc.proc.proc.send_signal(signal.SIGTERM)
                code, took = await wait_exit(inc, 30)
            finally:
                inc.kill9()
    finally:
        await broker.stop()
    log = inc.proc.log_text()
    assert took < 4 + 2, f"{took:.1f} s\n{log[-3000:]}"
    assert "shutdown 5/5" in log
    print(f"\n[fault] SIGTERM with the Kafka output down: exit {code} after {took:.1f} s")
