"""Hopping windows end to end (contract §12.7, issue 18): the service fed live over
several partitions with ``AGGREGATION_INTERVAL=20``, ``AGGREGATION_HOP=5`` and both
outputs, all 12 functions. Every window (one every 5 s, 20 s long) equals an independent
computation from the raw events in PostgreSQL and in Kafka (each window once), and the
ledger counts each event once."""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Any

import pytest

from tests.e2e.conftest import LiveFactory
from tests.e2e.live import LiveRun, build_live_workload
from tests.e2e.live_actions import FAST_TAKEOVER, kill_second_at
from tests.e2e.live_outputs import (
    differences,
    every_event_aggregated,
    kafka_rows,
    pg_rows,
    settled,
    windows,
)
from tests.e2e.workload import Key, Results, reference_value

pytestmark = [pytest.mark.e2e, pytest.mark.integration]

INTERVAL_S = 20.0
HOP_S = 5.0
ENV = {"AGGREGATION_INTERVAL": f"{INTERVAL_S:g}", "AGGREGATION_HOP": f"{HOP_S:g}"}


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
    return {k: (reference_value(k[1], pairs), len(pairs)) for k, pairs in groups.items()}


async def problems_of(run: LiveRun, expected: Results, events: int) -> list[str]:
    """What PostgreSQL, Kafka (each window once, 20 s long) and the ledger get wrong."""

    async def stored() -> Results:
        return windows(await pg_rows(run.dsn, run.table))

    rows = await settled(run, expected, stored, timeout=120.0)
    kafka = await kafka_rows(run.bootstrap, run.topic)
    problems = differences(rows, expected, "PostgreSQL", "windows")
    problems += differences(windows(kafka.rows), expected, "Kafka", "windows")
    # each window once: one message, revision 1
    twice = kafka.twice() + [(k, rev) for k, (_, _, rev) in kafka.rows.items() if rev != 1]
    if twice:
        problems.append(f"Kafka: {len(twice)} windows written more than once, e.g. {twice[:2]}")
    lengths = {round(we - ws, 3) for _, _, _, ws, we in kafka.rows}
    if lengths != {INTERVAL_S}:
        problems.append(f"window lengths {sorted(lengths)}, not {INTERVAL_S:g} s")
    return problems + await every_event_aggregated(run, events)


@pytest.mark.timeout(240)
async def test_live_hopping_windows_are_exact_in_both_outputs(
    live: LiveFactory, postgres_dsn: str
) -> None:
    workload = build_live_workload(1801, events=8000, rate=500, partitions=4)
    expected = expected_hopping(workload.valid)
    events = len(workload.valid)
    async with live(workload, postgres_dsn=postgres_dsn, late=0, env=ENV) as run:
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
    live: LiveFactory, postgres_dsn: str
) -> None:
    """Two instances; one is killed mid-stream and the survivor takes its partitions
    over from their checkpoints (panes, state format 4): the same windows, each once."""
    workload = build_live_workload(1802, events=8000, rate=400, partitions=4)
    expected = expected_hopping(workload.valid)
    async with live(
        workload,
        postgres_dsn=postgres_dsn,
        instances=2,
        late=0,
        env={**ENV, **FAST_TAKEOVER},
    ) as run:
        await run.stream(kill_second_at(0.5))
        problems = await problems_of(run, expected, len(workload.valid))
    assert not problems, "\n".join(problems)
    assert run.exit_codes == {0: 0}
