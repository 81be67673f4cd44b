"""Completion detection: when has a tool's output become complete?

Complete means every expected (name, window) key is present with its expected count.
That moment is observed from outside the tool: on a Kafka output by consuming the
(fresh, per-run) topic, on PostgreSQL by polling the (fresh, per-run) table. A watch
gives up at the deadline, when output stops growing for ``stall_s``, or a few seconds
after the tool exited.

The service's first-event time comes from its own ``/metrics`` (the moment
``vabus_aggregator_events_received_total`` is first seen above zero, polled every
10 ms), its latency figures from ``/status``.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import asyncpg
import orjson

from bench.check import key_of, to_epoch
from bench.proc import Child
from bench.workload import Key

_EXITED_GRACE_S = 5.0
_PG_POLL_S = 0.05
_METRICS_POLL_S = 0.01
# with WORKERS > 1 the samples carry a worker label: any worker's first event counts
_RECEIVED = re.compile(
    rb"^vabus_aggregator_events_received_total(?:\{[^}]*\})? (\S+)$", re.MULTILINE
)


@dataclass
class Watched:
    done_at: float | None = None
    records: list[dict[str, Any]] = field(default_factory=list)
    visible_lag_s: list[float] = field(default_factory=list)  # seen/durable minus emitted_at
    gave_up: str = ""


class _Progress:
    def __init__(self, child: Child, deadline: float, stall_s: float) -> None:
        self._child, self._deadline, self._stall_s = child, deadline, stall_s
        self._last_growth = time.time()
        self._exited_at: float | None = None

    def grew(self, now: float) -> None:
        self._last_growth = now

    def reason_to_stop(self, now: float) -> str:
        if now > self._deadline:
            return "timeout"
        if now - self._last_growth > self._stall_s:
            return f"no new output for {self._stall_s:g} s"
        if self._child.poll() is not None:
            self._exited_at = self._exited_at or now
            if now - self._exited_at > _EXITED_GRACE_S:
                return f"tool exited (code {self._child.usage and self._child.usage.exit_code})"
        return ""


async def watch_kafka(
    bootstrap: str,
    topic: str,
    expected: Mapping[Key, Mapping[str, Any]],
    child: Child,
    deadline: float,
    stall_s: float,
) -> Watched:
    """Consume ``topic`` from the beginning until complete; keeps every record."""
    from aiokafka import AIOKafkaConsumer, TopicPartition

    need = {k: v["count"] for k, v in expected.items()}
    out = Watched()
    progress = _Progress(child, deadline, stall_s)
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap,
        enable_auto_commit=False,
        fetch_max_wait_ms=50,
        max_partition_fetch_bytes=8 << 20,
        fetch_max_bytes=64 << 20,
    )
    await consumer.start()
    try:
        parts = consumer.partitions_for_topic(topic)
        while not parts:
            await consumer._client.force_metadata_update()
            parts = consumer.partitions_for_topic(topic)
        tps = [TopicPartition(topic, p) for p in sorted(parts)]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        while need:
            batch = await consumer.getmany(timeout_ms=100)
            now = time.time()
            for msgs in batch.values():
                if msgs:
                    progress.grew(now)
                for m in msgs:
                    _take(m.value, now, need, out)
            if not need:
                out.done_at = now
                break
            out.gave_up = progress.reason_to_stop(now)
            if out.gave_up:
                break
    finally:
        await consumer.stop()
    return out


def _take(raw: bytes, now: float, need: dict[Key, int], out: Watched) -> None:
    try:
        record = orjson.loads(raw)
        key = key_of(record)
    except (orjson.JSONDecodeError, KeyError, ValueError, TypeError, AttributeError):
        out.records.append({"_undecodable": raw[:200].decode(errors="replace")})
        return
    out.records.append(record)
    if key is not None and need.get(key) == record.get("count"):
        del need[key]
    emitted = record.get("emitted_at")
    if emitted is not None:
        with contextlib.suppress(ValueError, TypeError):
            out.visible_lag_s.append(now - to_epoch(emitted))


async def watch_postgres(
    dsn: str,
    table: str,
    expected: Mapping[Key, Mapping[str, Any]],
    child: Child,
    deadline: float,
    stall_s: float,
) -> Watched:
    """Poll ``table`` until complete, then read it whole.

    ``visible_lag_s`` is ``updated_at - emitted_at`` per row: an estimate of emission to
    commit made by the database's own clock (``now()`` is the transaction start).
    """
    out = Watched()
    progress = _Progress(child, deadline, stall_s)
    quoted = '"' + table.replace('"', '""') + '"'
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(
            "CREATE TEMP TABLE bench_expected (name text, window_start timestamptz, count bigint)"
        )
        await conn.copy_records_to_table(
            "bench_expected",
            columns=["name", "window_start", "count"],
            records=[(n, _ts(ws), e["count"]) for (n, ws), e in expected.items()],
        )
        count_rows = f"SELECT count(*) FROM {quoted} WHERE left(name, 2) <> '__'"
        matching = (
            f"SELECT count(*) FROM bench_expected e JOIN {quoted} a ON "
            "a.name = e.name AND a.window_start = e.window_start AND a.count = e.count"
        )
        rows_before = -1
        while True:
            now = time.time()
            try:
                rows = await conn.fetchval(count_rows)
            except asyncpg.UndefinedTableError:
                rows = 0  # the service creates it at start-up
            if rows != rows_before:
                progress.grew(now)
                rows_before = rows
            if rows >= len(expected) and await conn.fetchval(matching) == len(expected):
                out.done_at = now
                break
            out.gave_up = progress.reason_to_stop(now)
            if out.gave_up:
                break
            await asyncio.sleep(_PG_POLL_S)
        await _read_table(conn, quoted, out)
    finally:
        await conn.close()
    return out


def _ts(epoch: float) -> Any:
    from datetime import UTC, datetime

    return datetime.fromtimestamp(epoch, tz=UTC)


async def _read_table(conn: asyncpg.Connection, quoted: str, out: Watched) -> None:
    columns = (
        "name, agg_func, value, count, extract(epoch FROM window_start)::float8 AS ws, "
        "extract(epoch FROM window_end)::float8 AS we"
    )
    try:
        rows = await conn.fetch(
            f"SELECT {columns}, extract(epoch FROM updated_at - emitted_at)::float8 AS lag "
            f"FROM {quoted}"
        )
    except asyncpg.UndefinedColumnError:  # a peer's table has no emitted_at: no lag
        rows = await conn.fetch(f"SELECT {columns}, NULL::float8 AS lag FROM {quoted}")
    except asyncpg.UndefinedTableError:
        return
    for r in rows:
        out.records.append(
            {
                "name": r["name"],
                "agg_func": r["agg_func"],
                "value": r["value"],
                "count": r["count"],
                "window_start": r["ws"],
                "window_end": r["we"],
            }
        )
        if r["lag"] is not None and not r["name"].startswith("__"):
            out.visible_lag_s.append(r["lag"])


async def first_event_from_metrics(port: int, child: Child, deadline: float) -> float | None:
    """Unix time at which the service's received-events counter was first seen above 0."""
    url = f"http://127.0.0.1:{port}/metrics"
    timeout = aiohttp.ClientTimeout(total=2)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        while time.time() < deadline and child.poll() is None:
            with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                async with session.get(url) as resp:
                    match = _RECEIVED.search(await resp.read())
                    if match and float(match.group(1)) > 0:
                        return time.time()
            await asyncio.sleep(_METRICS_POLL_S)
    return None


async def service_status(port: int) -> dict[str, Any] | None:
    """The service's ``/status`` JSON, or None when it does not answer."""
    timeout = aiohttp.ClientTimeout(total=5)
    with contextlib.suppress(aiohttp.ClientError, TimeoutError, ValueError):
        async with (
            aiohttp.ClientSession(timeout=timeout) as session,
            session.get(f"http://127.0.0.1:{port}/status") as resp,
        ):
            status: dict[str, Any] = await resp.json()
            return status
    return None
