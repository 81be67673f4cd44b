"""Series end to end (contract §12.3, issue 17's acceptance): the service fed live over
several partitions with ``AGGREGATION_GROUP_BY=host,region`` and both outputs. Per
series aggregates equal an independent computation in Kafka and PostgreSQL; 1,000 hosts
of one name against a budget of 100 give 100 series + 1 overflow series per window;
counts sum to the events sent; no dead letter."""

from __future__ import annotations

import asyncio
import math
import random
import time
from collections import Counter
from pathlib import Path
from typing import Any

import asyncpg
import orjson
import pytest

from tests.e2e.live import TIME_SCALE, LiveRun, LiveWorkload, Message
from tests.e2e.workload import INTERVAL
from tests.fault.harness import ledger_problems, ledger_totals, wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.integration]

GROUP_BY = ("host", "region")
BUDGET = 100
HOSTS = 1000
OVERFLOW_TAGS = '{"host":"__overflow__","region":"__overflow__"}'
WIDE = "tags.wide"  # 1,000 hosts: beyond the budget in every full window
NARROW = {"tags.cpu": "avg", "tags.mem": "max", "tags.req": "sum", "tags.n": "count"}
PER_MESSAGE = 40  # events per message of the wide name (a JSON array)

SeriesKey = tuple[str, str, str, float]  # (name, tags as sorted JSON, agg_func, window)
Results = dict[SeriesKey, tuple[float, int]]


def _tags_json(tags: dict[str, Any]) -> str:
    return orjson.dumps(tags, option=orjson.OPT_SORT_KEYS).decode()


def _narrow_tags(rng: random.Random) -> dict[str, Any] | None:
    """A few series per name, including no tags, one key only, a number, an extra key."""
    return rng.choice(
        [
            None,
            {"pod": "x"},  # none of the group-by keys: the name's series with {}
            {"region": "eu"},
            {"host": 7, "region": "us"},  # a number: the series of "7"
            {"host": "a", "region": "eu", "pod": [1, 2]},
            {"host": "b", "region": "eu"},
        ]
    )


def build_tagged_workload(seed: int, *, messages: int, rate: float, partitions: int) -> Any:
    """Half the messages are arrays of the wide name (hosts in turn, two functions), the
    others single events of the narrow names. Keyed by name."""
    rng = random.Random(seed)
    t0 = math.floor((time.time() - 3000) / INTERVAL) * INTERVAL
    names = [WIDE, *NARROW]
    w = LiveWorkload(
        partitions,
        t0,
        rate,
        funcs={WIDE: "sum", **NARROW},
        partition_of={n: i % partitions for i, n in enumerate(names)},
    )
    events: list[dict[str, Any]] = []  # every event, in the order its partition gets it
    host = 0
    for m in range(messages):
        at = m / rate
        ts = round(t0 + TIME_SCALE * at, 3)
        if m % 2 == 0:
            batch = []
            for j in range(PER_MESSAGE):
                wide_tags = {"host": f"h{host % HOSTS:04d}", "region": "eu", "pod": host}
                host += 1
                func = "sum" if j % 2 == 0 else "count"
                batch.append(
                    {
                        "name": WIDE,
                        "value": float(j),
                        "timestamp": ts,
                        "agg_func": func,
                        "tags": wide_tags,
                    }
                )
            name, value = WIDE, orjson.dumps(batch)
        else:
            name = rng.choice(list(NARROW))
            ev: dict[str, Any] = {
                "name": name,
                "value": round(rng.uniform(-100, 100), 3),
                "timestamp": ts,
                "agg_func": NARROW[name],
            }
            tags = _narrow_tags(rng)
            if tags is not None:
                ev["tags"] = tags
            batch, value = [ev], orjson.dumps(ev)
        events += batch
        w.messages.append(Message(at, w.partition_of[name], name.encode(), value, ts))
        w.valid += batch
    return w, events


