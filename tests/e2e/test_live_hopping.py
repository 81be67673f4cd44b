"""Hopping windows end to end (contract §12.7, issue 18): the service fed live over
several partitions with ``AGGREGATION_INTERVAL=20``, ``AGGREGATION_HOP=5`` and both
outputs, all 12 functions. Every window (one every 5 s, 20 s long) equals an independent
computation from the raw events in PostgreSQL and in Kafka (each window once), and the
ledger counts each event once. With ``AGGREGATION_ALLOWED_LATENESS`` (contract §12.4),
late events within it correct every window covering them and those past it are
dead-lettered."""

from __future__ import annotations

import math
from collections import Counter, defaultdict
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
from tests.fault.harness import ledger_problems, ledger_totals

pytestmark = [pytest.mark.e2e, pytest.mark.integration]

INTERVAL_S = 20.0
HOP_S = 5.0
ENV = {"AGGREGATION_INTERVAL": f"{INTERVAL_S:g}", "AGGREGATION_HOP": f"{HOP_S:g}"}


def expected_hopping(
    valid: list[dict[str, Any]], interval: float = INTERVAL_S, hop: float = HOP_S
) -> Results:
    """Each window [s, s + 20) for s a multiple of 5, from the raw events (in the order
    their partition got them), sharing no code with the service."""
    n = round(interval / hop)
    groups: dict[Key, list[tuple[float, float]]] = defaultdict(list)
    for e in valid:
        ts = e["timestamp"]
        last = math.floor(ts / hop) * hop
        for j in range(n):
            groups[(e["name"], e["agg_func"], last - j * hop)].append((ts, e["value"]))
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


# the live harness releases late events by its window of 10 s (tests.e2e.workload):
# with a hop of 5 the first window covering such an event (which decides, docs/hopping.md)
# is within the lateness when it is released as a correction (by 5 s at least), and
# past it when released as a late one (by 10 s)
LATE_ENV = {
    "AGGREGATION_INTERVAL": "10",
    "AGGREGATION_HOP": "5",
    "AGGREGATION_ALLOWED_LATENESS": "60",
}


@pytest.mark.timeout(300)
async def test_live_hopping_corrections_within_and_beyond_the_lateness(
    live: LiveFactory, postgres_dsn: str
) -> None:
    """Late events within the lateness reach every window covering them: PostgreSQL and
    Kafka hold, at each window's highest revision, the independent computation over the
    valid events and those; Kafka holds revisions 1, 2, ... of a window once each. Late
    events past the lateness are dead-lettered; the ledger counts both."""
    workload = build_live_workload(1804, events=30_000, rate=1500, partitions=4)
    async with live(
        workload, postgres_dsn=postgres_dsn, seed=1804, late=10, corrections=30, env=LATE_ENV
    ) as run:
        await run.stream()
        corrected = [c.event for c in run.feed.corrected]
        expected = expected_hopping(workload.valid + corrected, 10.0, 5.0)

        async def stored() -> Results:
            return windows(await pg_rows(run.dsn, run.table))

        rows = await settled(run, expected, stored, timeout=120.0)
        kafka = await kafka_rows(run.bootstrap, run.topic)
        ledger = await ledger_totals(run.dsn, run.namespace)
    released = len(run.feed.released)
    assert len(corrected) == 30 and released == 10
    problems = differences(rows, expected, "PostgreSQL", "windows")
    problems += differences(windows(kafka.rows), expected, "Kafka", "windows")
    if kafka.twice():
        problems.append(f"Kafka: (window, revision)s written twice: {kafka.twice()[:2]}")
    revisions: dict[Any, set[int]] = defaultdict(set)
    for key, revision in kafka.written:
        revisions[key].add(revision)
    gaps = [k for k, rs in revisions.items() if rs != set(range(1, max(rs) + 1))]
    if gaps:
        problems.append(f"Kafka: revisions not 1..n for {len(gaps)} windows, e.g. {gaps[:2]}")
    if not any(max(rs) > 1 for rs in revisions.values()):
        problems.append("no window was corrected")
    events = len(workload.valid)
    problems += ledger_problems(
        ledger,
        events + released + len(corrected),
        events + len(corrected),
        Counter({"late": released}),
        late_applied=len(corrected),
    )
    assert not problems, "\n".join(problems)
    assert run.exit_codes == {0: 0}
