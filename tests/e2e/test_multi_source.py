"""The whole service as a process over three sources at once (contract §12.8, issue 19):
two Kafka topics and one HTTP bus (the emulator) in one VABUS_URL, into Kafka and
PostgreSQL, fed live in three phases with a ``kill -9`` and a restart in the middle.

The same names come from every source, so each window merges partitions of all three.
Every aggregate must equal an independent computation over the events of all sources,
in PostgreSQL and in the Kafka output, where each window is written once. The same run
with issue 19's routes (ROUTES_FILE) must put exactly each route's share in each of its
destinations.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import Counter, defaultdict
from datetime import datetime
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import orjson
import pytest
from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from prometheus_client.parser import text_string_to_metric_families

from service.dev.emulator import Emulator
from tests.archived import Row, archive_rows
from tests.e2e.kafka_pg import produce, read_all, stored_rows
from tests.e2e.test_status_page import CHROMIUM_FLAGS, chromium_path, number, poll
from tests.e2e.workload import ServiceProcess, free_port
from tests.hanging_vabus import serve_hanging_vabus

pytestmark = [pytest.mark.e2e, pytest.mark.integration]

INTERVAL = 10.0
NAMES = ("cpu.load", "billing.total", "queue.depth")
FUNCS = ("sum", "count", "min", "max")
PHASES = 3
WINDOWS_PER_PHASE = 4

Key = tuple[str, str, float]
Event = dict[str, Any]


def phase_events(source: int, phase: int, base: float) -> list[Event]:
    """Events of one source for one phase: its windows only (a phase never reaches
    back into an earlier one's windows), every name and function in each."""
    out: list[Event] = []
    first = base + phase * WINDOWS_PER_PHASE * INTERVAL
    for w in range(WINDOWS_PER_PHASE):
        for i in range(15):
            ts = round(first + w * INTERVAL + (i * 0.61 + source * 0.17) % INTERVAL, 3)
            for name in NAMES:
                value = float((i * 7 + source * 3 + w) % 23) - 5.0
                out.extend(
                    {"name": name, "agg_func": f, "value": value, "timestamp": ts} for f in FUNCS
                )
    return out


def expected_of(events: list[Event]) -> dict[Key, tuple[float, int]]:
    by_key: dict[Key, list[float]] = defaultdict(list)
    for e in events:
        start = math.floor(e["timestamp"] / INTERVAL) * INTERVAL
        by_key[(e["name"], e["agg_func"], start)].append(e["value"])
    return {k: (_value(k[1], v), len(v)) for k, v in by_key.items()}


def _value(func: str, values: list[float]) -> float:
    if func == "count":
        return float(len(values))
    if func == "sum":
        return float(sum(values))
    return min(values) if func == "min" else max(values)


async def until_stored(
    dsn: str, table: str, keys: set[Key], proc: ServiceProcess, timeout_s: float = 90
) -> None:
    async with asyncio.timeout(timeout_s):
        while not keys <= set(await stored_rows(dsn, table)):
            assert proc.proc.poll() is None, proc.log_text()[-3000:]
            await asyncio.sleep(0.3)


async def positions(dsn: str, namespace: str) -> dict[str, str]:
    """The checkpointed positions of a namespace, by partition id."""
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch(
            "SELECT partition, position FROM vabus_checkpoints"
            " WHERE namespace = $1 AND position IS NOT NULL",
            namespace,
        )
    finally:
        await conn.close()
    return {r["partition"]: r["position"] for r in rows}


async def check_sources_shown(port: int, where: list[str]) -> None:
    """Each source on /status, /metrics (label ``source``) and the page, in order."""
    from playwright.async_api import async_playwright

    executable = chromium_path()
    async with aiohttp.ClientSession() as http:
        async with http.get(f"http://127.0.0.1:{port}/status") as r:
            sources = (await r.json())["sources"]
        async with http.get(f"http://127.0.0.1:{port}/metrics") as r:
            text = await r.text()
    assert [s["source"] for s in sources] == [1, 2, 3]
    assert [s["transport"] for s in sources] == ["kafka", "kafka", "http"]
    assert all(w in s["url"] or w == "http" for s, w in zip(sources, where, strict=True))
    assert all(s["events"] > 0 and s["last_event_time"] for s in sources), sources
    received = {
        m.labels["source"]: m.value
        for f in text_string_to_metric_families(text)
        if f.name == "vabus_aggregator_source_events_received"
        for m in f.samples
    }
    assert set(received) == {"1", "2", "3"} and all(received.values())
    async with async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=executable, args=CHROMIUM_FLAGS)
        try:
            page = await browser.new_page()
            await page.goto(f"http://127.0.0.1:{port}/", timeout=10_000)
            rows = page.locator("#sources tr")

            async def three_rows() -> bool:
                return await rows.count() == 3

            await poll(three_rows, 15, "three sources on the page")
            cells = [await rows.nth(i).locator("td").all_text_contents() for i in range(3)]
        finally:
            await browser.close()
    assert [c[:2] for c in cells] == [["1", "kafka"], ["2", "kafka"], ["3", "http"]]
    assert all(number(c[3]) > 0 for c in cells), cells


