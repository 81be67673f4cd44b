"""Outages of a dependency mid-run: PostgreSQL stopped for ``FAULT_PG_DOWN_S`` seconds
(default 30), and the broker restarted with S3-backed storage. The service must keep
running, report the failing dependency on /readyz, and end with exact aggregates."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest

from service.dev.broker import EmbeddedKafka
from service.dev.emulator import Emulator
from service.dev.postgres_server import EmbeddedPostgres
from tests.e2e.test_e2e_http import stored_rows
from tests.e2e.workload import assert_matches, expected_aggregates, free_port
from tests.fault.harness import (
    Incarnation,
    build_stream,
    create_topic,
    feed_http,
    feed_kafka,
    read_output_topic,
    seed_from_env,
    service_env,
    stored_valid_events,
    wait_for,
)

pytestmark = [pytest.mark.integration, pytest.mark.e2e]

PG_DOWN_S = float(os.environ.get("FAULT_PG_DOWN_S", "30"))


async def readyz(port: int) -> tuple[int, str]:
    try:
        async with (
            aiohttp.ClientSession() as http,
            http.get(
                f"http://127.0.0.1:{port}/readyz", timeout=aiohttp.ClientTimeout(total=5)
            ) as r,
        ):
            return r.status, await r.text()
    except (aiohttp.ClientError, TimeoutError) as exc:
        return 0, repr(exc)


@pytest.mark.timeout(int(PG_DOWN_S) + 150)
async def test_postgres_down_mid_run_keeps_the_service_up_and_results_exact(
    pg_restartable: EmbeddedPostgres, kafka_bootstrap: str, unique_name: str, tmp_path: Path
) -> None:
    stream = build_stream(seed_from_env(404), 40_000, late_every=499)
    expected = stream.expected
    dsn, table, topic = pg_restartable.dsn, f"agg_{unique_name}", f"agg-{unique_name}"
    async with Emulator() as emulator:
        env = service_env(
            bus_url=emulator.url,
            storage="kafka,postgres",
            kafka_bootstrap=kafka_bootstrap,
            topic=topic,
            state_dir=tmp_path / "state",
            postgres_dsn=dsn,
            table=table,
        )
        feeder = asyncio.create_task(feed_http(emulator, stream, rate=2000))
        inc = Incarnation(env, tmp_path, 0)
        try:
            await inc.wait_events(5_000, timeout=60)
            await pg_restartable.stop()
            down_at = time.monotonic()

            async def not_ready_naming_postgres() -> bool:
                code, body = await readyz(inc.port)
                return code == 503 and "postgres" in body

            await wait_for(not_ready_naming_postgres, 20, "/readyz 503 naming postgres", inc.proc)
            while time.monotonic() - down_at < PG_DOWN_S:
                assert inc.proc.proc.poll() is None, inc.proc.log_text()[-3000:]
                st = await inc.status()
                assert st is not None, "/status stopped answering while PostgreSQL was down"
                await asyncio.sleep(1)
            await pg_restartable.start()
            await asyncio.wait_for(feeder, 120)

            async def all_rows() -> bool:
                return len(await stored_rows(dsn, table)) >= len(expected)

            await wait_for(all_rows, 120, "every aggregate in PostgreSQL", inc.proc)
            assert_matches(await stored_rows(dsn, table), expected, "PostgreSQL")
            out = await read_output_topic(kafka_bootstrap, topic, expected)
            assert_matches(out.latest, expected, "Kafka (last value per key)")
            code, body = await readyz(inc.port)
            assert code == 200, body
        finally:
            feeder.cancel()
            exit_code = inc.terminate()
    assert exit_code == 0, inc.proc.log_text()[-3000:]
    print(
        f"\n[fault] PostgreSQL down {PG_DOWN_S:.0f} s mid-run: {len(stream.valid)} events, "
        f"exact; Kafka {out.duplicates} duplicate messages"
    )


class MotoS3:
    """A local S3 server (moto, from PyPI) in a process of its own, so it outlives
    broker restarts. Data lives in its memory: enough while it keeps running."""

    def __init__(self, log_path: Path) -> None:
        self.port = free_port()
        server = shutil.which("moto_server", path=str(Path(sys.executable).parent))
        if server is None:
            pytest.skip("moto[server] is not installed (pip install -e '.[dev]')")
        self._log = open(log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [server, "-H", "127.0.0.1", "-p", str(self.port)],
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        self.url = f"http://127.0.0.1:{self.port}"
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(self.url, timeout=1).close()
                break
            except OSError as exc:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(
                        f"moto_server did not start: {log_path.read_text()}"
                    ) from exc
                time.sleep(0.05)

    def create_bucket(self, name: str) -> None:
        request = urllib.request.Request(f"{self.url}/{name}", method="PUT")
        urllib.request.urlopen(request, timeout=5).close()

    def env(self) -> dict[str, str]:
        return {
            "AWS_ACCESS_KEY_ID": "test",
            "AWS_SECRET_ACCESS_KEY": "test",
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_ENDPOINT": self.url,
            "AWS_ALLOW_HTTP": "true",
        }

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)
        self._log.close()


@pytest.fixture
def s3(tmp_path: Path) -> Iterator[MotoS3]:
    server = MotoS3(tmp_path / "moto.log")
    try:
        yield server
    finally:
        server.stop()


@pytest.mark.timeout(300)
async def test_broker_restart_mid_run_with_s3_storage_leaves_exact_aggregates(
    s3: MotoS3, postgres_dsn: str, unique_name: str, tmp_path: Path
) -> None:
    """tansu on ``s3://`` storage (moto) is stopped and started again on the same port
    while the service reads from it (Kafka bus) and writes to it (Kafka output)."""
    s3.create_bucket("tansu")
    broker = EmbeddedKafka(
        tmp_path / "tansu", storage_url="s3://tansu/", env=s3.env(), keep_port=True
    )
    await broker.start()
    bootstrap = broker.bootstrap_servers
    stream = build_stream(seed_from_env(505), 30_000)
    expected = stream.expected
    source, topic, table = f"in-{unique_name}", f"agg-{unique_name}", f"agg_{unique_name}"
    try:
        await create_topic(bootstrap, source)
        env = service_env(
            bus_url=f"kafka://{bootstrap}/{source}?group=g-{unique_name}"
            f"&metrics_topic=m-{unique_name}",
            storage="kafka,postgres",
            kafka_bootstrap=bootstrap,
            topic=topic,
            state_dir=tmp_path / "state",
            postgres_dsn=postgres_dsn,
            table=table,
        )
        feeder = asyncio.create_task(feed_kafka(bootstrap, source, stream, rate=1500))
        inc = Incarnation(env, tmp_path, 0)
        try:
            await inc.wait_events(5_000, timeout=60)
            await broker.stop()
            await asyncio.sleep(3)
            assert inc.proc.proc.poll() is None, inc.proc.log_text()[-3000:]
            await broker.start()
            await asyncio.wait_for(feeder, 120)
            # what the broker kept: a produce it stored just before stopping, whose
            # answer was lost, was sent again by the feeder (no idempotent producer here)
            kept = await stored_valid_events(bootstrap, source, stream)
            expected = expected_aggregates(kept)
            stored_twice = len(kept) - len(stream.valid)

            async def all_rows() -> bool:
                return len(await stored_rows(postgres_dsn, table)) >= len(expected)

            await wait_for(all_rows, 120, "every aggregate in PostgreSQL", inc.proc)
            assert_matches(await stored_rows(postgres_dsn, table), expected, "PostgreSQL")
            out = await read_output_topic(bootstrap, topic, expected)
            assert_matches(out.latest, expected, "Kafka (last value per key)")
        finally:
            feeder.cancel()
            exit_code = inc.terminate()
        assert exit_code == 0, inc.proc.log_text()[-3000:]
    finally:
        await broker.stop()
    print(
        f"\n[fault] broker restart (s3 storage): {len(stream.valid)} events "
        f"({stored_twice} stored twice by the feeder's retries), exact; "
        f"Kafka {out.duplicates} duplicate messages"
    )
