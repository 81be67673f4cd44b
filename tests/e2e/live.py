"""A live-stream harness: the service runs while a producer feeds it at a steady rate.

Unlike a topic filled before the service starts, a live feed keeps the service caught
up with the head of every partition, which is when partition-level watermark bugs show.
The stream is built so that its correct result does not depend on timing:

* event time runs the workload's ``time_scale`` (``TIME_SCALE`` unless the test sets
  it) times wall time from a ``t0`` in the recent past, the same clock for every
  partition, so partitions stay within one producer tick of each other;
* a tenth of the events are moved back by less than ``GRACE_S / 2``: within the grace
  of their own partition's progress, never late;
* "really late" events are released only after a window of their partition was seen
  written, ``CHECKPOINT_MARGIN_S`` before (so a checkpoint has passed): late in every
  possible run. "Written" is read from PostgreSQL when it is an output, else from the
  Kafka aggregates topic (the last value per key);
* garbage breaks a rule that does not depend on state.

So the stored aggregates must equal :func:`tests.e2e.workload.expected_aggregates` of
the valid events, and the dead letters must be exactly the garbage and the late ones, in
every output that ``STORAGE_TYPE`` names (``kafka`` alone needs no PostgreSQL at all).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import random
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

import aiohttp
import asyncpg
import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.errors import KafkaError
from prometheus_client.parser import text_string_to_metric_families

from service.repartition.router import internal_topic
from tests.e2e.test_e2e_http import stored_rows
from tests.e2e.workload import FUNCS, INTERVAL, Key, Results, expected_aggregates
from tests.fault.harness import (
    Incarnation,
    create_topic,
    ledger_problems,
    ledger_totals,
    service_env,
    wait_for,
    window_late_total,
)

__all__ = [
    "GRACE_S",
    "INTERVAL",
    "TIME_SCALE",
    "LiveRun",
    "LiveWorkload",
    "build_live_workload",
]

GRACE_S = 2.0
TIME_SCALE = 10.0  # event-time seconds per wall second
OUT_OF_ORDER = 0.1  # fraction of events moved back in time
MAX_SHIFT_MS = 999  # < GRACE_S / 2: out of order, never late
CHECKPOINT_MARGIN_S = 3.0  # a written window is used for late events this long after
# AGGREGATION_ALLOWED_LATENESS > 0: how far (event-time seconds) a late event stays from
# the end of its window's correction time, on the side it is released for
LATENESS_SAFETY_S = 10.0
SEEN_LAG_S = 1.5  # a window may be seen this long after it was written (poll + read)
TICK_S = 0.02  # producer pacing step
POLL_S = 0.5  # how often the observed output is read for written windows
QUIET_S = 3.0  # unchanged outputs and no open window for this long: settled

EventId = tuple[str, str, float, float]  # (name, agg_func, value, timestamp)
Action = Callable[["LiveRun"], Coroutine[Any, Any, None]]  # runs alongside the feed
Observe = Callable[[], Awaitable[dict[Key, tuple[float, int]]]]  # what an output holds now


@dataclass(frozen=True, slots=True)
class Message:
    at: float  # scheduled send time, wall seconds after the stream starts
    partition: int
    key: bytes | None
    value: bytes
    ts: float | None = None  # event time of a valid event


@dataclass
class LiveWorkload:
    """Messages in send order, the valid events among them and the expected rejects."""

    partitions: int
    t0: float
    rate: float
    funcs: dict[str, str]  # name -> agg_func
    partition_of: dict[str, int]  # keyed input: the partition of each name
    unkeyed: bool = False  # messages carry no key and go round-robin over the partitions
    time_scale: float = TIME_SCALE  # event-time seconds per wall second
    messages: list[Message] = field(default_factory=list)
    valid: list[dict[str, Any]] = field(default_factory=list)
    rejects: Counter[str] = field(default_factory=Counter)

    @property
    def duration(self) -> float:
        return len(self.messages) / self.rate

    def expected(self) -> dict[Key, tuple[float, int]]:
        return expected_aggregates(self.valid)

    def valid_ids(self) -> set[EventId]:
        return {_event_id(e) for e in self.valid}

    def last_event(self, partition: int) -> tuple[float, float]:
        """(scheduled send time, event time) of the partition's last valid event."""
        mine = [m for m in self.messages if m.partition == partition and m.ts is not None]
        return max(m.at for m in mine), max(m.ts for m in mine if m.ts is not None)


def _event_id(ev: Mapping[str, Any]) -> EventId:
    return (
        ev["name"],
        str(ev.get("agg_func") or "sum").lower(),
        float(ev["value"]),
        float(ev["timestamp"]),
    )


