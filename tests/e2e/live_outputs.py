"""Both outputs of a live run read back whole, and compared with an expectation.

A row is keyed by all that identifies an aggregate (contract §12: name, tags, agg_func,
window_start, window_end), so each test projects what it checks from one reading: the
windows of one resolution, the series, the revisions.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, TypeVar

import asyncpg
import orjson

from tests.e2e.live import LiveRun, _read_topic
from tests.e2e.workload import Key
from tests.fault.harness import ledger_problems, ledger_totals

__all__ = [
    "KafkaRows",
    "Row",
    "RowKey",
    "Rows",
    "approx",
    "differences",
    "every_event_aggregated",
    "kafka_rows",
    "pg_rows",
    "series",
    "settled",
    "tags_json",
    "windows",
]

RowKey = tuple[str, str, str, float, float]  # (name, tags as sorted JSON, agg_func, start, end)
Row = tuple[float, int, int]  # (value, count, revision)
Rows = dict[RowKey, Row]
K = TypeVar("K", bound=tuple[Any, ...])
Aggregates = Mapping[K, tuple[float, int]]  # (value, count) per whatever key a test checks


def tags_json(tags: Mapping[str, Any]) -> str:
    return orjson.dumps(tags, option=orjson.OPT_SORT_KEYS).decode()


def _epoch(iso: str) -> float:
    return datetime.fromisoformat(iso).timestamp()


async def pg_rows(dsn: str, table: str) -> Rows:
    """Every row of an aggregates table ({} before the service has created it)."""
    conn = await asyncpg.connect(dsn)
    try:
        if await conn.fetchval("SELECT to_regclass($1)", table) is None:
            return {}
        rows = await conn.fetch(
            "SELECT name, tags::text AS tags, agg_func, "
            "extract(epoch FROM window_start)::float8 AS ws, "
            "extract(epoch FROM window_end)::float8 AS we, value, count, revision "
            f'FROM "{table}"'
        )
    finally:
        await conn.close()
    return {
        (r["name"], tags_json(orjson.loads(r["tags"])), r["agg_func"], r["ws"], r["we"]): (
            r["value"],
            r["count"],
            r["revision"],
        )
        for r in rows
    }


@dataclass
class KafkaRows:
    rows: Rows  # per key: its highest revision (the last message of it)
    messages: int
    written: Counter[tuple[RowKey, int]] = field(default_factory=Counter)  # (key, revision)
    miskeyed: int = 0  # messages whose Kafka key is not the aggregate's name

    def twice(self) -> list[tuple[RowKey, int]]:
        """(key, revision)s written more than once: exactly once is broken."""
        return sorted(k for k, n in self.written.items() if n > 1)


async def kafka_rows(
    bootstrap: str,
    topic: str,
    ready: Callable[[list[Any]], bool] = lambda records: False,
    timeout: float = 30.0,
) -> KafkaRows:
    """The aggregates topic read to its end (see ``_read_topic`` for when that is)."""
    records = await _read_topic(bootstrap, topic, ready, timeout=timeout)
    out = KafkaRows({}, len(records))
    for m in records:
        v = orjson.loads(m.value)
        key = (
            v["name"],
            tags_json(v.get("tags") or {}),
            v["agg_func"],
            _epoch(v["window_start"]),
            _epoch(v["window_end"]),
        )
        revision = v.get("revision", 1)
        out.written[(key, revision)] += 1
        out.miskeyed += m.key != v["name"].encode()
        if revision >= out.rows.get(key, (0.0, 0, 0))[2]:
            out.rows[key] = (v["value"], v["count"], revision)
    return out


def windows(rows: Rows) -> dict[Key, tuple[float, int]]:
    """(name, agg_func, window_start) -> (value, count): for runs of one resolution and
    no tags."""
    return {(n, f, s): (v, c) for (n, _, f, s, _), (v, c, _) in rows.items()}


def series(rows: Rows) -> dict[tuple[str, str, str, float], tuple[float, int]]:
    """(name, tags, agg_func, window_start) -> (value, count): one resolution."""
    return {(n, t, f, s): (v, c) for (n, t, f, s, _), (v, c, _) in rows.items()}


def approx(key: Any, got: float, want: float) -> bool:
    return math.isclose(got, want, rel_tol=1e-9, abs_tol=1e-9)


def differences(
    actual: Aggregates[K],
    expected: Aggregates[K],
    where: str,
    noun: str = "rows",
    close: Callable[[K, float, float], bool] = approx,
) -> list[str]:
    """Keys missing and extra, counts and values (``close``) wrong, summarised."""
    missing = sorted(expected.keys() - actual.keys())
    extra = sorted(actual.keys() - expected.keys())
    wrong = sorted(
        k
        for k in expected.keys() & actual.keys()
        if actual[k][1] != expected[k][1] or not close(k, actual[k][0], expected[k][0])
    )
    if not (missing or extra or wrong):
        return []
    return [
        f"{where}: {len(actual)} {noun} for {len(expected)}; {len(missing)} missing, "
        f"{len(extra)} extra, {len(wrong)} wrong; e.g. missing {missing[:2]}, extra "
        f"{extra[:2]}, wrong {[(k, actual[k], expected[k]) for k in wrong[:2]]}"
    ]


async def settled(
    run: LiveRun,
    expected: Aggregates[K],
    read: Callable[[], Awaitable[Aggregates[K]]],
    timeout: float = 90.0,
    close: Callable[[K, float, float], bool] = approx,
) -> Aggregates[K]:
    """What ``read`` returns once it equals ``expected`` (or at the timeout)."""
    deadline = time.monotonic() + timeout
    rows: Aggregates[K] = {}
    while time.monotonic() < deadline:
        run.check_alive()
        rows = await read()
        if not differences(rows, expected, "", close=close):
            break
        await asyncio.sleep(0.5)
    return rows


async def every_event_aggregated(run: LiveRun, events: int) -> list[str]:
    """The ledger of a run with neither rejects nor late events: ``events`` received,
    all aggregated."""
    ledger = await ledger_totals(run.dsn, run.namespace)
    return ledger_problems(ledger, events, events, Counter())
