"""Hostile but valid input against issue 19's features, the service as a process
(contract §12.1: input never stops the pipeline, no output holds a value a consumer
cannot parse): two sources (a Kafka topic and the HTTP emulator), ROUTES_FILE, a
directory archive and group-by tags on at once.

Names with odd Unicode (combining marks, right-to-left text and overrides, emoji with
joiners, 200 characters, glob metacharacters taken literally) meet route globs; values
at the ends of the double range (and -0.0) and odd tag values go through every output
and the archive (read back equal, bit for bit); names and tag values with lone
surrogates or control characters are dead letters before the archive and the routes;
one event that would overflow its window is refused (``overflow``) and not archived.
A replay over the archive then writes nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import subprocess
import sys
import time
from collections import Counter
from datetime import datetime
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import orjson
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from service.dev.emulator import Emulator
from tests.archived import archive_rows
from tests.e2e.workload import ServiceProcess, checkout_on_path, free_port

pytestmark = [pytest.mark.e2e, pytest.mark.integration]

INTERVAL = 10.0
WINDOWS = 4
FUNCS = ("sum", "min", "max", "count", "avg")
EXTREMES = (1.7e308, -1.7e308, 5e-324, -0.0)
NAMES = (
    "lit*a",  # route "lit" by 'lit[*]*': a literal star
    "lit?b",
    "lit[x]",
    "[x]",  # route "lit" by '[[]x[]]'
    "e\u0301.load",  # a combining mark: route "uni" by '*\u0301*'
    "\u00e9.load",  # the same letter precomposed: not that route
    "\u05e9\u05dc\u05d5\u05dd.cpu",  # right-to-left: route "uni"
    "\u0645\u0631\u062d\u0628\u0627",  # Arabic
    "a\u202eb\u202c",  # a right-to-left override (a format character, not a control)
    "\U0001f469\u200d\U0001f4bb.dev",  # emoji with a zero-width joiner
    "\U0001f600",  # route "uni" by '*\U0001f600*'
    "tag.a",  # route "star" when its region is '*' (exact, not a glob)
    "*",
    "?",
    "n" + "\u00f1" * 199,  # 200 characters
)
REGIONS = (
    None,
    "\U0001f1ea\U0001f1fa",  # route "eu"
    "e\u0301",
    "\u05e9\u05dc\u05d5\u05dd",
    "*",
    "r" * 200,
    "a\u202eb",
    'q"\\',
)
BAD_NAMES = ("a\x00b", "\ud800x", "z\x7f", "y\x1f", "\udc00")
BAD_REGIONS = ("\ud800", "a\x00b", "esc\x1b")
ROUTED = {"lit*a": "lit", "[x]": "lit"} | dict.fromkeys(
    ("e\u0301.load", "\u05e9\u05dc\u05d5\u05dd.cpu", "\U0001f600"), "uni"
)

Event = dict[str, Any]
Tags = frozenset[tuple[str, str]]
Key = tuple[str, Tags, str, float]


def route_of(name: str, region: str | None) -> str:
    """The route each event takes, stated by hand (first match wins)."""
    if name in ROUTED:
        return ROUTED[name]
    if region == REGIONS[1]:
        return "eu"
    if name.startswith("tag.") and region == "*":
        return "star"
    return "default"


def valid_events(base: float, marker: str) -> list[Event]:
    """One event per series, function and window: each aggregate is its event's value,
    whatever order the two sources' events arrive in."""
    out = []
    for i, name in enumerate(NAMES):
        for w in range(WINDOWS):
            region = REGIONS[(i + w) % len(REGIONS)]
            for j, func in enumerate(FUNCS):
                e: Event = {
                    "name": name,
                    "agg_func": func,
                    "value": EXTREMES[(i + w + j) % len(EXTREMES)],
                    "timestamp": round(base + w * INTERVAL + 1 + 0.37 * j + 0.01 * i, 3),
                    "t": marker,
                }
                if region is not None:
                    e["tags"] = {"region": region, "other": "\ud800 not grouped"}
                out.append(e)
    return out


def hostile_events(base: float, marker: str) -> list[Event]:
    ts = base + INTERVAL + 2
    return [
        {"name": n, "agg_func": "sum", "value": 1.0, "timestamp": ts, "t": marker}
        for n in BAD_NAMES
    ] + [
        {"name": "bad.tag", "value": 1.0, "timestamp": ts, "tags": {"region": r}, "t": marker}
        for r in BAD_REGIONS
    ]