def _garbage(n: int, name: str, func: str, ts: float) -> tuple[bytes, bool, str]:
    """Garbage message ``n``: (value, keyed by ``name``?, expected reason)."""
    kinds: list[tuple[Any, bool, str]] = [
        (f"{{not json {n}".encode(), False, "invalid_json"),
        (f"plain text {n}", False, "not_an_object"),
        (n, False, "not_an_object"),
        ({"value": 1.0, "timestamp": ts, "agg_func": func}, False, "missing_name"),
        ({"name": "", "value": 1.0, "timestamp": ts}, False, "invalid_name"),
        ({"name": n, "value": 1.0, "timestamp": ts}, False, "invalid_name"),
        ({"name": name, "timestamp": ts, "agg_func": func}, True, "missing_value"),
        ({"name": name, "value": "12.5", "timestamp": ts, "agg_func": func}, True, "invalid_value"),
        ({"name": name, "value": True, "timestamp": ts, "agg_func": func}, True, "invalid_value"),
        ({"name": name, "value": 1.0, "agg_func": func}, True, "missing_timestamp"),
        (
            {"name": name, "value": 1.0, "timestamp": "2023-11-14T22:13:20"},
            True,
            "invalid_timestamp",
        ),
        (
            {"name": name, "value": 1.0, "timestamp": ts, "agg_func": "median"},
            True,
            "unknown_agg_func",
        ),
    ]
    obj, keyed, reason = kinds[n % len(kinds)]
    return (obj if isinstance(obj, bytes) else orjson.dumps(obj)), keyed, reason


def build_live_workload(
    seed: int,
    *,
    events: int,
    rate: float,
    partitions: int,
    garbage: int = 0,
    names_per_func: int = 12,
    silent_partition: int | None = None,
    silent_after: float = 0.1,
    unkeyed: bool = False,
    time_scale: float = TIME_SCALE,
    t0: float | None = None,
) -> LiveWorkload:
    """``events`` valid and ``garbage`` invalid messages sent at ``rate`` messages/s over
    ``partitions`` partitions, names assigned round-robin (so each partition carries every
    function). ``silent_partition`` gets events only during the first ``silent_after`` of
    the stream. ``unkeyed``: no message has a key, message ``m`` goes to partition
    ``m % partitions``, so every name is spread over every partition (the input of
    ``repartition=true``). Event time runs ``time_scale`` times wall time from ``t0``
    (default: a recent window start). Deterministic for a seed, except the default
    ``t0`` (event time must be recent)."""
    rng = random.Random(seed)
    # recent enough for AGGREGATION_MAX_FUTURE: the stream ends well before "now"
    if t0 is None:
        t0 = math.floor((time.time() - 3000) / INTERVAL) * INTERVAL
    names = [f"live.{f}.{k}" for f in FUNCS for k in range(names_per_func)]
    w = LiveWorkload(
        partitions,
        t0,
        rate,
        funcs={n: n.split(".")[1] for n in names},
        partition_of={n: i % partitions for i, n in enumerate(names)},
        unkeyed=unkeyed,
        time_scale=time_scale,
    )
    total = events + garbage
    garbage_at = set(rng.sample(range(total), garbage))
    loud = [n for n in names if w.partition_of[n] != silent_partition]
    part_max: dict[int, float] = {}
    bad = 0
    for m in range(total):
        at = m / rate
        base = round(t0 + time_scale * at, 3)
        pool = names if silent_partition is None or at < silent_after * total / rate else loud
        name = rng.choice(pool)
        func = w.funcs[name]
        p = m % partitions if unkeyed else w.partition_of[name]
        if m in garbage_at:
            value, keyed, reason = _garbage(bad, name, func, base)
            key = name.encode() if keyed and not unkeyed else None
            where = p if keyed or unkeyed else w.partition_of[pool[bad % len(pool)]]
            w.messages.append(Message(at, where, key, value))
            w.rejects[reason] += 1
            bad += 1
            continue
        ts = base
        if rng.random() < OUT_OF_ORDER:
            ts = round(base - rng.randint(1, MAX_SHIFT_MS) / 1000, 3)
        # within the grace of the partition's own progress: never late
        assert ts > part_max.get(p, -math.inf) - GRACE_S / 2
        part_max[p] = max(part_max.get(p, -math.inf), ts)
        v = rng.choice([float(rng.randint(-50, 50)), round(rng.uniform(-1e3, 1e3), 3)])
        w.valid.append({"name": name, "value": v, "timestamp": ts, "agg_func": func})
        sent_func = func.upper() if m % 7 == 0 else func  # agg_func is case-insensitive
        ev = {"name": name, "value": v, "timestamp": ts, "agg_func": sent_func}
        key = None if unkeyed else name.encode()
        w.messages.append(Message(at, p, key, orjson.dumps(ev), ts))
    assert t0 + time_scale * w.duration < time.time() + 3600
    # and never more than AGGREGATION_MAX_WATERMARK_LEAD (60 s) ahead of the clock when
    # sent: such events would move no event time (docs/aggregation.md, "Clock skew")
    assert t0 + time_scale * w.duration < time.time() + w.duration + 60
    return w


@dataclass(frozen=True, slots=True)
class LateEvent:
    event: dict[str, Any]
    partition: int
    window_start: float
    released_at: float  # wall seconds after the stream started


