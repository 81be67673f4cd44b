"""Hopping windows end to end (contract §12.7, issue 18): the service fed live over
several partitions with ``AGGREGATION_INTERVAL=20``, ``AGGREGATION_HOP=5`` and both
outputs, all 12 functions. Every window (one every 5 s, 20 s long) equals an independent
computation from the raw events in PostgreSQL and in Kafka (each window once), and the
ledger counts each event once."""

from __future__ import annotations

import asyncio
import math
import statistics
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import orjson
import pytest

from tests.e2e.live import LiveRun, _read_topic, build_live_workload
from tests.e2e.test_e2e_http import stored_rows
from tests.e2e.workload import Key, Results
from tests.fault.harness import ledger_problems, ledger_totals, wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.integration]

INTERVAL_S = 20.0
HOP_S = 5.0
ENV = {"AGGREGATION_INTERVAL": f"{INTERVAL_S:g}", "AGGREGATION_HOP": f"{HOP_S:g}"}


def _percentile(values: list[float], q: float) -> float:
    v = sorted(values)
    h = (len(v) - 1) * q
    lo = math.floor(h)
    hi = min(lo + 1, len(v) - 1)
    return v[lo] + (h - lo) * (v[hi] - v[lo])


def _value(func: str, pairs: list[tuple[float, float]]) -> float:
    values = [v for _, v in pairs]
    if func == "sum":
        return math.fsum(values)
    if func == "avg":
        return statistics.fmean(values)
    if func == "min":
        return min(values)
    if func == "max":
        return max(values)
    if func == "count":
        return float(len(values))
    if func == "first":
        return min(enumerate(pairs), key=lambda ip: (ip[1][0], ip[0]))[1][1]
    if func == "last":
        return max(enumerate(pairs), key=lambda ip: (ip[1][0], ip[0]))[1][1]
    if func == "stddev":
        return statistics.pstdev(values)
    return _percentile(values, int(func[1:]) / 100)


def expected_hopping(valid: list[dict[str, Any]]) -> Results:
    """Each window [s, s + 20) for s a multiple of 5, from the raw events (in the order
    their partition got them), sharing no code with the service."""
    n = round(INTERVAL_S / HOP_S)
    groups: dict[Key, list[tuple[float, float]]] = defaultdict(list)
    for e in valid:
        ts = e["timestamp"]
        last = math.floor(ts / HOP_S) * HOP_S
        for j in range(n):
            groups[(e["name"], e["agg_func"], last - j * HOP_S)].append((ts, e["value"]))
    return {k: (_value(k[1], pairs), len(pairs)) for k, pairs in groups.items()}


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
        f"{where}: {len(actual)} windows for {len(expected)}; {len(missing)} missing, "
        f"{len(extra)} extra, {len(wrong)} wrong; e.g. missing {missing[:2]}, extra "
        f"{extra[:2]}, wrong {[(k, actual[k], expected[k]) for k in wrong[:2]]}"
    ]


async def kafka_windows(run: LiveRun) -> tuple[Results, Counter[Key], set[float]]:
    """Per window key: the value in the aggregates topic, how many times it was
    written, and the window lengths seen."""
    from datetime import datetime

    records = await _read_topic(run.bootstrap, run.topic, lambda rs: False, timeout=30.0)
    out: dict[Key, tuple[float, int]] = {}
    seen: Counter[Key] = Counter()
    lengths: set[float] = set()
    for m in records:
        v = orjson.loads(m.value)
        ws = datetime.fromisoformat(v["window_start"]).timestamp()
        we = datetime.fromisoformat(v["window_end"]).timestamp()
        key = (v["name"], v["agg_func"], ws)
        out[key] = (v["value"], v["count"])
        seen[key] += 1
        lengths.add(round(we - ws, 3))
    return out, seen, lengths


async def settled(run: LiveRun, expected: Results, timeout: float = 120.0) -> Results:
    deadline = time.monotonic() + timeout
    rows: Results = {}
    while time.monotonic() < deadline:
        run.check_alive()
        rows = await stored_rows(run.dsn, run.table)
        if not differences(rows, expected, ""):
            break
        await asyncio.sleep(0.5)
    return rows


async def problems_of(run: LiveRun, expected: Results, events: int) -> list[str]:
    """What PostgreSQL, Kafka (each window once, 20 s long) and the ledger get wrong."""
    rows = await settled(run, expected)
    kafka, written, lengths = await kafka_windows(run)
    ledger = await ledger_totals(run.dsn, run.namespace)
    problems = differences(rows, expected, "PostgreSQL")
    problems += differences(kafka, expected, "Kafka")
    twice = [k for k, c in written.items() if c > 1]
    if twice:
        problems.append(f"Kafka: {len(twice)} windows written more than once, e.g. {twice[:2]}")
    if lengths != {INTERVAL_S}:
        problems.append(f"window lengths {sorted(lengths)}, not {INTERVAL_S:g} s")
    return problems + ledger_problems(ledger, events, events, Counter())


@pytest.mark.timeout(240)
async def test_live_hopping_windows_are_exact_in_both_outputs(
    kafka_bootstrap: str, postgres_dsn: str, unique_name: str, tmp_path: Path
) -> None:
    workload = build_live_workload(1801, events=8000, rate=500, partitions=4)
    expected = expected_hopping(workload.valid)
    run = LiveRun(
        workload,
        kafka_bootstrap=kafka_bootstrap,
        postgres_dsn=postgres_dsn,
        unique_name=unique_name,
        workdir=tmp_path,
        late=0,
        env=ENV,
    )
    events = len(workload.valid)
    async with run:
        await run.stream()
        problems = await problems_of(run, expected, events)
        [status] = [await inc.status() for inc in run.alive()]
    assert status is not None
    if status["config"]["aggregation"]["hop_s"] != HOP_S:
        problems.append(f"/status config hop {status['config']['aggregation']['hop_s']}")
    assert not problems, "\n".join(problems)
    assert run.exit_codes == {0: 0}
    print(
        f"\n[hopping] {events} events, {len(expected)} windows of {INTERVAL_S:g} s every "
        f"{HOP_S:g} s, exact in PostgreSQL and Kafka"
    )


@pytest.mark.timeout(300)
async def test_live_hopping_windows_survive_kill_9_and_a_hand_off(
    kafka_bootstrap: str, postgres_dsn: str, unique_name: str, tmp_path: Path
) -> None:
    """Two instances; one is killed mid-stream and the survivor takes its partitions
    over from their checkpoints (panes, state format 4): the same windows, each once."""
    workload = build_live_workload(1802, events=8000, rate=400, partitions=4)
    expected = expected_hopping(workload.valid)

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
        problems = await problems_of(run, expected, len(workload.valid))
    assert not problems, "\n".join(problems)
    assert run.exit_codes == {0: 0}
