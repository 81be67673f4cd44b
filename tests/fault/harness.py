"""Shared pieces of the fault-injection suite: a large seeded stream, feeders for both
transports, the service as a restartable process, and the checks of the final results.

The stream is built so that its correct result does not depend on *when* a fault hits:

* event time grows with the send order, with a jitter of at most ``JITTER_S`` (far
  below ``GRACE_S``), so no valid event is ever late, whatever the restarts, replays
  and partition interleavings;
* the deliberately late events (HTTP only, one partition) lie ``LATE_BY_S`` behind
  the stream, far beyond interval + grace: late in every possible run;
* invalid events break a rule that does not depend on state.

So the final stored aggregates must equal :func:`tests.e2e.workload.expected_aggregates`
of the valid events, exactly.
"""

from __future__ import annotations

import asyncio
import math
import os
import random
import time
import zlib
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from service.dev.emulator import Emulator
from tests.e2e.workload import (
    BASE_TS,
    FUNCS,
    INTERVAL,
    Key,
    ServiceProcess,
    expected_aggregates,
    free_port,
)

__all__ = [
    "GRACE_S",
    "Incarnation",
    "KafkaOutput",
    "Stream",
    "build_stream",
    "create_topic",
    "feed_http",
    "feed_kafka",
    "process_gone",
    "read_output_topic",
    "service_env",
    "status",
    "stored_valid_events",
    "wait_for",
]

GRACE_S = 10.0  # one window: far more than the jitter plus any partition skew
JITTER_S = 1.0
LATE_BY_S = 60.0
STREAM_S_PER_EVENT = 0.002  # 100k events span 200 s of event time = 20 windows
CHUNK = 500  # events per feeder step (1 s of event time)
IDLE_TIMEOUT_S = 5.0
SESSION_TIMEOUT_MS = 2000
PARTITIONS = 4

_INVALID = (
    ({"value": 1.0, "timestamp": BASE_TS}, "missing_name"),
    ({"name": "fault.bad", "value": "x", "timestamp": BASE_TS}, "invalid_value"),
    ({"name": "fault.bad", "value": 1, "timestamp": "2023-11-14T22:13:20"}, "invalid_timestamp"),
    (
        {"name": "fault.bad", "value": 1, "timestamp": BASE_TS, "agg_func": "median"},
        "unknown_agg_func",
    ),
    ("not an event", "not_an_object"),
)


@dataclass
class Stream:
    """Messages in send order: ``(kafka key or None, JSON bytes)``."""

    messages: list[tuple[bytes | None, bytes]]
    valid: list[dict[str, Any]]
    rejects: Counter[str] = field(default_factory=Counter)

    @property
    def expected(self) -> dict[Key, tuple[float, int]]:
        return expected_aggregates(self.valid)


def build_stream(
    seed: int,
    events: int = 100_000,
    *,
    names_per_func: int = 20,
    invalid_every: int = 197,
    late_every: int | None = None,
) -> Stream:
    """``events`` valid events over ``12 * names_per_func`` names (one function each),
    event time monotone up to ``JITTER_S``, plus invalid (and optionally late) ones."""
    rng = random.Random(seed)
    names = [(f"fault.{f}.{k}", f) for f in FUNCS for k in range(names_per_func)]
    stream = Stream([], [])
    for i in range(events):
        base = BASE_TS + i * STREAM_S_PER_EVENT
        ts = round(base + rng.uniform(0.0, JITTER_S), 3)
        name, func = rng.choice(names)
        value = rng.choice([float(rng.randint(-50, 50)), round(rng.uniform(-1e3, 1e3), 3)])
        stream.valid.append({"name": name, "value": value, "timestamp": ts, "agg_func": func})
        ev = {"name": name, "value": value, "timestamp": ts, "agg_func": func}
        stream.messages.append((name.encode(), orjson.dumps(ev)))
        if i % invalid_every == invalid_every - 1:
            obj, reason = _INVALID[(i // invalid_every) % len(_INVALID)]
            stream.messages.append((None, orjson.dumps(obj)))
            stream.rejects[reason] += 1
        if late_every and i % late_every == late_every - 1 and base - BASE_TS > 2 * LATE_BY_S:
            late = {"name": "fault.late", "value": 1.0, "timestamp": round(base - LATE_BY_S, 3)}
            stream.messages.append((b"fault.late", orjson.dumps(late)))
            stream.rejects["late"] += 1
    return stream


def partition_of(key: bytes | None, index: int) -> int:
    return index % PARTITIONS if key is None else zlib.crc32(key) % PARTITIONS


async def create_topic(bootstrap: str, topic: str, partitions: int = PARTITIONS) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(topic, partitions, 1)])
    finally:
        await admin.close()