def closable(keys: set[Key]) -> set[Key]:
    """The windows the watermark closes while the sources hold it: all but the last."""
    last = max(k[2] for k in keys)
    return {k for k in keys if k[2] < last}


def key_of(value: dict[str, Any]) -> Key:
    return (
        value["name"],
        value["agg_func"],
        datetime.fromisoformat(value["window_start"]).timestamp(),
    )


async def run_three_sources(
    kafka_bootstrap: str,
    postgres_dsn: str,
    unique_name: str,
    tmp_path: Path,
    more_env: dict[str, str],
    stored_in: str,
) -> list[Event]:
    """Feed two Kafka topics and the HTTP emulator live in three phases through one
    service, with a ``kill -9`` and a restart during the second, until every window is
    in the table ``stored_in``; the events fed."""
    topics = [f"in-a-{unique_name}", f"in-b-{unique_name}"]
    output, table = f"out-{unique_name}", f"agg_{unique_name}"
    admin = AIOKafkaAdminClient(bootstrap_servers=kafka_bootstrap)
    await admin.start()
    try:
        await admin.create_topics(
            [NewTopic(topics[0], 2, 1), NewTopic(topics[1], 3, 1), NewTopic(output, 1, 1)]
        )
    finally:
        await admin.close()
    base = math.floor(time.time() / INTERVAL) * INTERVAL - 3600.0
    fed: list[Event] = []

    async with Emulator() as emulator:

        async def feed(phase: int) -> set[Key]:
            """All three sources' events of ``phase``, within a moment of each other."""
            a, b, h = (phase_events(s, phase, base) for s in (1, 2, 3))
            await asyncio.gather(
                produce(kafka_bootstrap, topics[0], a), produce(kafka_bootstrap, topics[1], b)
            )
            emulator.append(h)
            fed.extend(a + b + h)
            return {k for k in expected_of(a + b + h) if in_table(k)}

        def in_table(key: Key) -> bool:
            return stored_in == table or key[0].startswith("cpu.")

        env = {
            "VABUS_URL": " ".join(
                [
                    f"kafka://{kafka_bootstrap}/{topics[0]}?group=ga-{unique_name}"
                    f"&metrics_topic=m-{unique_name}",
                    f"kafka://{kafka_bootstrap}/{topics[1]}?group=gb-{unique_name}",
                    emulator.url,
                ]
            ),
            "VABUS_WAIT": "0.5",
            "VABUS_BATCH_LIMIT": "97",
            "VABUS_KAFKA_SESSION_TIMEOUT_MS": "4000",
            "STORAGE_TYPE": "kafka,postgres",
            "KAFKA_BOOTSTRAP_SERVERS": kafka_bootstrap,
            "KAFKA_TOPIC": output,
            "POSTGRES_DSN": postgres_dsn,
            "POSTGRES_TABLE": table,
            "AGGREGATION_INTERVAL": str(INTERVAL),
            # every source is fed within a moment of the others; none falls idle first,
            # and a Kafka source rejoining after kill -9 (the dead member's session of
            # 4 s expires first) still holds the watermark while it does (sources.md)
            "AGGREGATION_IDLE_TIMEOUT": "20",
            "HTTP_HOST": "127.0.0.1",
            "STATE_DIR": str(tmp_path / "state"),
            **more_env,
        }
        # Each phase is fed while every source still holds the watermark (they fall
        # idle only AGGREGATION_IDLE_TIMEOUT after their last message): a source that
        # fell idle holds nothing, and the first one fed would close windows the others'
        # events of the same phase still belong to. So the next phase follows as soon as
        # the windows the watermark can close (all but each phase's last) are stored.
        keys = await feed(0)
        proc = ServiceProcess({**env, "HTTP_PORT": str(free_port())}, tmp_path)
        try:
            await until_stored(postgres_dsn, stored_in, closable(keys), proc)
            new = await feed(1)
            keys |= new
            # killed while phase 1 is on its way (some of it durable, the rest not), once
            # every source has a checkpoint with a position, under its own ids
            namespace = f"kafka:{topics[0]}:ga-{unique_name}"  # source 1's
            async with asyncio.timeout(60):
                while not (
                    set(await stored_rows(postgres_dsn, stored_in)) & new
                    and {p.split("/")[0] for p in await positions(postgres_dsn, namespace)}
                    >= {topics[0] + ":0", "s2", "s3"}
                ):
                    await asyncio.sleep(0.05)
            stored = await positions(postgres_dsn, namespace)
            assert "s3/http" in stored and f"s2/{topics[1]}:0" in stored, stored
            proc.kill()
            (tmp_path / "again").mkdir()
            proc = ServiceProcess({**env, "HTTP_PORT": str(free_port())}, tmp_path / "again")
            await until_stored(postgres_dsn, stored_in, closable(keys), proc)
            keys |= await feed(2)
            await until_stored(postgres_dsn, stored_in, keys, proc)
            if not more_env:
                await check_sources_shown(proc.http_port, [topics[0], topics[1], "http"])
        finally:
            code = proc.terminate()
        assert code == 0, proc.log_text()[-3000:]
    return fed