class LiveFeed:
    """Produces a workload at its pace and releases really-late events on the way.

    Late event ``j`` is due at an even spread over the stream; it is released once some
    window of an allowed partition was seen written (by ``observe``, which reads one
    output, described by ``where``) ``CHECKPOINT_MARGIN_S`` before, with no disruption (a
    ``kill -9``) from ``SEEN_LAG_S`` before it was seen to the end of that margin, keyed
    by a name of that window."""

    def __init__(
        self,
        bootstrap: str,
        topic: str,
        workload: LiveWorkload,
        *,
        observe: Observe,
        where: str,
        late: int,
        seed: int,
        late_partitions: Iterable[int] | None = None,
        corrections: int = 0,
        lateness: float = 0.0,
    ) -> None:
        self._bootstrap, self._topic, self._w = bootstrap, topic, workload
        self._observe, self._where = observe, where
        self._late = late
        self._rng = random.Random(seed + 1)
        self._allowed = sorted(
            set(range(workload.partitions) if late_partitions is None else late_partitions)
        )
        first, last = min(4.5, workload.duration / 3), 0.85 * workload.duration
        step = (last - first) / max(late - 1, 1)
        self._late_due = [first + j * step for j in range(late)]
        # AGGREGATION_ALLOWED_LATENESS: late events are released only for windows whose
        # correction time has passed; ``corrections`` events only for windows still
        # correctable (judged by the event time sent so far: the partition's own)
        self._lateness = lateness
        self._corrections = corrections
        cstep = (last - first) / max(corrections - 1, 1)
        self._correction_due = [first + 0.5 + j * cstep for j in range(corrections)]
        self.corrected: list[LateEvent] = []
        self._written: dict[tuple[int, float], tuple[float, list[str]]] = {}
        self._disruptions: list[float] = []
        self.started = 0.0
        self.sent = 0
        self.main_done_at: float | None = None  # wall s after start: last workload message
        self.done_at: float | None = None  # last message of any kind
        self.released: list[LateEvent] = []

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    @property
    def progress(self) -> float:
        return self.sent / len(self._w.messages)

    def disrupt(self) -> None:
        """Windows seen written just before now may have no durable checkpoint yet."""
        self._disruptions.append(self.elapsed())

    async def run(self) -> None:
        self.started = time.monotonic()
        poller = asyncio.create_task(self._poll_written())
        try:
            await self._produce()
        finally:
            poller.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await poller

    async def _produce(self) -> None:
        producer = AIOKafkaProducer(
            bootstrap_servers=self._bootstrap, acks="all", max_batch_size=1 << 20
        )
        await producer.start()
        msgs, i = self._w.messages, 0
        late_deadline = self._w.duration + 30.0
        try:
            while (
                i < len(msgs)
                or len(self.released) < self._late
                or len(self.corrected) < self._corrections
            ):
                now = self.elapsed()
                chunk: list[Message] = []
                while i < len(msgs) and msgs[i].at <= now:
                    chunk.append(msgs[i])
                    i += 1
                chunk.extend(self._due_late(now))
                chunk.extend(self._due_corrections(now))
                if chunk:
                    await _send(producer, self._topic, chunk)
                    self.sent, self.done_at = i, self.elapsed()
                    if i == len(msgs) and self.main_done_at is None:
                        self.main_done_at = self.done_at
                if now > late_deadline:
                    raise AssertionError(
                        f"harness: released {len(self.released)} of {self._late} late events "
                        f"and {len(self.corrected)} of {self._corrections} corrections "
                        f"in {now:.0f} s: no window was seen written in {self._where}"
                    )
                await asyncio.sleep(max(0.0, TICK_S - (self.elapsed() - now)))
        finally:
            await producer.stop()

    def _usable(self, now: float) -> list[tuple[int, float]]:
        """(partition, window) seen written, with a checkpoint since and no disruption
        around: a late event for it is late in every possible run."""
        return [
            (p, ws)
            for (p, ws), (seen, _) in self._written.items()
            if p in self._allowed
            and now - seen >= CHECKPOINT_MARGIN_S
            and not any(
                seen - SEEN_LAG_S <= d < seen + CHECKPOINT_MARGIN_S for d in self._disruptions
            )
        ]

    def _event_time(self, now: float) -> float:
        """About the largest event time sent to every partition by now."""
        return self._w.t0 + self._w.time_scale * min(now, self._w.duration)

    def _due_late(self, now: float) -> list[Message]:
        out: list[Message] = []
        # with lateness, a window whose correction time has passed (with a margin)
        done_before = self._event_time(now) - GRACE_S - self._lateness - LATENESS_SAFETY_S
        while len(self.released) < self._late and self._late_due[len(self.released)] <= now:
            j = len(self.released)
            usable = self._usable(now)
            if self._lateness:
                usable = [(p, ws) for p, ws in usable if ws + INTERVAL <= done_before]
            if not usable:
                break
            want = self._allowed[j % len(self._allowed)]
            pick = sorted(x for x in usable if x[0] == want) or sorted(usable)
            p, ws = self._rng.choice(pick)
            name = self._rng.choice(self._written[(p, ws)][1])
            ev = {
                "name": name,
                "value": 1e6 + j,  # far from every valid value: aggregated would show
                "timestamp": round(ws + self._rng.randint(0, 9_999) / 1000, 3),
                "agg_func": self._w.funcs[name],
            }
            self.released.append(LateEvent(ev, p, ws, now))
            key = None if self._w.unkeyed else name.encode()
            out.append(Message(now, p, key, orjson.dumps(ev)))
        return out

    def _due_corrections(self, now: float) -> list[Message]:
        """Late events for windows still correctable (``LATENESS_SAFETY_S`` before their
        correction time ends), each for a window of its own partition."""
        out: list[Message] = []
        open_after = self._event_time(now) - GRACE_S - self._lateness + LATENESS_SAFETY_S
        while (
            len(self.corrected) < self._corrections
            and self._correction_due[len(self.corrected)] <= now
        ):
            j = len(self.corrected)
            usable = [(p, ws) for p, ws in self._usable(now) if ws + INTERVAL >= open_after]
            if not usable:
                break
            p, ws = self._rng.choice(sorted(usable))
            name = self._rng.choice(self._written[(p, ws)][1])
            ev = {
                "name": name,
                "value": 2e6 + j,  # far from every other value
                "timestamp": round(ws + self._rng.randint(0, 9_999) / 1000, 3),
                "agg_func": self._w.funcs[name],
            }
            self.corrected.append(LateEvent(ev, p, ws, now))
            key = None if self._w.unkeyed else name.encode()
            out.append(Message(now, p, key, orjson.dumps(ev)))
        return out

    async def _poll_written(self) -> None:
        """Which (partition, window) has an aggregate in the observed output, and since
        when. Errors (PostgreSQL stopped by the test) only skip a round."""
        names: dict[tuple[int, float], set[str]] = {}
        while True:
            try:
                rows = await asyncio.wait_for(self._observe(), 5)
            except (
                OSError,
                TimeoutError,
                asyncpg.PostgresError,
                asyncpg.InterfaceError,
                KafkaError,
            ):
                rows = {}
            now = self.elapsed()
            for name, _, ws in rows:
                where = (self._w.partition_of.get(name, -1), ws)
                if name not in names.setdefault(where, set()):
                    names[where].add(name)
                    seen = self._written.get(where, (now, []))[0]
                    self._written[where] = (seen, sorted(names[where]))
            await asyncio.sleep(POLL_S)


