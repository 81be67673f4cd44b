"""Routing rules end to end (contract §12.8, issue 19's acceptance, one source): the
service fed live over several partitions with a ROUTES_FILE that sends ``cpu.*`` to the
table ``host_metrics`` only, ``billing.*`` to the Kafka topic ``billing-aggregates`` and
to PostgreSQL, the rest to the defaults. Every destination equals an independent
computation of exactly its names, nothing is anywhere else, each aggregate is once in
each topic, also through ``kill -9`` cycles."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import asyncpg
import orjson
import pytest

from tests.e2e.live import (
    LiveRun,
    LiveWorkload,
    Message,
    build_live_workload,
    compare,
    read_aggregates,
    read_dead_letters,
)
from tests.e2e.live_actions import FAST_TAKEOVER, kill_and_replace_at
from tests.e2e.test_cli import run_cli
from tests.e2e.test_e2e_http import stored_rows
from tests.e2e.workload import Results

pytestmark = [pytest.mark.e2e, pytest.mark.integration]

PREFIXES = ("cpu", "billing", "web")  # name k of each function: PREFIXES[k % 3]


def routed(seed: int, *, events: int, rate: float, partitions: int) -> LiveWorkload:
    """:func:`build_live_workload` with its names ``live.<func>.<k>`` renamed to
    ``cpu.``, ``billing.`` or ``web.<func>.<k>``: every prefix on every partition."""
    w = build_live_workload(seed, events=events, rate=rate, partitions=partitions)

    def rename(name: str) -> str:
        _, func, k = name.split(".")
        return f"{PREFIXES[int(k) % 3]}.{func}.{k}"

    assert len(w.messages) == len(w.valid)  # no garbage: one valid event per message
    messages, valid = [], []
    for m, ev in zip(w.messages, w.valid, strict=True):
        sent = orjson.loads(m.value)
        sent["name"] = ev_name = rename(ev["name"])
        valid.append({**ev, "name": ev_name})
        messages.append(Message(m.at, m.partition, ev_name.encode(), orjson.dumps(sent), m.ts))
    return LiveWorkload(
        partitions,
        w.t0,
        rate,
        funcs={rename(n): f for n, f in w.funcs.items()},
        partition_of={rename(n): p for n, p in w.partition_of.items()},
        messages=messages,
        valid=valid,
    )


class Routed:
    """The run's destinations and what each must hold."""

    def __init__(self, run: LiveRun, unique_name: str) -> None:
        self.run = run
        self.host_table = f"host_{unique_name}"
        self.billing_topic = f"billing-{unique_name}"
        expected = run.expected()
        self.only: dict[str, Results] = {
            p: {k: v for k, v in expected.items() if k[0].startswith(f"{p}.")} for p in PREFIXES
        }

    @staticmethod
    def routes_file(path: Path, unique_name: str) -> Path:
        path.write_text(
            f"""\
routes:
  - name: hosts
    match: ["cpu.*"]
    outputs: [postgres]
    postgres_table: host_{unique_name}
  - name: billing
    match: ["billing.*"]
    outputs: [kafka, postgres]
    kafka_topic: billing-{unique_name}
"""
        )
        return path

    def tables_expected(self) -> dict[str, Results]:
        return {
            self.host_table: self.only["cpu"],
            self.run.table: {**self.only["billing"], **self.only["web"]},
        }

    async def settle(self, timeout: float = 90.0) -> dict[str, Results]:
        """Both tables once they equal what they must hold (or at the timeout)."""
        want = self.tables_expected()
        deadline = time.monotonic() + timeout
        rows: dict[str, Results] = {}
        while time.monotonic() < deadline:
            self.run.check_alive()
            rows = {t: await stored_rows(self.run.dsn, t) for t in want}
            if not any(compare(rows[t], want[t], t) for t in want):
                break
            await asyncio.sleep(0.5)
        return rows

    async def problems(self) -> list[str]:
        rows = await self.settle()
        out: list[str] = []
        for table, want in self.tables_expected().items():
            out += compare(rows[table], want, f"PostgreSQL {table}")
        topics = {self.billing_topic: self.only["billing"], self.run.topic: self.only["web"]}
        for topic, want in topics.items():
            got = await read_aggregates(self.run.bootstrap, topic, want)
            out += compare(got.latest, want, f"Kafka {topic}")
            if got.repeated:  # exactly once per destination, also after kill -9
                out.append(f"Kafka {topic}: {sum(got.repeated.values())} repeated messages")
        dead = await read_dead_letters(self.run.bootstrap, f"{self.run.topic}.dlq", 0)
        if dead:
            out.append(f"{len(dead)} dead letters, none expected: {dead[:2]}")
        return out


@pytest.mark.timeout(240)
async def test_each_destination_holds_exactly_its_routes_aggregates(
    kafka_bootstrap: str, postgres_dsn: str, unique_name: str, tmp_path: Path
) -> None:
    workload = routed(1901, events=6000, rate=400, partitions=4)
    routes = Routed.routes_file(tmp_path / "routes.yaml", unique_name)
    run = LiveRun(
        workload,
        kafka_bootstrap=kafka_bootstrap,
        postgres_dsn=postgres_dsn,
        unique_name=unique_name,
        workdir=tmp_path,
        late=0,
        env={"ROUTES_FILE": str(routes)},
    )
    dest = Routed(run, unique_name)
    async with run:
        await run.stream()
        problems = await dest.problems()
        [status] = [await inc.status() for inc in run.alive()]
    assert status is not None
    assert [r["name"] for r in status["routes"]] == ["hosts", "billing", "default"]
    written = status["route_aggregates_written"]
    want = {
        "hosts": {f"postgres:{dest.host_table}": len(dest.only["cpu"])},
        "billing": {
            f"kafka:{dest.billing_topic}": len(dest.only["billing"]),
            f"postgres:{run.table}": len(dest.only["billing"]),
        },
        "default": {
            f"kafka:{run.topic}": len(dest.only["web"]),
            f"postgres:{run.table}": len(dest.only["web"]),
        },
    }
    if written != want:
        problems.append(f"/status route_aggregates_written {written}, expected {want}")
    assert not problems, "\n".join(problems)
    assert run.exit_codes == {0: 0}
    print(
        f"\n[routes] {len(workload.valid)} events over {workload.partitions} partitions: "
        + ", ".join(f"{p}.* {len(dest.only[p])} aggregates" for p in PREFIXES)
        + f"; route metrics {written}"
    )