def overflowing(name: str, base: float, marker: str) -> list[Event]:
    """Two events whose sum is not a finite double: the second to count is refused."""
    e = {"name": name, "agg_func": "sum", "value": 1.7e308, "timestamp": base + 3, "t": marker}
    return [e, dict(e)]


def wire(e: Event) -> bytes:
    """JSON text with ``\\u`` escapes (a lone surrogate has no UTF-8 form)."""
    return json.dumps(e).encode()


def tags_of(e: Event) -> Tags:
    return frozenset({"region": e["tags"]["region"]}.items()) if "tags" in e else frozenset()


def expected_of(events: list[Event]) -> dict[Key, tuple[float, int]]:
    out: dict[Key, tuple[float, int]] = {}
    for e in events:
        key = (
            e["name"],
            tags_of(e),
            e["agg_func"],
            math.floor(e["timestamp"] / INTERVAL) * INTERVAL,
        )
        assert key not in out  # one event per aggregate
        out[key] = (1.0 if e["agg_func"] == "count" else e["value"], 1)
    return out


def strict_json(raw: bytes) -> Any:
    """A parser that refuses NaN and Infinity, as a strict consumer does."""

    def refuse(token: str) -> Any:
        raise ValueError(f"not JSON: {token}")

    return json.loads(raw, parse_constant=refuse)


async def table_rows(dsn: str, table: str) -> dict[Key, tuple[float, int]]:
    conn = await asyncpg.connect(dsn)
    try:
        if await conn.fetchval("SELECT to_regclass($1)", table) is None:
            return {}
        rows = await conn.fetch(
            "SELECT name, tags::text AS tags, agg_func,"
            " extract(epoch from window_start)::float8 AS ws, value, count"
            f' FROM "{table}"'
        )
    finally:
        await conn.close()
    return {
        (r["name"], frozenset(json.loads(r["tags"]).items()), r["agg_func"], r["ws"]): (
            r["value"],
            r["count"],
        )
        for r in rows
    }


async def topic_values(bootstrap: str, topic: str, at_least: int) -> list[Any]:
    """Every record of a topic, each parsed strictly (the test fails on one that is not)."""
    consumer = AIOKafkaConsumer(
        topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest", group_id=None
    )
    await consumer.start()
    out: list[Any] = []
    try:
        async with asyncio.timeout(60):
            while True:
                batches = await consumer.getmany(timeout_ms=1000)
                if not batches and len(out) >= at_least:
                    return out
                out.extend(strict_json(m.value) for msgs in batches.values() for m in msgs)
    except TimeoutError:
        raise AssertionError(f"{topic}: {len(out)} of {at_least}") from None
    finally:
        await consumer.stop()


async def until_rows(dsn: str, table: str, want: set[Key], proc: ServiceProcess) -> None:
    got: set[Key] = set()
    try:
        async with asyncio.timeout(60):
            while got != want:
                assert proc.proc.poll() is None, proc.log_text()[-3000:]
                await asyncio.sleep(0.3)
                got = set(await table_rows(dsn, table))
    except TimeoutError:
        missing, extra = sorted(want - got, key=repr), sorted(got - want, key=repr)
        raise AssertionError(
            f"{table}: {len(missing)} missing, e.g. {missing[:3]}; {len(extra)} extra,"
            f" e.g. {extra[:3]}\n{proc.log_text()[-3000:]}"
        ) from None


def key_of(v: dict[str, Any]) -> Key:
    ws = datetime.fromisoformat(v["window_start"]).timestamp()
    return (v["name"], frozenset(v.get("tags", {}).items()), v["agg_func"], ws)


def grouped(tags: str | None) -> tuple[tuple[str, str], ...]:
    """The archive's ``tags`` column (JSON text), comparable."""
    assert tags is not None  # AGGREGATION_GROUP_BY is set: ``{}`` when none
    return tuple(sorted(json.loads(tags).items()))