async def _send(producer: Any, topic: str, chunk: list[Message]) -> None:
    """One record batch per partition (in order), all acknowledged before returning, so
    each partition's messages keep their order across chunks."""
    batches: dict[int, list[Any]] = {}
    for m in chunk:
        per = batches.setdefault(m.partition, [producer.create_batch()])
        if per[-1].append(key=m.key, value=m.value, timestamp=None) is None:
            per.append(producer.create_batch())  # full: a message is far below its size
            per[-1].append(key=m.key, value=m.value, timestamp=None)
    acks = [
        await producer.send_batch(b, topic, partition=p) for p, per in batches.items() for b in per
    ]
    await asyncio.gather(*acks)


# -- reading the outputs ----------------------------------------------------------------
async def _read_topic(
    bootstrap: str, topic: str, ready: Callable[[list[Any]], bool], timeout: float = 60.0
) -> list[Any]:
    """Every record of ``topic``: until ``ready`` and nothing new for 1 s, or nothing
    new for 5 s (a wrong result must not cost the whole timeout)."""
    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=bootstrap,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        group_id=None,
    )
    await consumer.start()
    out: list[Any] = []
    try:
        last_new = time.monotonic()
        deadline = last_new + timeout
        while time.monotonic() < deadline:
            batches = await consumer.getmany(timeout_ms=300, max_records=50_000)
            got = [m for msgs in batches.values() for m in msgs]
            if got:
                out.extend(got)
                last_new = time.monotonic()
            quiet = time.monotonic() - last_new
            if quiet >= 5.0 or (quiet >= 1.0 and ready(out)):
                break
    finally:
        await consumer.stop()
    return out


def _epoch(iso: str) -> float:
    from datetime import datetime

    return datetime.fromisoformat(iso).timestamp()


@dataclass
class KafkaAggregates:
    latest: dict[Key, tuple[float, int]]  # per key: the highest revision, the last of it
    messages: int
    conflicting: int  # (key, revision)s that were emitted with two different values
    repeated: Counter[Key] = field(default_factory=Counter)  # key -> (key, revision) repeats
    # per key, the revision of each of its messages in offset order (corrections: 1, 2..)
    revisions: dict[Key, list[int]] = field(default_factory=dict)

    def repeats_by_partition(self, workload: LiveWorkload) -> dict[int, int]:
        """Messages beyond the first per key, by the input partition of the key's name."""
        out: Counter[int] = Counter()
        for (name, _, _), n in self.repeated.items():
            out[workload.partition_of.get(name, -1)] += n
        return dict(sorted(out.items()))

    def repeated_windows(self, workload: LiveWorkload) -> dict[int, list[float]]:
        """Window starts with a repeated key, by input partition, as wall seconds into
        the stream (when the window's events were sent)."""
        out: dict[int, set[float]] = {}
        for name, _, ws in self.repeated:
            at = round((ws - workload.t0) / workload.time_scale, 1)
            out.setdefault(workload.partition_of.get(name, -1), set()).add(at)
        return {p: sorted(v) for p, v in sorted(out.items())}


def _keyed(m: Any) -> tuple[Key, int, tuple[float, int]]:
    """(key, revision, (value, count)) of an aggregate message."""
    v = orjson.loads(m.value)
    key = (v["name"], v["agg_func"], _epoch(v["window_start"]))
    return key, v.get("revision", 1), (v["value"], v["count"])


