"""Secrets never leak: not in logs (any logger, DEBUG), /status, /readyz, /metrics, the
`check` command's lines or error messages, while connections fail in every way."""

from __future__ import annotations

import asyncio
import logging
import re
from typing import Any
from urllib.parse import quote

import aiohttp
import pytest

from service.app import Service
from service.checkpoints.postgres import PostgresCheckpointStore
from service.commands import check_all
from service.config import PostgresConfig, Secret, load_config
from service.core.clock import SystemClock
from service.core.errors import ConfigError, ServiceError
from service.dev.emulator import Emulator
from service.metrics.collector import MetricsCollector
from service.sinks.postgres import PostgresSink
from service.wiring import build_bus, build_outputs
from tests.e2e.workload import free_port

pytestmark = pytest.mark.integration

TOKEN = "tok-Secret-7f3a9c"
KAFKA_PASSWORD = "kpw-Secret-51d2e8"
# Every character that used to end the masked part early, percent-encoded in the DSN
PG_PASSWORD = "pgpw-Secret-a6b0c4#/?@: %ü"
HTTP_TOKEN = "http-Secret-3e8b1f0d9c"
SECRETS = (TOKEN, KAFKA_PASSWORD, "pgpw-Secret-a6b0c4", HTTP_TOKEN)


def with_password(dsn: str, user: str) -> str:
    """The test server's DSN with ``user:PG_PASSWORD`` (the embedded server trusts
    loopback, so the password is sent but not needed)."""
    assert dsn.startswith("postgresql://postgres@")
    return dsn.replace("postgres@", f"{user}:{quote(PG_PASSWORD, safe='')}@", 1)


def environment(bus_port: int, pg_dsn: str, http_port: int, tmp: str) -> dict[str, str]:
    return {
        "VABUS_URL": f"http://127.0.0.1:{bus_port}",
        "VABUS_TOKEN": TOKEN,
        "STORAGE_TYPE": "postgres,kafka",
        "POSTGRES_DSN": pg_dsn,
        "POSTGRES_TABLE": "secrets_test_agg",
        "KAFKA_BOOTSTRAP_SERVERS": f"127.0.0.1:{free_port()}",  # nobody listens
        "KAFKA_SECURITY_PROTOCOL": "SASL_PLAINTEXT",
        "KAFKA_SASL_MECHANISM": "SCRAM-SHA-512",
        "KAFKA_SASL_USERNAME": "svc",
        "KAFKA_SASL_PASSWORD": KAFKA_PASSWORD,
        "HTTP_HOST": "127.0.0.1",
        "HTTP_PORT": str(http_port),
        "STATE_DIR": tmp,
        "LOG_LEVEL": "DEBUG",
        "HTTP_AUTH_TOKEN": HTTP_TOKEN,
    }


def assert_no_secret(where: str, text: str) -> None:
    # Only the indexes are reported: a failing assertion must not print the text either.
    leaked = [i for i, secret in enumerate(SECRETS) if secret in text]
    assert not leaked, (
        f"{where} leaks secret(s) {leaked} (0 token, 1 Kafka, 2 PostgreSQL, 3 HTTP_AUTH_TOKEN)"
    )


async def get(port: int, path: str, token: str | None = None) -> tuple[int, str]:
    headers = {} if token is None else {"Authorization": f"Bearer {token}"}
    async with (
        aiohttp.ClientSession(headers=headers) as http,
        http.get(f"http://127.0.0.1:{port}{path}") as r,
    ):
        return r.status, await r.text()