@pytest.mark.timeout(300)
async def test_routes_stay_exact_through_kill9_cycles(
    kafka_bootstrap: str, postgres_dsn: str, unique_name: str, tmp_path: Path
) -> None:
    """Killed and replaced twice mid-stream: every destination still holds each of its
    aggregates once (the read-back covers the route's own topic too)."""
    workload = routed(1902, events=12_000, rate=600, partitions=4)
    routes = Routed.routes_file(tmp_path / "routes.yaml", unique_name)

    run = LiveRun(
        workload,
        kafka_bootstrap=kafka_bootstrap,
        postgres_dsn=postgres_dsn,
        unique_name=unique_name,
        workdir=tmp_path,
        late=0,
        env={"ROUTES_FILE": str(routes), **FAST_TAKEOVER},
    )
    dest = Routed(run, unique_name)
    async with run:
        await run.stream(kill_and_replace_at(0.35, 0.7))
        problems = await dest.problems()
    assert not problems, "\n".join(problems)
    assert run.exit_codes == {2: 0}
    print(
        f"\n[routes, kill -9 x2] {len(workload.valid)} events: "
        + ", ".join(f"{p}.* {len(dest.only[p])} aggregates" for p in PREFIXES)
    )


@pytest.mark.timeout(240)
async def test_kafka_only_routes_survive_kill9_with_checkpoints_in_kafka(
    kafka_bootstrap: str, unique_name: str, tmp_path: Path
) -> None:
    """STORAGE_TYPE=kafka: checkpoints live in the group's Kafka topic and carry the
    route topic's offsets too; after kill -9 each topic holds each aggregate once."""
    workload = routed(1903, events=8000, rate=500, partitions=4)
    hosts = f"hosts-{unique_name}"
    routes = tmp_path / "routes.json"
    routes.write_text(
        orjson.dumps(
            {
                "routes": [
                    {
                        "name": "hosts",
                        "match": ["cpu.*"],
                        "outputs": ["kafka"],
                        "kafka_topic": hosts,
                    }
                ]
            }
        ).decode()
    )

    run = LiveRun(
        workload,
        kafka_bootstrap=kafka_bootstrap,
        unique_name=unique_name,
        workdir=tmp_path,
        storage="kafka",
        late=0,
        env={"ROUTES_FILE": str(routes), **FAST_TAKEOVER},
    )
    expected = run.expected()
    want = {
        hosts: {k: v for k, v in expected.items() if k[0].startswith("cpu.")},
        run.topic: {k: v for k, v in expected.items() if not k[0].startswith("cpu.")},
    }
    async with run:
        await run.stream(kill_and_replace_at(0.5))
        # the default topic alone never equals every name: this returns once no window
        # is open and the topic is quiet (the last windows close on the idle rule)
        await run.settle()
        problems: list[str] = list(run.problems)
        for topic, rows in want.items():
            got = await read_aggregates(run.bootstrap, topic, rows)
            problems += compare(got.latest, rows, f"Kafka {topic}")
            if got.repeated:
                problems.append(f"Kafka {topic}: {sum(got.repeated.values())} repeated messages")
    assert not problems, "\n".join(problems)
    assert run.exit_codes == {1: 0}


def test_check_names_the_bad_rule_and_exits_2_before_connecting(tmp_path: Path) -> None:
    routes = tmp_path / "routes.yaml"
    routes.write_text("routes:\n  - name: hosts\n    match: ['cpu.*']\n    outputs: [s3]\n")
    env = {
        "VABUS_URL": "http://127.0.0.1:9",  # nothing listens: exit 2 must come first
        "STORAGE_TYPE": "kafka",
        "ROUTES_FILE": str(routes),
    }
    started = time.monotonic()
    done = run_cli(["check"], env, tmp_path)
    assert done.returncode == 2, done.stdout + done.stderr
    assert "rule 1 'hosts': outputs=['s3']: expected a non-empty list" in done.stderr
    assert time.monotonic() - started < 30


async def test_migrate_creates_every_route_table(
    postgres_dsn: str, unique_name: str, tmp_path: Path
) -> None:
    routes = Routed.routes_file(tmp_path / "routes.yaml", unique_name)
    env = {
        "STORAGE_TYPE": "kafka,postgres",
        "POSTGRES_DSN": postgres_dsn,
        "POSTGRES_TABLE": f"agg_{unique_name}",
        "ROUTES_FILE": str(routes),
    }
    done = await asyncio.to_thread(run_cli, ["migrate"], env, tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"tables agg_{unique_name}, host_{unique_name}," in done.stdout
    assert await stored_rows(postgres_dsn, f"host_{unique_name}") == {}  # exists, empty
    conn = await asyncpg.connect(postgres_dsn)
    try:
        assert await conn.fetchval("SELECT to_regclass($1) IS NOT NULL", f"host_{unique_name}")
        await conn.execute(f"DROP TABLE agg_{unique_name}, host_{unique_name}")
    finally:
        await conn.close()