async def read_aggregates(
    bootstrap: str, topic: str, expected: Results | Callable[[], Results]
) -> KafkaAggregates:
    """The topic read to its end. Each ``(key, revision)`` is one aggregate: a second
    message of it is a repeat; the result per key is its highest revision."""

    def ready(records: list[Any]) -> bool:
        """Every expected key there, with its count in its highest revision."""
        want = expected() if callable(expected) else expected
        got: dict[Key, tuple[int, int]] = {}
        for m in records:
            key, revision, (_, count) = _keyed(m)
            got[key] = max(got.get(key, (0, 0)), (revision, count))
        return want.keys() <= got.keys() and all(got[k][1] == want[k][1] for k in want)

    records = await _read_topic(bootstrap, topic, ready)
    latest: dict[Key, tuple[float, int]] = {}
    top: dict[Key, int] = {}
    seen: dict[tuple[Key, int], tuple[float, int]] = {}
    conflicting: set[tuple[Key, int]] = set()
    repeated: Counter[Key] = Counter()
    revisions: dict[Key, list[int]] = {}
    for m in records:
        key, revision, value = _keyed(m)
        revisions.setdefault(key, []).append(revision)
        if (key, revision) in seen:
            repeated[key] += 1
            if seen[(key, revision)] != value:
                conflicting.add((key, revision))
        seen[(key, revision)] = value
        if revision >= top.get(key, 0):
            top[key], latest[key] = revision, value
    return KafkaAggregates(latest, len(records), len(conflicting), repeated, revisions)


class AggregatesTail:
    """The aggregates topic followed as it grows: the last value per key, in offset order
    (what a consumer that keeps the newest record per key holds). Reads from the start."""

    def __init__(self, bootstrap: str, topic: str) -> None:
        self._consumer = AIOKafkaConsumer(
            topic,
            bootstrap_servers=bootstrap,
            auto_offset_reset="earliest",
            enable_auto_commit=False,
            group_id=None,
            metadata_max_age_ms=1000,
        )
        self._lock = asyncio.Lock()
        self._started = False
        self.latest: dict[Key, tuple[float, int]] = {}
        self._top: dict[Key, int] = {}
        self.messages = 0

    async def start(self) -> None:
        await self._consumer.start()
        self._started = True

    async def stop(self) -> None:
        if self._started:
            self._started = False
            await self._consumer.stop()

    async def poll(self) -> dict[Key, tuple[float, int]]:
        """What has arrived so far (a copy), after reading what is new."""
        async with self._lock:
            for _ in range(20):
                batches = await self._consumer.getmany(timeout_ms=100, max_records=50_000)
                got = [m for msgs in batches.values() for m in msgs]
                for m in got:
                    key, revision, value = _keyed(m)
                    if revision >= self._top.get(key, 0):  # the highest revision wins
                        self._top[key], self.latest[key] = revision, value
                self.messages += len(got)
                if not got:
                    break
            return dict(self.latest)


async def read_dead_letters(bootstrap: str, topic: str, at_least: int) -> list[dict[str, Any]]:
    records = await _read_topic(bootstrap, topic, lambda rs: len(rs) >= at_least)
    return [orjson.loads(m.value) for m in records]


async def pg_dead_letters(dsn: str, source_topic: str) -> list[dict[str, Any]]:
    """Rows of the (shared) ``dead_letters`` table that came from this test's topic."""
    conn = await asyncpg.connect(dsn)
    try:
        if await conn.fetchval("SELECT to_regclass('dead_letters')") is None:
            return []
        rows = await conn.fetch(
            "SELECT raw, reason, source FROM dead_letters WHERE starts_with(source, $1)",
            f"kafka {source_topic}/",
        )
    finally:
        await conn.close()
    return [dict(r) for r in rows]


async def service_counters(port: int) -> tuple[int, Counter[str], int] | None:
    """(events_late_total, events_rejected_total by reason, events_late_applied_total)
    from ``/metrics``."""
    try:
        async with (
            aiohttp.ClientSession() as http,
            http.get(
                f"http://127.0.0.1:{port}/metrics", timeout=aiohttp.ClientTimeout(total=5)
            ) as r,
        ):
            text = await r.text()
    except (aiohttp.ClientError, TimeoutError):
        return None
    late, rejected, applied = 0, Counter[str](), 0
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == "vabus_aggregator_events_late_total":
                late = int(s.value)
            elif s.name == "vabus_aggregator_events_late_applied_total":
                applied = int(s.value)
            elif s.name == "vabus_aggregator_events_rejected_total" and s.value:
                rejected[s.labels["reason"]] = int(s.value)
    return late, rejected, applied


async def pg_revisions(dsn: str, table: str) -> dict[Key, int]:
    """The ``revision`` of every row of an aggregates table."""
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch(
            f"SELECT name, agg_func, extract(epoch FROM window_start)::float8 AS ws, revision "
            f"FROM {table}"
        )
    finally:
        await conn.close()
    return {(r["name"], r["agg_func"], r["ws"]): r["revision"] for r in rows}


def revision_problems(
    kafka: KafkaAggregates, corrected: list[LateEvent], pg: dict[Key, int] | None
) -> list[str]:
    """Corrections: Kafka holds revisions 1..k of each key once each (k > 1 for every
    corrected key), PostgreSQL the highest of them."""
    problems = []
    gaps = {k: r for k, r in kafka.revisions.items() if sorted(r) != list(range(1, len(r) + 1))}
    if gaps:
        problems.append(f"Kafka: {len(gaps)} keys whose revisions are not 1..k once each, e.g. "
                        f"{sorted(gaps.items())[:3]}")  # fmt: skip
    keys = {(c.event["name"], c.event["agg_func"], c.window_start) for c in corrected}
    uncorrected = sorted(k for k in keys if max(kafka.revisions.get(k, [0])) < 2)
    if uncorrected:
        problems.append(f"Kafka: {len(uncorrected)} of {len(keys)} corrected keys have no "
                        f"revision 2, e.g. {uncorrected[:3]}")  # fmt: skip
    if pg is not None:
        top = {k: max(r) for k, r in kafka.revisions.items()}
        behind = {k: (pg.get(k), r) for k, r in top.items() if pg.get(k) != r}
        if behind:
            problems.append(f"PostgreSQL: {len(behind)} rows not at Kafka's highest revision "
                            f"(PostgreSQL, Kafka), e.g. {sorted(behind.items())[:3]}")  # fmt: skip
    return problems