async def test_hostile_names_values_and_tags_through_two_sources_routes_and_the_archive(
    kafka_bootstrap: str, postgres_dsn: str, unique_name: str, tmp_path: Path
) -> None:
    source, topic, table = f"in-{unique_name}", f"agg-{unique_name}", f"agg_{unique_name}"
    t_lit, t_uni, t_eu = (f"{r}_{unique_name}" for r in ("lit", "uni", "eu"))
    k_uni, k_star = f"uni-{unique_name}", f"star-{unique_name}"
    routes = tmp_path / "routes.json"
    rules = [
        {"name": "lit", "match": ["lit[*]*", "[[]x[]]"], "outputs": ["postgres"]}
        | {"postgres_table": t_lit},
        {"name": "uni", "match": ["*\U0001f600*", "*\u0301*", "\u05e9\u05dc\u05d5\u05dd.*"]}
        | {"outputs": ["kafka", "postgres"], "kafka_topic": k_uni, "postgres_table": t_uni},
        {"name": "eu", "match": ["*"], "tags": {"region": REGIONS[1]}, "outputs": ["postgres"]}
        | {"postgres_table": t_eu},
        {"name": "star", "match": ["tag.*"], "tags": {"region": "*"}, "outputs": ["kafka"]}
        | {"kafka_topic": k_star},
    ]
    routes.write_text(json.dumps({"routes": rules}))
    archive = tmp_path / "archive"
    admin = AIOKafkaAdminClient(bootstrap_servers=kafka_bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(source, 2, 1), NewTopic(topic, 1, 1)])
    finally:
        await admin.close()

    base = math.floor(time.time() / INTERVAL) * INTERVAL - 3600.0
    valid = valid_events(base, unique_name)
    hostile = hostile_events(base, unique_name)
    # through one source: the second is refused as it comes (a dead letter, not
    # archived); one through each: the second partition's share is left out of the merge
    # as the window closes (no dead letter: docs/aggregation.md), and both are archived
    ovf_one = overflowing("ovf.one", base, unique_name)
    ovf_two = overflowing("ovf.two", base, unique_name)
    # every other event through each source; the hostile ones through both
    # in event-time order within each source: a source's own disorder beyond a window
    # would make its events late, which is not what this test is about
    to_kafka = sorted([*valid[0::2], *hostile, ovf_two[0]], key=lambda e: e["timestamp"])
    to_http = sorted([*valid[1::2], *hostile, *ovf_one, ovf_two[1]], key=lambda e: e["timestamp"])
    env = {
        "VABUS_URL": f"kafka://{kafka_bootstrap}/{source}?group=g-{unique_name}"
        f"&metrics_topic=m-{unique_name} {{http}}",
        "VABUS_WAIT": "0.5",
        "VABUS_BATCH_LIMIT": "50",
        "STORAGE_TYPE": "kafka,postgres",
        "KAFKA_BOOTSTRAP_SERVERS": kafka_bootstrap,
        "KAFKA_TOPIC": topic,
        "POSTGRES_DSN": postgres_dsn,
        "POSTGRES_TABLE": table,
        "AGGREGATION_INTERVAL": str(INTERVAL),
        "AGGREGATION_IDLE_TIMEOUT": "12",  # above the first join of the Kafka source
        "AGGREGATION_GROUP_BY": "region",
        "ROUTES_FILE": str(routes),
        "ARCHIVE_URL": archive.as_uri(),
        "HTTP_HOST": "127.0.0.1",
        "STATE_DIR": str(tmp_path / "state"),
    }
    expected = expected_of(valid)
    for name in ("ovf.one", "ovf.two"):
        expected[(name, frozenset(), "sum", base)] = (1.7e308, 1)

    def share(route: str) -> dict[Key, tuple[float, int]]:
        return {
            k: v for k, v in expected.items() if route_of(k[0], dict(k[1]).get("region")) == route
        }

    tables = {t_lit: share("lit"), t_uni: share("uni"), t_eu: share("eu"), table: share("default")}
    topics = {k_uni: share("uni"), k_star: share("star"), topic: share("default")}
    assert all(tables.values()) and all(topics.values())  # every route is taken

    async with Emulator() as emulator:
        env["VABUS_URL"] = env["VABUS_URL"].format(http=emulator.url)
        producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap, linger_ms=5)
        await producer.start()
        try:
            for e in to_kafka:
                await producer.send_and_wait(source, wire(e), key=wire(e["name"])[:50])
        finally:
            await producer.stop()
        emulator.append(wire(e) for e in to_http)
        proc = ServiceProcess({**env, "HTTP_PORT": str(free_port())}, tmp_path)
        try:
            for t, want in tables.items():
                await until_rows(postgres_dsn, t, set(want), proc)
        finally:
            code = proc.terminate()
        assert code == 0, proc.log_text()[-3000:]

        def exact(got: dict[Key, tuple[float, int]], want: dict[Key, tuple[float, int]]) -> None:
            assert set(got) == set(want)
            # equal as numbers (a sum of -0.0 alone is 0.0, as in IEEE arithmetic)
            assert {k: got[k] for k in want} == want

        for t, want in tables.items():
            exact(await table_rows(postgres_dsn, t), want)
        for name, want in topics.items():
            values = await topic_values(kafka_bootstrap, name, len(want))
            assert [k for k, n in Counter(map(key_of, values)).items() if n > 1] == []
            exact({key_of(v): (v["value"], v["count"]) for v in values}, want)

        # dead letters: the hostile names and tag values, and the overflow; nothing else
        conn = await asyncpg.connect(postgres_dsn)
        try:
            dead = await conn.fetch(
                "SELECT raw, reason FROM dead_letters WHERE strpos(raw, $1) > 0", unique_name
            )
        finally:
            await conn.close()
        reasons = Counter(r["reason"] for r in dead)
        want_reasons = {"invalid_name": 2 * len(BAD_NAMES), "invalid_tags": 2 * len(BAD_REGIONS)}
        assert reasons == want_reasons | {"overflow": 1}
        kafka_dead = await topic_values(kafka_bootstrap, f"{topic}.dlq", len(dead))
        assert Counter(v["reason"] for v in kafka_dead) == reasons

        # the archive: every accepted event once, values bit for bit, tags as grouped
        got = Counter(
            (name, func, value, math.copysign(1.0, value), micros, grouped(tags))
            for (name, func, value, micros, tags), n in archive_rows(archive).items()
            for _ in range(n)
        )
        want_rows = Counter(
            (
                e["name"],
                e["agg_func"],
                e["value"],
                math.copysign(1.0, e["value"]),
                round(e["timestamp"] * 1_000_000),
                grouped(json.dumps({"region": e["tags"]["region"]} if "tags" in e else {})),
            )
            for e in [*valid, ovf_one[0], *ovf_two]
        )
        missing, extra = want_rows - got, got - want_rows
        assert not missing and not extra, (list(missing)[:3], list(extra)[:3])

        # a replay over the archive finds every window as the outputs hold it
        replay = subprocess.run(
            [
                sys.executable,
                "-m",
                "service",
                "replay",
                "--from",
                f"{base:.0f}",
                "--to",
                f"{base + 3600:.0f}",
            ],
            env={**os.environ, **env, "PYTHONPATH": checkout_on_path(None)},
            capture_output=True,
            text=True,
            timeout=120,
            cwd=tmp_path,
        )
        assert replay.returncode == 0, replay.stderr[-3000:]
        assert "changed 0, new 0" in replay.stdout and "written: nothing" in replay.stdout, (
            replay.stdout
        )
        for t, want in tables.items():
            exact(await table_rows(postgres_dsn, t), want)


