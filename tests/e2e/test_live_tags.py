"""Series end to end (contract §12.3, issue 17's acceptance): the service fed live over
several partitions with ``AGGREGATION_GROUP_BY=host,region`` and both outputs. Per
series aggregates equal an independent computation in Kafka and PostgreSQL; 1,000 hosts
of one name against a budget of 100 give 100 series + 1 overflow series per window;
counts sum to the events sent; no dead letter."""

from __future__ import annotations

import math
import random
import time
from collections import Counter
from typing import Any

import orjson
import pytest

from tests.e2e.conftest import LiveFactory
from tests.e2e.live import TIME_SCALE, LiveRun, LiveWorkload, Message
from tests.e2e.live_actions import FAST_TAKEOVER, kill_second_at
from tests.e2e.live_outputs import (
    differences,
    every_event_aggregated,
    kafka_rows,
    pg_rows,
    series,
    settled,
    tags_json,
)
from tests.e2e.workload import INTERVAL

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
        series = tags_json(tags)
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


ENV = {
    "AGGREGATION_GROUP_BY": ",".join(GROUP_BY),
    "AGGREGATION_MAX_SERIES_PER_NAME": str(BUDGET),
}


async def output_problems(
    run: LiveRun, expected: Results, events: list[dict[str, Any]]
) -> tuple[Results, list[str], int]:
    """PostgreSQL's rows once settled, and what PostgreSQL, Kafka (each series aggregate
    once, keyed by its name) and the ledger get wrong."""

    async def stored() -> Results:
        return series(await pg_rows(run.dsn, run.table))

    rows = dict(await settled(run, expected, stored))
    kafka = await kafka_rows(run.bootstrap, run.topic)
    problems = differences(rows, expected, "PostgreSQL", "series rows")
    problems += differences(
        series(kafka.rows), expected, "Kafka (last value per series)", "series rows"
    )
    if kafka.messages != len(expected):
        problems.append(f"Kafka: {kafka.messages} messages for {len(expected)} series aggregates")
    if kafka.miskeyed:
        problems.append(f"Kafka: {kafka.miskeyed} messages not keyed by their name")
    problems += await every_event_aggregated(run, len(events))
    return rows, problems, kafka.messages


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


def passed(
    run: LiveRun,
    problems: list[str],
    rows: Results,
    events: list[dict[str, Any]],
    note: str,
    messages: int,
) -> None:
    """No problem, a clean exit, and the acceptance figures (printed)."""
    assert not problems, "\n".join(problems)
    assert run.exit_codes == {0: 0}
    full, windows = acceptance_figures(rows, events)
    print(
        f"\n[tags] {len(events)} events, {len(rows)} series aggregates, "
        f"{full} of {windows} windows of {WIDE} with {BUDGET} + 1 series; {note}"
        f"Kafka {messages} messages"
    )


@pytest.mark.timeout(240)
async def test_live_series_with_a_budget_are_exact_in_both_outputs(
    live: LiveFactory, postgres_dsn: str
) -> None:
    workload, events = build_tagged_workload(17, messages=6000, rate=300, partitions=4)
    expected, overflowed = expected_series(events)
    async with live(workload, postgres_dsn=postgres_dsn, late=0, env=ENV) as run:
        await run.stream()
        rows, problems, messages = await output_problems(run, expected, events)
        [status] = [await inc.status() for inc in run.alive()]
    assert status is not None
    if status.get("series_overflow") != overflowed:
        problems.append(f"/status series_overflow {status.get('series_overflow')}, {overflowed}")
    if status.get("events_rejected"):
        problems.append(f"/status events_rejected {status.get('events_rejected')}")
    passed(run, problems, rows, events, f"{overflowed} events in overflow series; ", messages)


@pytest.mark.timeout(300)
async def test_live_series_survive_kill_9_and_a_hand_off(
    live: LiveFactory, postgres_dsn: str
) -> None:
    """Two instances; one is killed mid-stream and the survivor takes its partitions
    over from their checkpoints: the same series, the same overflow (the budget is
    derived from the restored windows), each series aggregate once in Kafka."""
    workload, events = build_tagged_workload(18, messages=6000, rate=250, partitions=4)
    expected, _ = expected_series(events)
    async with live(
        workload,
        postgres_dsn=postgres_dsn,
        instances=2,
        late=0,
        env={**ENV, **FAST_TAKEOVER},
    ) as run:
        await run.stream(kill_second_at(0.5))
        rows, problems, messages = await output_problems(run, expected, events)
    passed(run, problems, rows, events, "kill -9: ", messages)


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