async def test_two_kafka_topics_and_an_http_bus_stay_exact_through_kill_9(
    kafka_bootstrap: str, postgres_dsn: str, unique_name: str, tmp_path: Path
) -> None:
    output, table = f"out-{unique_name}", f"agg_{unique_name}"
    fed = await run_three_sources(kafka_bootstrap, postgres_dsn, unique_name, tmp_path, {}, table)
    expected = expected_of(fed)
    rows = await stored_rows(postgres_dsn, table)
    wrong = {k: (rows.get(k), v) for k, v in expected.items() if rows.get(k) != v}
    assert wrong == {} and len(rows) == len(expected)
    written = await read_all(kafka_bootstrap, output, len(expected))
    twice = [k for k, n in Counter(key_of(v) for v in written).items() if n > 1]
    assert twice == []
    assert {key_of(v): (v["value"], v["count"]) for v in written} == expected


async def test_three_sources_into_routes_every_destination_exact_through_kill_9(
    kafka_bootstrap: str, postgres_dsn: str, unique_name: str, tmp_path: Path
) -> None:
    """Issue 19's acceptance routes over the three sources: ``cpu.*`` only to the table
    ``host_metrics`` (here with a unique suffix), ``billing.*`` to its own topic and the
    default table, the rest to the defaults; each destination holds exactly its share."""
    output, table = f"out-{unique_name}", f"agg_{unique_name}"
    hosts, billing = f"host_metrics_{unique_name}", f"billing-aggregates-{unique_name}"
    routes = tmp_path / "routes.yaml"
    routes.write_text(
        "routes:\n"
        f"  - {{name: hosts, match: ['cpu.*'], outputs: [postgres], postgres_table: {hosts}}}\n"
        f"  - {{name: billing, match: ['billing.*'], outputs: [kafka, postgres],"
        f" kafka_topic: {billing}}}\n"
    )
    fed = await run_three_sources(
        kafka_bootstrap, postgres_dsn, unique_name, tmp_path, {"ROUTES_FILE": str(routes)}, hosts
    )
    expected = expected_of(fed)

    def share(*prefixes: str) -> dict[Key, tuple[float, int]]:
        return {k: v for k, v in expected.items() if k[0].startswith(prefixes)}

    async with asyncio.timeout(60):  # the hosts table is complete; the others follow
        while set(await stored_rows(postgres_dsn, table)) != set(share("billing.", "queue.")):
            await asyncio.sleep(0.3)
    assert await stored_rows(postgres_dsn, hosts) == share("cpu.")
    assert await stored_rows(postgres_dsn, table) == share("billing.", "queue.")
    for topic, want in ((billing, share("billing.")), (output, share("queue."))):
        written = await read_all(kafka_bootstrap, topic, len(want))
        assert [k for k, n in Counter(key_of(v) for v in written).items() if n > 1] == []
        assert {key_of(v): (v["value"], v["count"]) for v in written} == want, topic