def expected_series(events: list[dict[str, Any]], budget: int = BUDGET) -> tuple[Results, int]:
    """The aggregates of ``events`` per series, and the events of overflow series:
    computed here from the rule in the contract, sharing no code with the service. Every
    name is on one partition, so its events arrive in the order they were sent."""
    admitted: dict[tuple[str, float], set[str]] = {}
    acc: dict[SeriesKey, list[float]] = {}  # [count, sum, max]
    overflowed = 0
    for ev in events:
        ws = math.floor(ev["timestamp"] / INTERVAL) * INTERVAL
        raw = ev.get("tags") or {}
        tags = {
            k: raw[k] if type(raw[k]) is str else orjson.dumps(raw[k]).decode()
            for k in GROUP_BY
            if k in raw
        }
        series = _tags_json(tags)
        seen = admitted.setdefault((ev["name"], ws), set())
        if series not in seen:
            if len(seen) < budget:
                seen.add(series)
            else:
                series = OVERFLOW_TAGS
                overflowed += 1
        key = (ev["name"], series, ev["agg_func"], ws)
        a = acc.get(key)
        v = ev["value"]
        if a is None:
            acc[key] = [1, v, v]
        else:
            a[0] += 1
            a[1] += v
            a[2] = max(a[2], v)
    out: Results = {}
    for (name, tag_set, func, ws), (n, total, high) in acc.items():
        value = {"sum": total, "avg": total / n, "max": high, "count": n}[func]
        out[(name, tag_set, func, ws)] = (value, int(n))
    return out, overflowed


async def pg_series(dsn: str, table: str) -> Results:
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
        (r["name"], _tags_json(orjson.loads(r["tags"])), r["agg_func"], r["ws"]): (
            r["value"],
            r["count"],
        )
        for r in rows
    }


async def kafka_series(run: LiveRun) -> tuple[Results, int]:
    """The last value per series key in the aggregates topic, and the messages read."""
    from tests.e2e.live import _read_topic

    records = await _read_topic(run.bootstrap, run.topic, lambda rs: False, timeout=30.0)
    out: Results = {}
    for m in records:
        v = orjson.loads(m.value)
        assert m.key == v["name"].encode(), "the message key stays the name"
        ws = _epoch(v["window_start"])
        out[(v["name"], _tags_json(v["tags"]), v["agg_func"], ws)] = (v["value"], v["count"])
    return out, len(records)


def _epoch(iso: str) -> float:
    from datetime import datetime

    return datetime.fromisoformat(iso).timestamp()


def differences(actual: Results, expected: Results, where: str) -> list[str]:
    missing = sorted(expected.keys() - actual.keys())
    extra = sorted(actual.keys() - expected.keys())
    wrong = sorted(
        k
        for k in expected.keys() & actual.keys()
        if actual[k][1] != expected[k][1]
        or not math.isclose(actual[k][0], expected[k][0], rel_tol=1e-9, abs_tol=1e-9)
    )
    if not (missing or extra or wrong):
        return []
    return [
        f"{where}: {len(actual)} series rows for {len(expected)}; {len(missing)} missing, "
        f"{len(extra)} extra, {len(wrong)} wrong; e.g. missing {missing[:2]}, extra "
        f"{extra[:2]}, wrong {[(k, actual[k], expected[k]) for k in wrong[:2]]}"
    ]


ENV = {
    "AGGREGATION_GROUP_BY": ",".join(GROUP_BY),
    "AGGREGATION_MAX_SERIES_PER_NAME": str(BUDGET),
}


async def settled(run: LiveRun, expected: Results, timeout: float = 90.0) -> Results:
    """PostgreSQL's rows once they equal ``expected`` (or at the timeout)."""
    deadline = time.monotonic() + timeout
    rows: Results = {}
    while time.monotonic() < deadline:
        run.check_alive()
        rows = await pg_series(run.dsn, run.table)
        if not differences(rows, expected, ""):
            break
        await asyncio.sleep(0.5)
    return rows


async def output_problems(
    run: LiveRun, rows: Results, expected: Results, events: list[dict[str, Any]]
) -> tuple[list[str], int]:
    """What PostgreSQL, Kafka (each series aggregate once) and the ledger get wrong."""
    kafka, messages = await kafka_series(run)
    ledger = await ledger_totals(run.dsn, run.namespace)
    problems = differences(rows, expected, "PostgreSQL")
    problems += differences(kafka, expected, "Kafka (last value per series)")
    if messages != len(expected):
        problems.append(f"Kafka: {messages} messages for {len(expected)} series aggregates")
    problems += ledger_problems(ledger, len(events), len(events), Counter())
    return problems, messages