Chunk = list[tuple[bytes | None, bytes]]


async def _paced(
    stream: Stream, rate: float, send: Callable[[Chunk, int], Awaitable[None]]
) -> None:
    started = time.monotonic()
    for n in range(0, len(stream.messages), CHUNK):
        await send(stream.messages[n : n + CHUNK], n)
        ahead = started + (n + CHUNK) / rate - time.monotonic()
        if ahead > 0:
            await asyncio.sleep(ahead)


async def feed_kafka(bootstrap: str, topic: str, stream: Stream, rate: float) -> None:
    """Produce the stream at ``rate`` messages/s with ``send_batch``, keyed by name; each
    chunk is acknowledged before the next is sent, so event time stays ordered."""
    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap, linger_ms=20, max_batch_size=1 << 20, acks="all"
    )
    await producer.start()

    async def send(chunk: list[tuple[bytes | None, bytes]], offset: int) -> None:
        batches: dict[int, Any] = {}
        for j, (key, value) in enumerate(chunk):
            p = partition_of(key, offset + j)
            batch = batches.get(p)
            if batch is None:
                batch = batches[p] = producer.create_batch()
            if batch.append(key=key, value=value, timestamp=None) is None:
                raise AssertionError("batch full: make CHUNK smaller")
        acks = []
        for p, batch in batches.items():
            while True:
                try:
                    acks.append(await producer.send_batch(batch, topic, partition=p))
                    break
                except Exception:  # the broker may be restarting: try again
                    await asyncio.sleep(0.2)
        await asyncio.gather(*acks)

    try:
        await _paced(stream, rate, send)
    finally:
        await producer.stop()


async def feed_http(emulator: Emulator, stream: Stream, rate: float) -> None:
    async def send(chunk: list[tuple[bytes | None, bytes]], offset: int) -> None:
        emulator.append([value for _, value in chunk])

    await _paced(stream, rate, send)


def service_env(
    *,
    bus_url: str,
    storage: str,
    kafka_bootstrap: str,
    topic: str,
    state_dir: Path,
    postgres_dsn: str | None = None,
    table: str | None = None,
    extra: Mapping[str, str] = {},
) -> dict[str, str]:
    env = {
        "VABUS_URL": bus_url,
        "VABUS_WAIT": "0.5",
        "VABUS_KAFKA_SESSION_TIMEOUT_MS": str(SESSION_TIMEOUT_MS),
        "STORAGE_TYPE": storage,
        "KAFKA_BOOTSTRAP_SERVERS": kafka_bootstrap,
        "KAFKA_TOPIC": topic,
        "AGGREGATION_INTERVAL": str(int(INTERVAL)),
        "AGGREGATION_GRACE": str(int(GRACE_S)),
        "AGGREGATION_IDLE_TIMEOUT": str(IDLE_TIMEOUT_S),
        "METRICS_INTERVAL": "2",
        "HTTP_HOST": "127.0.0.1",
        "STATE_DIR": str(state_dir),
        "SHUTDOWN_TIMEOUT": "20",
        "LOG_LEVEL": "INFO",
    }
    if postgres_dsn is not None:
        env["POSTGRES_DSN"] = postgres_dsn
    if table is not None:
        env["POSTGRES_TABLE"] = table
    env.update(extra)
    return env


async def status(port: int) -> dict[str, Any] | None:
    """``/status`` of a service, or None while it does not answer."""
    try:
        async with (
            aiohttp.ClientSession() as http,
            http.get(
                f"http://127.0.0.1:{port}/status", timeout=aiohttp.ClientTimeout(total=3)
            ) as r,
        ):
            if r.status != 200:
                return None
            body: dict[str, Any] = await r.json()
            return body
    except (aiohttp.ClientError, TimeoutError):
        return None