# -- issue 19's acceptance in one run: routes, the archive, kill -9 and a hung source --

HANG_S = 30.0  # how long the HTTP source stops answering
HANG_WINDOWS = range(12, 20)  # fed to the Kafka sources only while it hangs
AFTER_PHASE = 5  # windows 20-23, after the hang
IDLE_S = 6.0  # AGGREGATION_IDLE_TIMEOUT: above the Kafka session timeout (3 s)
ON_TIME_S = 10.0  # a window of the Kafka sources must be written within this of its end
KAFKA_ONLY = ("cpu.kafka", "billing.kafka", "queue.kafka")


def hang_events(window: int, base: float, partition: int) -> list[Event]:
    """Kafka-only names' events of one window on one Kafka partition (every partition
    gets some, so none falls idle while the HTTP source hangs)."""
    start = base + window * INTERVAL
    return [
        {
            "name": name,
            "agg_func": func,
            "value": float((window * 5 + partition * 3 + j) % 11) - 2.5,
            "timestamp": round(start + 1.0 + 3.0 * j + 0.1 * partition, 3),
        }
        for j in range(3)
        for name in KAFKA_ONLY
        for func in ("sum", "min")
    ]


def sync_event(phase: int, base: float) -> Event:
    """An event at the first instant of a phase: each partition that delivered it holds
    the watermark there, so no source's events of the phase can close its windows before
    the others' arrive, whichever source was idle before."""
    ts = base + phase * WINDOWS_PER_PHASE * INTERVAL
    return {"name": "queue.sync", "agg_func": "count", "value": 1.0, "timestamp": ts}


async def produce_to(bootstrap: str, topic: str, by_partition: dict[int, list[Event]]) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=2)
    await producer.start()
    try:
        sent = [
            await producer.send(topic, orjson.dumps(e), key=e["name"].encode(), partition=p)
            for p, events in by_partition.items()
            for e in events
        ]
        await asyncio.gather(*sent)
    finally:
        await producer.stop()


async def partitions_at(port: int, ids: list[str], ts: float, proc: ServiceProcess) -> None:
    """Until /status shows every partition of ``ids`` has delivered event time ``ts``."""
    async with aiohttp.ClientSession() as http, asyncio.timeout(60):
        while True:
            assert proc.proc.poll() is None, proc.log_text()[-3000:]
            try:
                async with http.get(f"http://127.0.0.1:{port}/status") as r:
                    parts = (await r.json())["partitions"]
            except (aiohttp.ClientError, KeyError):
                parts = {}
            if all(((parts.get(i) or {}).get("max_event_time") or 0) >= ts for i in ids):
                return
            await asyncio.sleep(0.2)


class FirstSeen:
    """When each window of the Kafka-only names first shows in PostgreSQL (monotonic)."""

    def __init__(self, dsn: str, tables: list[str]) -> None:
        self.dsn, self.tables = dsn, tables
        self.at: dict[Key, float] = {}

    async def run(self) -> None:
        while True:
            for table in self.tables:
                for key in await stored_rows(self.dsn, table):
                    if key[0] in KAFKA_ONLY:
                        self.at.setdefault(key, time.monotonic())
            await asyncio.sleep(0.2)


