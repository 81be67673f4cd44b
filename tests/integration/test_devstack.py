"""The embedded stack really serves Kafka and PostgreSQL, keeps data, and leaves no orphans."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import time
from pathlib import Path

import asyncpg
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from service.dev.broker import EmbeddedKafka
from service.dev.devstack import DevStack
from service.dev.postgres_server import EmbeddedPostgres

pytestmark = pytest.mark.integration

REPO_ROOT = Path(__file__).resolve().parents[2]


def _alive(pid: int) -> bool:
    """True while ``pid`` runs; a zombie counts as gone (PID 1 here may never reap it)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _descendants(root: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(entry.name))
    found: set[int] = set()
    todo = [root]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


async def _wait_all_gone(pids: set[int], timeout_s: float) -> set[int]:
    """Wait until none of ``pids`` runs; returns the survivors at the deadline."""
    deadline = time.monotonic() + timeout_s
    while (survivors := {p for p in pids if _alive(p)}) and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    return survivors


async def test_embedded_broker_round_trips_a_message(tmp_path: Path, unique_name: str) -> None:
    async with EmbeddedKafka(tmp_path) as broker:
        producer = AIOKafkaProducer(bootstrap_servers=broker.bootstrap_servers)
        await producer.start()
        try:
            await producer.send_and_wait(unique_name, b"hello", key=b"k")
        finally:
            await producer.stop()
        consumer = AIOKafkaConsumer(
            unique_name, bootstrap_servers=broker.bootstrap_servers, auto_offset_reset="earliest"
        )
        await consumer.start()
        try:
            async with asyncio.timeout(30):
                message = await consumer.getone()
        finally:
            await consumer.stop()
    assert (message.key, message.value) == (b"k", b"hello")
    assert broker.log_path.read_text().strip(), "tansu output should go to the log file"


async def test_kafka_bootstrap_fixture_serves_producers(
    kafka_bootstrap: str, unique_name: str
) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap)
    await producer.start()
    try:
        metadata = await producer.send_and_wait(unique_name, b"x")
    finally:
        await producer.stop()
    assert metadata.topic == unique_name


async def test_postgres_dsn_fixture_accepts_asyncpg_connections(postgres_dsn: str) -> None:
    conn = await asyncpg.connect(postgres_dsn)
    try:
        assert await conn.fetchval("SELECT 1") == 1
    finally:
        await conn.close()


async def test_embedded_postgres_listens_on_loopback_tcp(pg_restartable: EmbeddedPostgres) -> None:
    assert pg_restartable.dsn == f"postgresql://postgres@127.0.0.1:{pg_restartable.port}/postgres"
    conn = await asyncpg.connect(pg_restartable.dsn)
    try:
        row = await conn.fetchrow(
            "SELECT host(inet_server_addr()) AS host, "
            "inet_server_port() AS port, version() AS version"
        )
    finally:
        await conn.close()
    assert row is not None
    assert (row["host"], row["port"]) == ("127.0.0.1", pg_restartable.port)
    assert row["version"].startswith("PostgreSQL 18")


async def test_postgres_keeps_rows_across_stop_and_start(
    pg_restartable: EmbeddedPostgres, unique_name: str
) -> None:
    dsn = pg_restartable.dsn
    conn = await asyncpg.connect(dsn)
    await conn.execute(f"CREATE TABLE {unique_name} (id int PRIMARY KEY, note text)")
    await conn.executemany(f"INSERT INTO {unique_name} VALUES ($1, $2)", [(1, "a"), (2, "b")])
    await conn.close()
    old_pid = pg_restartable.pid
    assert old_pid is not None

    await pg_restartable.stop()
    assert not pg_restartable.running
    assert not _alive(old_pid)
    with pytest.raises(OSError):
        await asyncpg.connect(dsn, timeout=5)

    await pg_restartable.start()
    assert pg_restartable.dsn == dsn
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch(f"SELECT id, note FROM {unique_name} ORDER BY id")
    finally:
        await conn.close()
    assert [tuple(r) for r in rows] == [(1, "a"), (2, "b")]


async def test_stack_start_and_stop_are_idempotent_and_env_names_both_servers(
    devstack_dir: Path, unique_name: str
) -> None:
    stack = DevStack(devstack_dir / unique_name)
    await stack.start()
    await stack.start()
    try:
        env = stack.env()
        assert env["KAFKA_BOOTSTRAP_SERVERS"].startswith("127.0.0.1:")
        assert env["POSTGRES_DSN"].startswith("postgresql://postgres@127.0.0.1:")
        assert len(stack.pids()) == 2
    finally:
        await stack.stop()
    await stack.stop()


async def test_stack_with_postgres_only_starts_no_broker(
    devstack_dir: Path, unique_name: str
) -> None:
    async with DevStack(devstack_dir / unique_name, kafka=False) as stack:
        assert list(stack.env()) == ["POSTGRES_DSN"]
        assert stack.kafka is None


async def test_no_child_process_remains_after_the_stack_stops(
    devstack_dir: Path, unique_name: str
) -> None:
    async with DevStack(devstack_dir / unique_name) as stack:
        assert set(stack.pids()) <= _descendants(os.getpid())
        # postgres' own helpers (checkpointer, walwriter...) count too
        helpers = set().union(*(_descendants(pid) for pid in stack.pids()))
        assert helpers
        started = set(stack.pids()) | helpers
    assert await _wait_all_gone(started, timeout_s=10) == set()


_STACK_IN_CHILD = """
import asyncio, json, sys
from pathlib import Path
from service.dev.devstack import DevStack

async def main():
    async with DevStack(Path(sys.argv[1])) as stack:
        print(json.dumps(stack.pids()), flush=True)
        await asyncio.Event().wait()

asyncio.run(main())
"""


async def test_servers_end_when_their_parent_is_killed_with_sigkill(
    devstack_dir: Path, unique_name: str
) -> None:
    parent = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        _STACK_IN_CHILD,
        str(devstack_dir / unique_name),
        cwd=REPO_ROOT,
        stdout=asyncio.subprocess.PIPE,
    )
    assert parent.stdout is not None
    try:
        async with asyncio.timeout(60):
            server_pids = set(json.loads(await parent.stdout.readline()))
        orphans = _descendants(parent.pid)
        assert len(server_pids) == 2
        assert server_pids < orphans
    finally:
        parent.kill()
        await parent.wait()
    assert await _wait_all_gone(orphans, timeout_s=30) == set()


async def test_module_entry_prints_variables_and_stops_on_ctrl_c(
    devstack_dir: Path, unique_name: str
) -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "service.dev.devstack",
        "--work-dir",
        str(devstack_dir / unique_name),
        cwd=REPO_ROOT,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
    )
    assert proc.stdout is not None
    try:
        async with asyncio.timeout(60):
            lines = [(await proc.stdout.readline()).decode() for _ in range(2)]
        servers = _descendants(proc.pid)
        proc.send_signal(signal.SIGINT)
        async with asyncio.timeout(60):
            code = await proc.wait()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert lines[0].startswith("export KAFKA_BOOTSTRAP_SERVERS=127.0.0.1:")
    assert lines[1].startswith("export POSTGRES_DSN=postgresql://postgres@127.0.0.1:")
    assert code == 0
    assert await _wait_all_gone(servers, timeout_s=10) == set()