# -- checks -------------------------------------------------------------------------------
def compare(actual: Results, expected: Results, where: str) -> list[str]:
    """What differs, summarised (events missing in total, not just the first keys)."""
    missing = sorted(expected.keys() - actual.keys())
    extra = sorted(actual.keys() - expected.keys())
    common = expected.keys() & actual.keys()
    short = sorted(k for k in common if actual[k][1] < expected[k][1])
    more = sorted(k for k in common if actual[k][1] > expected[k][1])
    wrong = sorted(
        k
        for k in common
        if actual[k][1] == expected[k][1]
        and not math.isclose(actual[k][0], expected[k][0], rel_tol=1e-9, abs_tol=1e-9)
    )
    if not (missing or extra or short or more or wrong):
        return []
    lost = sum(expected[k][1] for k in missing) + sum(expected[k][1] - actual[k][1] for k in short)
    return [
        f"{where}: {len(actual)} rows for {len(expected)} expected; {len(missing)} missing, "
        f"{len(extra)} extra, {len(short)} with too few events, {len(more)} with too many, "
        f"{len(wrong)} with a wrong value; {lost} valid events missing in total; e.g. "
        f"missing {missing[:2]}, short {[(k, actual[k], expected[k]) for k in short[:2]]}, "
        f"wrong {[(k, actual[k], expected[k]) for k in wrong[:2]]}"
    ]


def check_dead_letters(
    where: str,
    letters: list[dict[str, Any]],
    workload: LiveWorkload,
    valid: set[EventId],
    released: list[LateEvent],
) -> list[str]:
    """Exact reasons (a replayed dead letter, same source and raw, counts once), no valid
    event among them, and every released late event there as ``late``."""
    unique = {(d["source"], d["raw"]): d["reason"] for d in letters}
    problems = []
    if len(unique) != len(letters):
        again = Counter(d["source"].split(" offset=")[0] for d in letters)
        again.subtract(Counter(source.split(" offset=")[0] for source, _ in unique))
        print(
            f"[live] {where}: {len(letters) - len(unique)} replayed dead letters, by "
            f"source {dict(sorted((+again).items()))}"
        )
    reasons = Counter(unique.values())
    want = workload.rejects + Counter({"late": len(released)})
    if reasons != want:
        problems.append(
            f"{where}: dead letters by reason {dict(sorted(reasons.items()))}, "
            f"expected {dict(sorted(want.items()))}"
        )
    late_ids = {_event_id(x.event) for x in released}
    valid_dead: Counter[tuple[str, str]] = Counter()
    late_seen: set[EventId] = set()
    for (source, raw), reason in unique.items():
        try:
            obj = orjson.loads(raw)
            eid = _event_id(obj)
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError):
            continue
        if eid in valid:
            valid_dead[(reason, source.split(" offset=")[0])] += 1
        elif eid in late_ids and reason == "late":
            late_seen.add(eid)
    if valid_dead:
        problems.append(
            f"{where}: {sum(valid_dead.values())} VALID events dead-lettered, by "
            f"(reason, partition): {dict(sorted(valid_dead.items()))}"
        )
    if len(late_seen) != len(late_ids):
        problems.append(
            f"{where}: {len(late_ids) - len(late_seen)} of {len(late_ids)} "
            "released late events are not dead letters with reason late"
        )
    return problems