async def test_acceptance_routes_archive_kill_9_and_a_hung_http_source(
    kafka_bootstrap: str, postgres_dsn: str, unique_name: str, tmp_path: Path
) -> None:
    """Issue 19's acceptance in one run: two Kafka topics and one HTTP bus into the
    routes (``cpu.*`` to ``host_metrics`` only, ``billing.*`` to its own topic and
    PostgreSQL, the rest the defaults) and an archive directory, fed live with a
    ``kill -9`` before and one after the HTTP source hangs for 30 s. While it hangs the
    Kafka sources' windows close on time; every destination equals the independent
    computation, each window once; the archive holds every event exactly once."""
    topics = [f"in-a-{unique_name}", f"in-b-{unique_name}"]
    output, table = f"out-{unique_name}", f"agg_{unique_name}"
    hosts, billing = f"host_metrics_{unique_name}", f"billing-aggregates-{unique_name}"
    archive = tmp_path / "archive"
    routes = tmp_path / "routes.yaml"
    routes.write_text(
        "routes:\n"
        f"  - {{name: hosts, match: ['cpu.*'], outputs: [postgres], postgres_table: {hosts}}}\n"
        f"  - {{name: billing, match: ['billing.*'], outputs: [kafka, postgres],"
        f" kafka_topic: {billing}}}\n"
    )
    admin = AIOKafkaAdminClient(bootstrap_servers=kafka_bootstrap)
    await admin.start()
    try:
        await admin.create_topics(
            [NewTopic(topics[0], 2, 1), NewTopic(topics[1], 3, 1), NewTopic(output, 1, 1)]
        )
    finally:
        await admin.close()
    kafka_parts = {topics[0]: [0, 1], topics[1]: [0, 1, 2]}
    part_ids = [f"{topics[0]}:0", f"{topics[0]}:1"] + [f"s2/{topics[1]}:{p}" for p in range(3)]
    all_ids = [*part_ids, "s3/http"]
    base = math.floor(time.time() / INTERVAL) * INTERVAL - 3600.0
    fed: list[Event] = []

    async with serve_hanging_vabus() as (server, http_url):

        async def sync(phase: int, proc: ServiceProcess) -> None:
            mark = sync_event(phase, base)
            server.add([mark])
            for topic, parts in kafka_parts.items():
                await produce_to(kafka_bootstrap, topic, {p: [mark] for p in parts})
            fed.extend([mark] * 6)
            await partitions_at(proc.http_port, all_ids, mark["timestamp"], proc)

        async def feed(phase: int) -> set[Key]:
            a, b, h = (phase_events(s, phase, base) for s in (1, 2, 3))
            server.add(h)
            await asyncio.gather(
                produce(kafka_bootstrap, topics[0], a), produce(kafka_bootstrap, topics[1], b)
            )
            fed.extend(a + b + h)
            return set(expected_of(a + b + h))

        env = {
            "VABUS_URL": " ".join(
                [
                    f"kafka://{kafka_bootstrap}/{topics[0]}?group=ga-{unique_name}"
                    f"&metrics_topic=m-{unique_name}",
                    f"kafka://{kafka_bootstrap}/{topics[1]}?group=gb-{unique_name}",
                    http_url,
                ]
            ),
            "VABUS_WAIT": "0.5",
            "VABUS_TIMEOUT": "120",  # the hang outlasts no request: it is a hang, not errors
            "VABUS_BATCH_LIMIT": "97",
            "VABUS_KAFKA_SESSION_TIMEOUT_MS": "3000",
            "STORAGE_TYPE": "kafka,postgres",
            "KAFKA_BOOTSTRAP_SERVERS": kafka_bootstrap,
            "KAFKA_TOPIC": output,
            "POSTGRES_DSN": postgres_dsn,
            "POSTGRES_TABLE": table,
            "AGGREGATION_INTERVAL": str(INTERVAL),
            "AGGREGATION_IDLE_TIMEOUT": str(IDLE_S),
            "ROUTES_FILE": str(routes),
            "ARCHIVE_URL": archive.as_uri(),
            "HTTP_HOST": "127.0.0.1",
            "STATE_DIR": str(tmp_path / "state"),
        }

        def start(n: int) -> ServiceProcess:
            (tmp_path / f"run{n}").mkdir()
            return ServiceProcess({**env, "HTTP_PORT": str(free_port())}, tmp_path / f"run{n}")

        async def until_routed(keys: set[Key], proc: ServiceProcess) -> None:
            cpu = {k for k in keys if k[0].startswith("cpu.")}
            await until_stored(postgres_dsn, hosts, cpu, proc)
            await until_stored(postgres_dsn, table, keys - cpu, proc)

        async def kill_once_durable(new: set[Key], proc: ServiceProcess) -> None:
            """``kill -9`` once some of ``new`` is written (the rest on its way)."""
            async with asyncio.timeout(60):
                while not set(await stored_rows(postgres_dsn, table)) & new:
                    await asyncio.sleep(0.05)
            proc.kill()

        keys = await feed(0)
        proc = start(0)
        seen = FirstSeen(postgres_dsn, [hosts, table])
        watcher = asyncio.create_task(seen.run())
        try:
            await until_routed(closable(keys), proc)
            await sync(1, proc)
            new = await feed(1)
            keys |= new
            await kill_once_durable(new, proc)  # killed while phase 1 is on its way
            proc = start(1)
            await until_routed(closable(keys), proc)
            await sync(2, proc)
            keys |= await feed(2)
            async with asyncio.timeout(30):  # the HTTP source takes all of phase 2 ...
                while server.handed < len(server.events):
                    await asyncio.sleep(0.05)
            server.hang()  # ... then hangs, its partition holding the watermark there
            assert server.hung_since is not None
            passed: dict[int, float] = {}  # window -> when the feed passed its end
            step = HANG_S / len(HANG_WINDOWS)
            for i, w in enumerate(HANG_WINDOWS):
                await asyncio.sleep(max(0.0, server.hung_since + i * step - time.monotonic()))
                for topic, parts in kafka_parts.items():
                    batch = {p: hang_events(w, base, p + 2 * (topic == topics[1])) for p in parts}
                    await produce_to(kafka_bootstrap, topic, batch)
                    fed.extend(e for events in batch.values() for e in events)
                if w - 1 in HANG_WINDOWS:
                    passed[w - 1] = time.monotonic()
            await asyncio.sleep(max(0.0, server.hung_since + HANG_S - time.monotonic()))
            assert server.hung and server.answered_while_hung == 0
            server.release()
            hang_keys = set(expected_of([e for e in fed if e["name"] in KAFKA_ONLY]))
            keys |= hang_keys
            await sync(AFTER_PHASE, proc)
            new = await feed(AFTER_PHASE)
            keys |= new
            await kill_once_durable(new, proc)  # killed after the hang too
            proc = start(2)
            await until_routed(keys, proc)
        finally:
            watcher.cancel()
            code = proc.terminate()
        assert code == 0, proc.log_text()[-3000:]

    # while it hung: each Kafka-only window written within ON_TIME_S of the feed passing
    # its end (the first ones wait for the hung partition to fall idle: IDLE_S)
    late = {}
    for w, at in sorted(passed.items()):
        start_ts = base + w * INTERVAL
        shown = [t for k, t in seen.at.items() if k[2] == start_ts]
        assert len(shown) == len(KAFKA_ONLY) * 2, (w, shown)
        late[w] = max(shown) - at
    print(
        "Kafka-only windows while the HTTP source hung, seconds from the feed passing"
        f" their end to their rows: {', '.join(f'{v:.1f}' for v in late.values())}"
    )
    assert min(late.values()) > 0 and max(late.values()) < ON_TIME_S, late

    expected = expected_of(fed)

    def share(*prefixes: str) -> dict[Key, tuple[float, int]]:
        return {k: v for k, v in expected.items() if k[0].startswith(prefixes)}

    assert await stored_rows(postgres_dsn, hosts) == share("cpu.")
    assert await stored_rows(postgres_dsn, table) == share("billing.", "queue.")
    for topic, want in ((billing, share("billing.")), (output, share("queue."))):
        written = await read_all(kafka_bootstrap, topic, len(want))
        assert [k for k, n in Counter(key_of(v) for v in written).items() if n > 1] == []
        assert {key_of(v): (v["value"], v["count"]) for v in written} == want, topic
    want_rows: Counter[Row] = Counter(
        (e["name"], e["agg_func"], e["value"], round(e["timestamp"] * 1_000_000), None) for e in fed
    )
    got_rows = archive_rows(archive)
    missing, extra = want_rows - got_rows, got_rows - want_rows
    assert not missing and not extra, (list(missing)[:3], list(extra)[:3])
    print(f"archive: {sum(got_rows.values())} events, each once")