# -- a source whose clock is far ahead, among two ------------------------------------

LIVE_INTERVAL = 5.0
LIVE_IDLE_S = 4.0  # AGGREGATION_IDLE_TIMEOUT: the on-time source pauses longer than this


class LiveFeed:
    """On-time events stamped with the wall clock, one per source every ``step`` s:
    ``on.k`` through Kafka (with one event ``ahead.k`` ahead of the clock by nearly
    AGGREGATION_MAX_FUTURE) and ``on.h`` through the emulator, which pauses."""

    def __init__(self, producer: AIOKafkaProducer, topic: str, emulator: Emulator) -> None:
        self.producer, self.topic, self.emulator = producer, topic, emulator
        self.fed: list[Event] = []

    async def kafka(self, e: Event) -> None:
        await self.producer.send_and_wait(self.topic, orjson.dumps(e), key=b"k")
        self.fed.append(e)

    def http(self, e: Event) -> None:
        self.emulator.append([e])
        self.fed.append(e)

    async def run(
        self, seconds: float, *, http_pause: tuple[float, float] | None, kafka_ahead: float = 0
    ) -> None:
        """Feed for ``seconds``; the HTTP source says nothing in ``http_pause``; with
        ``kafka_ahead``, every Kafka event is that far ahead (``ahead.k``: a wrong clock)."""
        start = time.monotonic()
        name = "ahead.k" if kafka_ahead else "on.k"
        while (t := time.monotonic() - start) < seconds:
            now = round(time.time(), 3)
            ts = round(now + kafka_ahead, 3)
            await self.kafka({"name": name, "agg_func": "sum", "value": 1.0, "timestamp": ts})
            if http_pause is None or not http_pause[0] <= t < http_pause[1]:
                self.http({"name": "on.h", "agg_func": "sum", "value": 1.0, "timestamp": now})
            await asyncio.sleep(0.25)  # the pace of a live feed, not a wait for an outcome