@pytest.mark.timeout(90)
async def test_no_secret_reaches_logs_status_readyz_metrics_or_error_messages(
    postgres_dsn: str, tmp_path: Any, caplog: pytest.LogCaptureFixture, capsys: Any
) -> None:
    caplog.set_level(logging.DEBUG)
    emulator = Emulator(token="the-right-token")  # our token is wrong: every call is a 401
    bus_port, http_port = free_port(), free_port()
    await emulator.start(port=bus_port)
    config = load_config(
        environment(bus_port, with_password(postgres_dsn, "postgres"), http_port, str(tmp_path)),
        dotenv=None,
    )
    assert_no_secret("the config repr", repr(config))
    assert_no_secret("the redacted config", str(config.redacted()))
    raw = environment(bus_port, postgres_dsn, http_port, str(tmp_path))
    raw["POSTGRES_DSN"] = postgres_dsn.replace("postgres@", f"u:{PG_PASSWORD}@", 1)
    raw["HTTP_AUTH_TOKEN"] = HTTP_TOKEN + " with a space"
    with pytest.raises(ConfigError) as refused:  # not percent-encoded; a bad token
        load_config(raw, dotenv=None)
    assert len(refused.value.problems) == 2
    assert_no_secret("configuration problems", str(refused.value))
    clock = SystemClock()
    metrics = MetricsCollector(clock)
    outputs = build_outputs(config, metrics, clock)
    service = Service(
        config,
        bus=build_bus(config, metrics, clock),
        sinks=outputs.sinks,
        store=outputs.store,
        metrics=metrics,
        clock=clock,
        shared_transaction=outputs.shared_transaction,
    )
    task = asyncio.create_task(service.run())
    bodies: list[str] = []
    try:
        # PostgreSQL starts; the Kafka output keeps failing (nobody listens), so the
        # service stays in start-up, retrying and logging, while it serves HTTP.
        async with asyncio.timeout(45):
            while not re.search(r"starting output kafka failed \(.*\), attempt 2,", caplog.text):
                assert not task.done(), task
                await asyncio.sleep(0.1)
        for path in ("/", "/status", "/metrics"):  # behind HTTP_AUTH_TOKEN
            code, body = await get(http_port, path)
            assert code == 401
            assert_no_secret(f"{path} without the token", body)
        for path in ("/", "/status", "/readyz", "/metrics", "/healthz"):
            code, body = await get(http_port, path, HTTP_TOKEN)
            assert code == (503 if path == "/readyz" else 200), path
            bodies.append(body)
            assert_no_secret(path, body)
        code, readyz = await get(http_port, "/readyz")
        assert code == 503 and "kafka" in readyz and "bus" in readyz

        # `vabus-aggregator check`: the bus answers 401, Kafka is down, PostgreSQL has
        # no such role. Each line names the problem without the secret.
        bad_role = load_config(
            environment(bus_port, with_password(postgres_dsn, "no_such_role"), 0, str(tmp_path)),
            dotenv=None,
        )
        assert await check_all(bad_role) == 1
        out = capsys.readouterr().out
        assert out.count("FAIL") == 3, out
        assert_no_secret("`check` output", out)

        # Error messages of the PostgreSQL output and checkpoint store themselves.
        errors: list[str] = []
        closed = with_password(f"postgresql://postgres@127.0.0.1:{free_port()}/postgres", "u")
        for dsn in (with_password(postgres_dsn, "no_such_role"), closed):
            sink = PostgresSink(
                PostgresConfig(dsn=Secret(dsn)), metrics, clock, connect_timeout_s=2
            )
            for operation in (sink.start(), PostgresCheckpointStore(dsn, "ns").start()):
                with pytest.raises(ServiceError) as info:
                    await operation
                errors.append(f"{info.value!r} {info.value} {info.value.__cause__}")
        for message in errors:
            assert_no_secret("an error message", message)
    finally:
        service.request_stop()
        task.cancel()  # still in start-up: nothing to drain
        await asyncio.gather(task, return_exceptions=True)
        await emulator.stop()
    assert "401" in caplog.text or any("401" in b for b in bodies)
    assert_no_secret("the logs", caplog.text)
    assert_no_secret("the log records", " ".join(str(r.__dict__) for r in caplog.records))
