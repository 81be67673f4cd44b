"""The image operators run (contract §12.2), built from this checkout's Dockerfile and
run against the embedded broker and PostgreSQL on the host network, with the VaBus
emulator of this process as the bus; the results are checked exactly against the
independent computation of tests/e2e/workload.py."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any
from uuid import uuid4

import pytest

from service.dev.emulator import Emulator
from tests.container.docker import Container, run, start_container, volume_files
from tests.e2e.live import AggregatesTail
from tests.e2e.test_e2e_http import stored_rows
from tests.e2e.workload import (
    BASE_TS,
    INTERVAL,
    Key,
    Results,
    assert_matches,
    build_workload,
    expected_aggregates,
    free_port,
)

pytestmark = [pytest.mark.container]

SHUTDOWN_TIMEOUT = 10  # seconds: docker stop must end the container well within it
# Health checked every second (the Dockerfile's HEALTHCHECK command, faster schedule).
FAST_HEALTH = ["--health-interval=1s", "--health-start-period=30s", "--health-retries=3"]
READ_ONLY = ["--read-only", "--tmpfs", "/tmp"]


async def wait_for(
    cond: Callable[[], Awaitable[Any]], timeout: float, what: str, container: Container
) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        await container.assert_running()
        result = await cond()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"no {what} in {timeout} s:\n{(await container.logs())[-4000:]}")
        await asyncio.sleep(0.3)


def service_env(
    emulator: Emulator,
    storage: str,
    kafka_bootstrap: str,
    postgres_dsn: str,
    topic: str,
    table: str,
    idle_timeout: float,
) -> dict[str, str]:
    env = {
        "VABUS_URL": emulator.url,
        "VABUS_WAIT": "0.5",
        "VABUS_BATCH_LIMIT": "37",  # many small batches: many cursors and checkpoints
        "STORAGE_TYPE": storage,
        "AGGREGATION_INTERVAL": str(int(INTERVAL)),
        "AGGREGATION_IDLE_TIMEOUT": str(idle_timeout),
        "HTTP_HOST": "127.0.0.1",
        "HTTP_PORT": str(free_port()),
        "SHUTDOWN_TIMEOUT": str(SHUTDOWN_TIMEOUT),
        "LOG_LEVEL": "INFO",
    }
    if "kafka" in storage:
        env |= {"KAFKA_BOOTSTRAP_SERVERS": kafka_bootstrap, "KAFKA_TOPIC": topic}
    if "postgres" in storage:
        env |= {"POSTGRES_DSN": postgres_dsn, "POSTGRES_TABLE": table}
    return env


class Outputs:
    """What the outputs named by ``STORAGE_TYPE`` hold: PostgreSQL rows, and the last
    value per key of the Kafka topic."""

    def __init__(self, storage: str, kafka_bootstrap: str, postgres_dsn: str) -> None:
        self.storage = storage
        self.dsn = postgres_dsn
        self.table = f"agg_c{uuid4().hex[:10]}"
        self.topic = f"agg-c{uuid4().hex[:10]}"
        self.tail = AggregatesTail(kafka_bootstrap, self.topic) if "kafka" in storage else None

    async def read(self) -> dict[str, dict[Key, tuple[float, int]]]:
        out = {}
        if self.tail is not None:
            out["Kafka"] = await self.tail.poll()
        if "postgres" in self.storage:
            out["PostgreSQL"] = await stored_rows(self.dsn, self.table)
        return out

    async def hold(self, keys: Results) -> bool:
        return all(keys.keys() <= got.keys() for got in (await self.read()).values())

    async def assert_exact(self, expected: Results, ignore: str) -> None:
        for where, got in (await self.read()).items():
            assert_matches({k: v for k, v in got.items() if k[0] != ignore}, expected, where)


@asynccontextmanager
async def outputs(storage: str, kafka_bootstrap: str, postgres_dsn: str) -> AsyncIterator[Outputs]:
    out = Outputs(storage, kafka_bootstrap, postgres_dsn)
    if out.tail is not None:
        await out.tail.start()
    try:
        yield out
    finally:
        if out.tail is not None:
            await out.tail.stop()


async def test_env_only_both_outputs_healthy_and_stops_cleanly(
    image: str, kafka_bootstrap: str, postgres_dsn: str
) -> None:
    """`docker run IMAGE` with environment variables only, both outputs: exact
    aggregates in each, the image's HEALTHCHECK reaches healthy, `docker stop` ends it
    with exit code 0 within SHUTDOWN_TIMEOUT, and it wrote nothing outside its volume."""
    workload = build_workload(seed=11)
    expected = expected_aggregates(workload.valid)
    async with (
        Emulator() as emulator,
        outputs("kafka,postgres", kafka_bootstrap, postgres_dsn) as out,
    ):
        emulator.append(workload.messages)
        env = service_env(
            emulator, out.storage, kafka_bootstrap, postgres_dsn, out.topic, out.table, 2
        )
        container = await start_container(image, env, options=FAST_HEALTH)
        try:

            async def healthy() -> bool:
                health = (await container.state()).get("Health") or {}
                return health.get("Status") == "healthy"

            await wait_for(healthy, 60, "healthy status", container)
            await wait_for(lambda: out.hold(expected), 90, "every aggregate", container)
            await out.assert_exact(expected, ignore="")

            code = await container.stop(SHUTDOWN_TIMEOUT + 20)
            logs = await container.logs()
            assert code == 0, logs[-4000:]
            assert container.stopped_in is not None
            assert container.stopped_in < SHUTDOWN_TIMEOUT, container.stopped_in
            # Nothing written to the image's file system (the state volume and /tmp apart):
            # so --read-only can only fail where this would.
            changed = [
                line
                for line in (await run("diff", container.name)).splitlines()
                if not line.split()[-1].startswith(("/tmp", "/app/state"))
            ]
            assert not changed, changed
        finally:
            await container.remove()


@pytest.mark.parametrize("storage", ["kafka", "postgres", "kafka,postgres"])
async def test_read_only_random_uid_restart_on_same_volume_is_exact(
    image: str, kafka_bootstrap: str, postgres_dsn: str, storage: str
) -> None:
    """`--read-only`, a tmpfs /tmp, an arbitrary uid in group 0 (OpenShift), a named
    state volume; stopped mid-feed with a window open and replaced by a container of
    another arbitrary uid on the same volume: that window continues, and the outputs
    hold every aggregate exactly once (counts exact: nothing lost, nothing applied
    twice). Without PostgreSQL as an output the checkpoints are files on the volume."""
    workload = build_workload(seed=23)
    expected = expected_aggregates(workload.valid)
    # Cut inside the third window: windows 0 and 1 are closed before the stop, window 2
    # is open across it.
    in_window = [i for i, m in enumerate(workload.messages) if _window_of(m) == 2]
    cut = in_window[len(in_window) // 2]
    before = {k: v for k, v in expected.items() if k[2] < BASE_TS + 2 * INTERVAL}
    # Closes every window of the workload once it arrives (its own stays open).
    flush = {"name": "zz.flush", "value": 1, "timestamp": BASE_TS + 10 * INTERVAL}
    volume = f"vabus-state-{uuid4().hex[:10]}"
    uids = random.sample(range(100_000, 2_000_000), 2)
    async with Emulator() as emulator, outputs(storage, kafka_bootstrap, postgres_dsn) as out:
        # No idle flush: only event time closes windows, so the stop finds window 2 open.
        env = service_env(
            emulator, storage, kafka_bootstrap, postgres_dsn, out.topic, out.table, 3600
        )
        options = [*READ_ONLY, "--volume", f"{volume}:/app/state"]
        emulator.append(workload.messages[:cut])
        first = await start_container(image, env, options=[*options, "--user", f"{uids[0]}:0"])
        try:
            await wait_for(lambda: out.hold(before), 90, "windows 0 and 1", first)
            # Everything of the first part taken in before the stop.
            await wait_for(lambda: _taken_all(emulator, cut), 30, "the first part read", first)
            code = await first.stop(SHUTDOWN_TIMEOUT + 20)
            logs = await first.logs()
            assert code == 0, logs[-4000:]
        finally:
            await first.remove()
        for problem in ("PermissionError", "Read-only file system", "Traceback"):
            assert problem not in logs, logs[-4000:]
        files = await volume_files(image, volume)
        if storage == "kafka":  # file checkpoints, written by the arbitrary uid
            assert any(
                path.endswith(".checkpoint") and uid == uids[0] and gid == 0
                for path, uid, gid, _ in files
            ), files

        emulator.append([*workload.messages[cut:], flush])
        second = await start_container(image, env, options=[*options, "--user", f"{uids[1]}:0"])
        try:
            await wait_for(lambda: out.hold(expected), 90, "every aggregate", second)
            await out.assert_exact(expected, ignore="zz.flush")
            code = await second.stop(SHUTDOWN_TIMEOUT + 20)
            logs = await second.logs()
            assert code == 0, logs[-4000:]
        finally:
            await second.remove()
            await run("volume", "rm", "--force", volume, check=False)
        for problem in ("PermissionError", "Read-only file system", "Traceback"):
            assert problem not in logs, logs[-4000:]


def _window_of(message: Any) -> int | None:
    ts = message.get("timestamp") if isinstance(message, dict) else None
    if not isinstance(ts, float | int) or isinstance(ts, bool) or ts > BASE_TS + 1e6:
        return None
    return int((ts - BASE_TS) // INTERVAL)


async def _taken_all(emulator: Emulator, count: int) -> bool:
    return bool(emulator.stats()["events_handed_out"] >= count)