async def live_env(
    kafka_bootstrap: str, postgres_dsn: str, unique_name: str, tmp_path: Path, http_url: str
) -> dict[str, str]:
    """A Kafka topic (one partition) and the emulator into PostgreSQL and Kafka, names
    ``ahead.*`` routed to a table of their own, a directory archive."""
    source, topic, table = f"in-{unique_name}", f"agg-{unique_name}", f"agg_{unique_name}"
    routes = tmp_path / "routes.yaml"
    routes.write_text(
        f"routes:\n  - {{name: ahead, match: ['ahead.*'], outputs: [postgres],"
        f" postgres_table: ahead_{unique_name}}}\n"
    )
    admin = AIOKafkaAdminClient(bootstrap_servers=kafka_bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(source, 1, 1), NewTopic(topic, 1, 1)])
    finally:
        await admin.close()
    return {
        "VABUS_URL": f"kafka://{kafka_bootstrap}/{source}?group=g-{unique_name}"
        f"&metrics_topic=m-{unique_name} {http_url}",
        "VABUS_WAIT": "0.2",
        "STORAGE_TYPE": "kafka,postgres",
        "KAFKA_BOOTSTRAP_SERVERS": kafka_bootstrap,
        "KAFKA_TOPIC": topic,
        "POSTGRES_DSN": postgres_dsn,
        "POSTGRES_TABLE": table,
        "AGGREGATION_INTERVAL": str(LIVE_INTERVAL),
        "AGGREGATION_GRACE": "1",  # the two sources' transit differs by milliseconds
        "AGGREGATION_IDLE_TIMEOUT": str(LIVE_IDLE_S),
        "AGGREGATION_MAX_FUTURE": "3600",
        "ROUTES_FILE": str(routes),
        "ARCHIVE_URL": (tmp_path / "archive").as_uri(),
        "HTTP_HOST": "127.0.0.1",
        "STATE_DIR": str(tmp_path / "state"),
    }