async def wait_for(
    cond: Callable[[], Awaitable[Any]],
    timeout: float,
    what: str,
    proc: ServiceProcess | None = None,
) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        if proc is not None and proc.proc.poll() is not None:
            raise AssertionError(
                f"service exited ({proc.proc.returncode}) while waiting for "
                f"{what}:\n{proc.log_text()[-3000:]}"
            )
        result = await cond()
        if result:
            return result
        if time.monotonic() > deadline:
            tail = "" if proc is None else proc.log_text()[-3000:]
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}\n{tail}")
        await asyncio.sleep(0.1)


class Incarnation:
    """One run of the service process, with its own HTTP port and log, sharing the
    environment (and so STATE_DIR and the checkpoint namespace) with the others."""

    def __init__(self, env: Mapping[str, str], workdir: Path, index: int) -> None:
        self.port = free_port()
        run_dir = workdir / f"run{index:02d}"
        run_dir.mkdir(parents=True, exist_ok=True)
        self.started = time.monotonic()
        self.proc = ServiceProcess({**env, "HTTP_PORT": str(self.port)}, run_dir)

    async def status(self) -> dict[str, Any] | None:
        return await status(self.port)

    async def wait_events(self, at_least: int, timeout: float) -> dict[str, Any]:
        async def received() -> dict[str, Any] | None:
            st = await self.status()
            return st if st is not None and st.get("events_received", 0) >= at_least else None

        result: dict[str, Any] = await wait_for(
            received, timeout, f"{at_least} events received", self.proc
        )
        return result

    def kill9(self) -> None:
        self.proc.kill()

    def terminate(self, timeout: float = 40.0) -> int:
        return self.proc.terminate(timeout)


@dataclass
class KafkaOutput:
    """The aggregates topic read from the start: last value per key and duplicates."""

    latest: dict[Key, tuple[float, int]]
    messages: int
    duplicates: int  # messages whose key was already seen (same value: asserted)
    keys_with_duplicates: int


def _epoch(iso: str) -> float:
    from datetime import datetime

    return datetime.fromisoformat(iso).timestamp()


async def stored_valid_events(
    bootstrap: str, topic: str, stream: Stream, timeout: float = 60.0
) -> list[dict[str, Any]]:
    """The stream's valid events as the input topic holds them, once it holds every
    message sent: a produce retried across a broker restart may have been stored twice
    (a producer without idempotence cannot know), and then the service must count it
    twice too."""
    valid = {orjson.dumps(ev): ev for ev in stream.valid}  # the bytes build_stream sent
    consumer = AIOKafkaConsumer(
        topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest", group_id=None
    )
    await consumer.start()
    stored: list[dict[str, Any]] = []
    read = quiet_rounds = 0
    try:
        async with asyncio.timeout(timeout):
            while read < len(stream.messages) or quiet_rounds < 3:
                batches = await consumer.getmany(timeout_ms=300, max_records=50_000)
                got = [m for msgs in batches.values() for m in msgs]
                read += len(got)
                quiet_rounds = 0 if got else quiet_rounds + 1
                stored.extend(valid[m.value] for m in got if m.value in valid)
    finally:
        await consumer.stop()
    return stored