def acceptance_figures(rows: Results, events: list[dict[str, Any]]) -> tuple[int, int]:
    """The acceptance figures, read from what PostgreSQL holds: 100 + 1 series per
    window of the wide name (but for the stream's first and last), counts summing to the
    events sent per name and window. Returns (full windows, windows)."""
    by_window: dict[float, set[str]] = {}
    counts: Counter[tuple[str, float]] = Counter()
    for name, tags, func, ws in rows:
        if name == WIDE:
            by_window.setdefault(ws, set()).add(tags)
        if func == NARROW.get(name, "sum"):  # one function per name: each event once
            counts[(name, ws)] += rows[(name, tags, func, ws)][1]
    full = [ws for ws, series in by_window.items() if len(series) == BUDGET + 1]
    assert all(OVERFLOW_TAGS in by_window[ws] for ws in full)
    assert len(full) >= len(by_window) - 2
    assert all(len(s) <= BUDGET + 1 for s in by_window.values())
    sent: Counter[tuple[str, float]] = Counter(
        (e["name"], math.floor(e["timestamp"] / INTERVAL) * INTERVAL)
        for e in events
        if e["agg_func"] == NARROW.get(e["name"], "sum")
    )
    assert counts == sent
    return len(full), len(by_window)


@pytest.mark.timeout(240)
async def test_live_series_with_a_budget_are_exact_in_both_outputs(
    kafka_bootstrap: str, postgres_dsn: str, unique_name: str, tmp_path: Path
) -> None:
    workload, events = build_tagged_workload(17, messages=6000, rate=300, partitions=4)
    expected, overflowed = expected_series(events)
    run = LiveRun(
        workload,
        kafka_bootstrap=kafka_bootstrap,
        postgres_dsn=postgres_dsn,
        unique_name=unique_name,
        workdir=tmp_path,
        late=0,
        env=ENV,
    )
    async with run:
        await run.stream()
        rows = await settled(run, expected)
        [status] = [await inc.status() for inc in run.alive()]
        problems, messages = await output_problems(run, rows, expected, events)
    assert status is not None
    if status.get("series_overflow") != overflowed:
        problems.append(f"/status series_overflow {status.get('series_overflow')}, {overflowed}")
    if status.get("events_rejected"):
        problems.append(f"/status events_rejected {status.get('events_rejected')}")
    assert not problems, "\n".join(problems)
    assert run.exit_codes == {0: 0}
    full, windows = acceptance_figures(rows, events)
    print(
        f"\n[tags] {len(events)} events, {len(expected)} series aggregates, "
        f"{full} of {windows} windows of {WIDE} with {BUDGET} + 1 series, "
        f"{overflowed} events in overflow series; Kafka {messages} messages"
    )


@pytest.mark.timeout(300)
async def test_live_series_survive_kill_9_and_a_hand_off(
    kafka_bootstrap: str, postgres_dsn: str, unique_name: str, tmp_path: Path
) -> None:
    """Two instances; one is killed mid-stream and the survivor takes its partitions
    over from their checkpoints: the same series, the same overflow (the budget is
    derived from the restored windows), each series aggregate once in Kafka."""
    workload, events = build_tagged_workload(18, messages=6000, rate=250, partitions=4)
    expected, _ = expected_series(events)

    async def kill_one(run: LiveRun) -> None:
        async def half_sent() -> bool:
            return run.feed.progress >= 0.5

        await wait_for(half_sent, 60, "half of the stream sent")
        run.kill9(1)

        async def survivor_has_all() -> bool:
            return await run.assigned() == [workload.partitions]

        await wait_for(survivor_has_all, 30, "the survivor holding every partition")

    run = LiveRun(
        workload,
        kafka_bootstrap=kafka_bootstrap,
        postgres_dsn=postgres_dsn,
        unique_name=unique_name,
        workdir=tmp_path,
        instances=2,
        late=0,
        env={**ENV, "VABUS_KAFKA_SESSION_TIMEOUT_MS": "3000"},
    )
    async with run:
        await run.stream(kill_one)
        rows = await settled(run, expected)
        problems, messages = await output_problems(run, rows, expected, events)
    assert not problems, "\n".join(problems)
    assert run.exit_codes == {0: 0}
    full, windows = acceptance_figures(rows, events)
    print(
        f"\n[tags, kill -9] {len(events)} events, {len(expected)} series aggregates, "
        f"{full} of {windows} windows of {WIDE} with {BUDGET} + 1 series; "
        f"Kafka {messages} messages"
    )


def test_the_expected_series_follow_the_budget() -> None:
    """The independent computation itself, on a small case."""
    events = [
        {"name": "a", "value": 1.0, "timestamp": 5.0, "agg_func": "sum", "tags": {"host": h}}
        for h in ("x", "y", "x", "z", True)  # z and true: beyond a budget of 2
    ]
    got, overflowed = expected_series(events, budget=2)
    assert overflowed == 2
    assert got[("a", '{"host":"x"}', "sum", 0.0)] == (2.0, 2)
    assert got[("a", OVERFLOW_TAGS, "sum", 0.0)] == (2.0, 2)