async def test_a_source_with_one_event_far_ahead_makes_no_on_time_event_late_across_a_restart(
    kafka_bootstrap: str, postgres_dsn: str, unique_name: str, tmp_path: Path
) -> None:
    """Contract §12.1: one event up to AGGREGATION_MAX_FUTURE ahead must not make on-time
    events late. The Kafka source delivers one event 3,500 s ahead among on-time ones;
    the HTTP source then says nothing for longer than the idle timeout (the Kafka
    source's event time alone moves the watermark), and its on-time events after the
    pause are not late; the same after a restart, with routes and the archive on."""
    source, table = f"in-{unique_name}", f"agg_{unique_name}"
    ahead_table, archive = f"ahead_{unique_name}", tmp_path / "archive"
    async with Emulator() as emulator:
        env = await live_env(kafka_bootstrap, postgres_dsn, unique_name, tmp_path, emulator.url)
        producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap, linger_ms=0)
        await producer.start()
        feed = LiveFeed(producer, source, emulator)
        runs: list[ServiceProcess] = []

        def start() -> ServiceProcess:
            workdir = tmp_path / f"run{len(runs)}"
            workdir.mkdir()
            runs.append(ServiceProcess({**env, "HTTP_PORT": str(free_port())}, workdir))
            return runs[-1]

        try:
            proc = start()
            await until_source_reads(proc, 2)
            await feed.run(3, http_pause=None)
            ahead = round(time.time() + 3500.0, 3)
            await feed.kafka(
                {"name": "ahead.k", "agg_func": "sum", "value": 7.0, "timestamp": ahead}
            )
            await feed.run(LIVE_IDLE_S + 8, http_pause=(1, LIVE_IDLE_S + 4))
            assert proc.terminate() == 0, proc.log_text()[-3000:]
            proc = start()
            await until_source_reads(proc, 2)
            await feed.run(LIVE_IDLE_S + 8, http_pause=(1, LIVE_IDLE_S + 4))
            expected: set[Key] = {
                (e["name"], frozenset(), "sum", math.floor(e["timestamp"] / LIVE_INTERVAL) * 5.0)
                for e in feed.fed
            }
            # every partition then falls silent: the quiet rule writes the rest, the
            # window of the event ahead too
            got: dict[Key, tuple[float, int]] = {}
            # on a timeout, the checks below say what is wrong (late events first)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(60):
                    while set(got) != expected:
                        assert proc.proc.poll() is None, proc.log_text()[-3000:]
                        await asyncio.sleep(0.3)
                        got = await table_rows(postgres_dsn, table)
                        got |= await table_rows(postgres_dsn, ahead_table)
        finally:
            await producer.stop()
            for run in runs:
                run.terminate()
    conn = await asyncpg.connect(postgres_dsn)
    try:
        late = await conn.fetch(
            "SELECT raw, detail FROM dead_letters WHERE reason = 'late' AND raw LIKE '%on._%'"
        )
    finally:
        await conn.close()
    assert [(r["raw"], r["detail"]) for r in late] == []
    counts = Counter(
        (e["name"], math.floor(e["timestamp"] / LIVE_INTERVAL) * LIVE_INTERVAL) for e in feed.fed
    )
    assert {(k[0], k[3]): v for k, v in got.items()} == {
        k: (7.0 if k[0] == "ahead.k" else float(n), n) for k, n in counts.items()
    }
    assert ("ahead.k", math.floor(ahead / LIVE_INTERVAL) * LIVE_INTERVAL) in counts
    assert sum(archive_rows(archive).values()) == len(feed.fed)


async def until_source_reads(proc: ServiceProcess, sources: int) -> None:
    """Until /status shows every source with partitions of its own (the Kafka source
    has joined its group), so that the live feed is read as it goes."""
    async with aiohttp.ClientSession() as http, asyncio.timeout(60):
        while True:
            assert proc.proc.poll() is None, proc.log_text()[-3000:]
            try:
                async with http.get(f"http://127.0.0.1:{proc.http_port}/status") as r:
                    parts = list((await r.json())["partitions"])
            except (aiohttp.ClientError, KeyError):
                parts = []
            real = [p for p in parts if "(starting)" not in p]
            if len(real) >= sources:
                return
            await asyncio.sleep(0.2)


async def test_a_source_whose_clock_is_far_ahead_stalls_no_window_of_the_other(
    kafka_bootstrap: str, postgres_dsn: str, unique_name: str, tmp_path: Path
) -> None:
    """A producer whose clock is 3,500 s fast sends through the Kafka source all the
    time (it never falls idle), the HTTP source on time: the HTTP source's windows are
    written as they close, not when the fast source stops (contract §12.8)."""
    table = f"agg_{unique_name}"
    async with Emulator() as emulator:
        env = await live_env(kafka_bootstrap, postgres_dsn, unique_name, tmp_path, emulator.url)
        producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap, linger_ms=0)
        await producer.start()
        feed = LiveFeed(producer, f"in-{unique_name}", emulator)
        proc = ServiceProcess({**env, "HTTP_PORT": str(free_port())}, tmp_path)
        try:
            await until_source_reads(proc, 2)
            began = time.time()
            await feed.run(5 * LIVE_INTERVAL, http_pause=None, kafka_ahead=3500.0)
            # the HTTP source's windows that ended (plus the grace) 3 s ago or more: written
            # by now, while the fast source has not yet been quiet for the idle timeout
            closed: set[Key] = {
                ("on.h", frozenset(), "sum", s)
                for s in (
                    math.floor(e["timestamp"] / LIVE_INTERVAL) * LIVE_INTERVAL
                    for e in feed.fed
                    if e["name"] == "on.h"
                )
                if began < s and s + LIVE_INTERVAL + 1.0 + 3.0 < time.time()
            }
            assert len(closed) >= 2
            got = set(await table_rows(postgres_dsn, table))
            assert closed <= got, (sorted(closed - got, key=repr), proc.log_text()[-2000:])
        finally:
            await producer.stop()
            assert proc.terminate() == 0, proc.log_text()[-3000:]