# -- the run ------------------------------------------------------------------------------
class LiveRun:
    """The service (one or more processes of one consumer group) and a live feed.

    ``storage`` is the service's ``STORAGE_TYPE``: ``kafka,postgres`` (the default; needs
    ``postgres_dsn``) or ``kafka`` (no PostgreSQL: checkpoints live in the group's Kafka
    topic). Progress and the final result are observed in PostgreSQL when it is an
    output, else in the Kafka aggregates topic (the last value per key); every configured
    output is checked at the end.

    An ``unkeyed`` workload runs with ``repartition=true``.

    ``async with`` creates the input topic, starts the processes and waits until the
    group has every partition assigned, so the feed starts against a running service;
    leaving terminates the processes still alive (by PID, through their handles)."""

    def __init__(
        self,
        workload: LiveWorkload,
        *,
        kafka_bootstrap: str,
        postgres_dsn: str | None = None,
        unique_name: str,
        workdir: Path,
        storage: str = "kafka,postgres",
        instances: int = 1,
        late: int = 60,
        late_partitions: Iterable[int] | None = None,
        env: Mapping[str, str] = {},
        seed: int = 0,
        corrections: int = 0,
    ) -> None:
        self.outputs = frozenset(storage.split(","))
        if not self.outputs <= {"kafka", "postgres"} or "kafka" not in self.outputs:
            raise ValueError(
                f"storage {storage!r}: the live harness runs 'kafka' or 'kafka,postgres'"
            )
        if "postgres" in self.outputs and not postgres_dsn:
            raise ValueError(f"storage {storage!r} needs postgres_dsn")
        self.workload = workload
        self.bootstrap = kafka_bootstrap
        self.dsn = postgres_dsn or ""  # "" when PostgreSQL is not an output
        self.source, self.topic = f"in-{unique_name}", f"agg-{unique_name}"
        group = f"g-{unique_name}"
        # unkeyed input is routed by name through the group's internal topic first: the
        # windowing stage reads that, and names it in dead letters
        routed = "&repartition=true" if workload.unkeyed else ""
        self.windowed = internal_topic(group) if workload.unkeyed else self.source
        self.namespace = f"kafka:{self.source}:g-{unique_name}"  # of the checkpoints
        self.table = f"agg_{unique_name}"
        with_pg = "postgres" in self.outputs
        self.env = service_env(
            bus_url=f"kafka://{kafka_bootstrap}/{self.source}?group={group}"
            f"&metrics_topic=m-{unique_name}{routed}",
            storage=storage,
            kafka_bootstrap=kafka_bootstrap,
            topic=self.topic,
            state_dir=workdir / "state",
            postgres_dsn=postgres_dsn if with_pg else None,
            table=self.table if with_pg else None,
            extra={"AGGREGATION_GRACE": f"{GRACE_S:g}", **env},
        )
        if "AGGREGATION_IDLE_TIMEOUT" not in env:
            del self.env["AGGREGATION_IDLE_TIMEOUT"]  # the default: interval + grace
        self._workdir, self._count = workdir, instances
        self.instances: list[Incarnation] = []
        self.killed: set[int] = set()
        self.kill_times: list[float] = []  # feed.elapsed() of each kill -9
        self.exit_codes: dict[int, int] = {}
        self.problems: list[str] = []  # found by actions during the stream
        self._tail: AggregatesTail | None = None
        if with_pg:
            where = f"PostgreSQL table {self.table}"
        else:
            self._tail = AggregatesTail(kafka_bootstrap, self.topic)
            where = f"Kafka topic {self.topic}"
        self.feed = LiveFeed(
            kafka_bootstrap,
            self.source,
            workload,
            observe=self.observe,
            where=where,
            late=late,
            seed=seed,
            late_partitions=late_partitions,
            corrections=corrections,
            lateness=float(env.get("AGGREGATION_ALLOWED_LATENESS", 0)),
        )

    def expected(self) -> dict[Key, tuple[float, int]]:
        """The workload's valid events and the corrections released so far."""
        return expected_aggregates(self.workload.valid + [c.event for c in self.feed.corrected])

    async def observe(self) -> dict[Key, tuple[float, int]]:
        """The aggregates written so far in the observed output: PostgreSQL's rows when
        it is an output, else the last value per key in the Kafka topic."""
        if self._tail is None:
            return await stored_rows(self.dsn, self.table)
        return await self._tail.poll()

    async def __aenter__(self) -> LiveRun:
        await create_topic(self.bootstrap, self.source, self.workload.partitions)
        try:
            for _ in range(self._count):
                self.start_instance()
            await wait_for(self._all_assigned, 60, "every partition assigned")
            if self._tail is not None:  # the service has created the topic by now
                await self._tail.start()
        except BaseException:
            await self.__aexit__(None, None, None)
            raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            for i, inc in enumerate(self.instances):
                if i not in self.killed:
                    self.exit_codes[i] = inc.terminate()
        finally:
            if self._tail is not None:
                await self._tail.stop()

    def start_instance(self) -> int:
        """Start one more process of the group (say, a join mid-stream); its index."""
        index = len(self.instances)
        self.instances.append(Incarnation(self.env, self._workdir, index))
        return index

    def alive(self) -> list[Incarnation]:
        return [inc for i, inc in enumerate(self.instances) if i not in self.killed]

    def check_alive(self) -> None:
        for inc in self.alive():
            if inc.proc.proc.poll() is not None:
                raise AssertionError(
                    f"service exited ({inc.proc.proc.returncode}):\n{inc.proc.log_text()[-3000:]}"
                )

    async def assigned(self) -> list[int]:
        """Partitions held by each live process (-1 while one does not answer)."""
        self.check_alive()
        counts = []
        for inc in self.alive():
            st = await inc.status()
            counts.append(-1 if st is None else len(st.get("partitions") or {}))
        return counts

    async def _all_assigned(self) -> bool:
        counts = await self.assigned()
        return min(counts) > 0 and sum(counts) == self.workload.partitions

    def kill9(self, index: int) -> None:
        self.feed.disrupt()
        self.kill_times.append(self.feed.elapsed())
        self.instances[index].kill9()
        self.killed.add(index)

    async def stream(self, during: Action | None = None) -> None:
        """Feed the whole workload (and the late events), with ``during`` running alongside;
        the first failure of either is raised as it is."""
        tasks = [asyncio.create_task(self.feed.run())]
        if during is not None:
            tasks.append(asyncio.create_task(during(self)))
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
            for task in done:
                task.result()
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def settle(self, timeout: float = 90.0) -> dict[Key, tuple[float, int]]:
        """The observed output once it equals the expected result, or once nothing is open
        and it has not changed for ``QUIET_S`` (a wrong result is reported, not waited
        out)."""
        expected = self.expected()
        deadline = time.monotonic() + timeout
        last: dict[Key, tuple[float, int]] | None = None
        stable_since = time.monotonic()  # no open window and the same rows since then
        while True:
            self.check_alive()
            rows = await self.observe()
            if not compare(rows, expected, ""):
                return rows
            states = [await inc.status() for inc in self.alive()]
            open_windows = sum((s or {}).get("open_windows", 1) for s in states)
            if rows != last or open_windows:
                # a flush just emitted is still on its way to the table
                last, stable_since = rows, time.monotonic()
            elif time.monotonic() - stable_since >= QUIET_S:
                return rows
            if time.monotonic() > deadline:
                self.problems.append(
                    f"still {open_windows} open windows {timeout:.0f} s after the stream ended"
                )
                return rows
            await asyncio.sleep(0.2)

    async def check(self, *, counters: bool = True) -> list[str]:
        """Wait for the final result, then compare every output with the expectation;
        ``counters`` compares /metrics too (only meaningful if no process died)."""
        rows = await self.settle()
        settled_after = self.feed.elapsed() - (self.feed.done_at or 0.0)
        w, released, corrected = self.workload, self.feed.released, self.feed.corrected
        expected = self.expected()
        valid = w.valid_ids() | {_event_id(c.event) for c in corrected}
        problems = list(self.problems)
        with_pg = "postgres" in self.outputs
        if with_pg:  # else ``rows`` is the Kafka tail, checked below by an independent read
            problems += compare(rows, expected, "PostgreSQL")
        kafka = await read_aggregates(self.bootstrap, self.topic, expected)
        problems += compare(kafka.latest, expected, "Kafka (last value per key)")
        total = sum(w.rejects.values()) + len(released)
        dlq = await read_dead_letters(self.bootstrap, f"{self.topic}.dlq", total)
        problems += check_dead_letters("Kafka DLQ", dlq, w, valid, released)
        # exactly once in Kafka too, also after kill -9 (read-back after a restore)
        if kafka.repeated:
            problems.append(
                f"Kafka: {sum(kafka.repeated.values())} repeated aggregate messages, by input "
                f"partition {kafka.repeats_by_partition(w)}"
            )
        dlq_repeats = len(dlq) - len({(d["source"], d["raw"]) for d in dlq})
        if dlq_repeats:
            problems.append(f"Kafka DLQ: {dlq_repeats} dead letters written twice")
        pg_dead: list[dict[str, Any]] = []
        if with_pg:
            pg_dead = await pg_dead_letters(self.dsn, self.windowed)
            problems += check_dead_letters("PostgreSQL dead_letters", pg_dead, w, valid, released)
            # the ledger: exact across kills and hand-offs, every event accounted for
            ledger = await ledger_totals(self.dsn, self.namespace)
            rejects = w.rejects + Counter({"late": len(released)})
            aggregated = len(w.valid) + len(corrected)
            received = aggregated + sum(rejects.values())
            problems += ledger_problems(ledger, received, aggregated, rejects, len(corrected))
            late_by_window = await window_late_total(self.dsn, self.namespace)
            if late_by_window != len(released):
                problems.append(
                    f"vabus_window_late holds {late_by_window} late events, "
                    f"expected {len(released)}"
                )
            applied = await window_late_total(self.dsn, self.namespace, "late_applied")
            if applied != len(corrected):
                problems.append(
                    f"vabus_window_late holds {applied} applied late events, "
                    f"expected {len(corrected)}"
                )
        if corrected:
            pg_revs = await pg_revisions(self.dsn, self.table) if with_pg else None
            problems += revision_problems(kafka, corrected, pg_revs)
        late_metric: int | None = None
        if counters:
            late_metric, rejected, applied_metric = 0, Counter[str](), 0
            for inc in self.alive():
                got = await service_counters(inc.port)
                assert got is not None, f"/metrics of port {inc.port} did not answer"
                late_metric += got[0]
                rejected += got[1]
                applied_metric += got[2]
            if applied_metric != len(corrected):
                problems.append(
                    f"/metrics events_late_applied_total {applied_metric}, "
                    f"expected {len(corrected)}"
                )
            if late_metric != len(released):
                problems.append(
                    f"/metrics events_late_total {late_metric}, expected {len(released)}"
                )
            if rejected != w.rejects:
                problems.append(
                    f"/metrics events_rejected_total {dict(rejected)}, expected {dict(w.rejects)}"
                )
        print(
            f"\n[live] {len(w.valid)} valid events + {sum(w.rejects.values())} garbage over "
            f"{w.partitions} partitions in {self.feed.main_done_at or 0:.1f} s, "
            f"{len(released)} late released, {len(corrected)} corrections; final result "
            f"{settled_after:.1f} s after the "
            f"last message; storage {','.join(sorted(self.outputs))}; "
            + (f"PostgreSQL {len(rows)}/{len(expected)} rows; " if with_pg else "")
            + f"Kafka {kafka.messages} messages for {len(kafka.latest)} keys "
            f"({sum(kafka.repeated.values())} repeats, by input partition "
            f"{kafka.repeats_by_partition(w)}, windows sent at (s) "
            f"{kafka.repeated_windows(w)}), {kafka.conflicting} keys "
            f"re-emitted with another value, "
            f"{sum(1 for r in kafka.revisions.values() if max(r) > 1)} keys with revisions; "
            f"dead letters {len(dlq)} (Kafka)"
            + (f" {len(pg_dead)} (PostgreSQL)" if with_pg else "")
            + f"; events_late_total {late_metric}; {len(problems)} problems"
        )
        return problems