async def read_output_topic(
    bootstrap: str, topic: str, expected: Mapping[Key, Any], timeout: float = 60.0
) -> KafkaOutput:
    """Read until every expected key is present and nothing new arrives for a moment.

    Asserts that a key never carries two different values (a replay must repeat the
    same aggregate, never a partial one)."""
    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=bootstrap,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        group_id=None,
    )
    await consumer.start()
    latest: dict[Key, tuple[float, int]] = {}
    seen: Counter[Key] = Counter()
    messages = 0
    try:
        deadline = time.monotonic() + timeout
        quiet_rounds = 0
        while True:
            batches = await consumer.getmany(timeout_ms=300, max_records=50_000)
            got = 0
            for msgs in batches.values():
                for m in msgs:
                    v = orjson.loads(m.value)
                    assert m.key.decode() == v["name"]
                    key = (v["name"], v["agg_func"], _epoch(v["window_start"]))
                    value = (v["value"], v["count"])
                    old = latest.get(key)
                    assert old is None or _same(old, value), (
                        f"{key}: emitted as {old} and again as {value}"
                    )
                    latest[key] = value
                    seen[key] += 1
                    got += 1
            messages += got
            quiet_rounds = 0 if got else quiet_rounds + 1
            if expected.keys() <= latest.keys() and quiet_rounds >= 3:
                break
            if time.monotonic() > deadline:
                missing = sorted(expected.keys() - latest.keys())
                raise AssertionError(
                    f"{topic}: {len(missing)} expected aggregates never arrived, e.g. "
                    f"{missing[:5]}; {len(latest)} arrived"
                )
    finally:
        await consumer.stop()
    dups = sum(n - 1 for n in seen.values() if n > 1)
    return KafkaOutput(latest, messages, dups, sum(1 for n in seen.values() if n > 1))


def _same(a: tuple[float, int], b: tuple[float, int]) -> bool:
    return a[1] == b[1] and (a[0] == b[0] or (math.isnan(a[0]) and math.isnan(b[0])))


async def read_dead_letters(
    bootstrap: str, topic: str, at_least: int, timeout: float = 30.0
) -> Counter[str]:
    """Reasons of every dead letter in ``topic``: read until ``at_least`` arrived, then
    on until a read brings nothing more, so repeats are counted too."""
    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=bootstrap,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        group_id=None,
    )
    await consumer.start()
    reasons: Counter[str] = Counter()
    try:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            batch = await consumer.getmany(timeout_ms=1000)
            for msgs in batch.values():
                reasons.update(orjson.loads(m.value)["reason"] for m in msgs)
            if not batch and sum(reasons.values()) >= at_least:
                break
    finally:
        await consumer.stop()
    return reasons


def process_gone(pid: int) -> bool:
    """No such process, or only its zombie: it has exited and waits to be reaped by a
    parent that may not be ours (an orphan goes to init, which may reap it late)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] in ("Z", "X")


def seed_from_env(default: int) -> int:
    """``FAULT_SEED`` overrides the suite's seeds, to replay a failure or explore."""
    return int(os.environ.get("FAULT_SEED", default))


async def ledger_totals(dsn: str, namespace: str) -> Counter[str]:
    """The ledger the service wrote to PostgreSQL, summed over partitions and intervals."""
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch(
            "SELECT counter, sum(n)::int8 AS n FROM vabus_ledger WHERE namespace = $1"
            " GROUP BY counter",
            namespace,
        )
    finally:
        await conn.close()
    return Counter({r["counter"]: r["n"] for r in rows})


def ledger_problems(ledger: Counter[str], received: int, aggregated: int,
                    rejects: Counter[str], late_applied: int = 0) -> list[str]:  # fmt: skip
    """What in the stored ledger disagrees with what was sent (the stream is over and
    every window emitted, so nothing is open); ``late_applied``: corrections, among
    ``aggregated``."""
    want: Counter[str] = Counter(
        {"received": received, "aggregated": aggregated, "late_applied": late_applied}
    )
    for reason, n in rejects.items():
        want["late" if reason == "late" else f"rejected:{reason}"] += n
    got = +Counter({k: v for k, v in ledger.items()})
    problems = [] if got == +want else [f"ledger {dict(got)} != expected {dict(+want)}"]
    rejected = sum(v for k, v in got.items() if k.startswith("rejected:"))
    if got["received"] != got["aggregated"] + got["late"] + rejected:
        problems.append(f"ledger does not balance: {dict(got)}")
    return problems


async def window_late_total(dsn: str, namespace: str, column: str = "late") -> int:
    """Late events the service recorded against their emitted windows: dead-lettered
    (``late``) or applied as corrections (``late_applied``)."""
    assert column in ("late", "late_applied")
    conn = await asyncpg.connect(dsn)
    try:
        n = await conn.fetchval(
            f"SELECT coalesce(sum({column}), 0)::int8 FROM vabus_window_late WHERE namespace = $1",
            namespace,
        )
    finally:
        await conn.close()
    return int(n)
