"""Corrections end to end (contract §12.4), fed live over several partitions with
``AGGREGATION_INTERVAL=10`` and ``AGGREGATION_ALLOWED_LATENESS=60``.

Late events within the lateness of their window (released once the window was seen
written, a checkpoint later, and at least ``LATENESS_SAFETY_S`` before the partition's
watermark passes its end + 60 s: 20 to 50 s after the window's end) correct it:
PostgreSQL holds the corrected value at the highest revision, Kafka holds revisions
1, 2, ... of the key once each. Late events past it (released at least 80 s after the
window's end) are dead-lettered ``late``. The ledger balances, with the corrections as
``late_applied`` (also per window in ``vabus_window_late``). The same through ``kill -9``
cycles and a hand-off of partitions to a second instance (a join mid-stream).
"""

from __future__ import annotations

import pytest

from tests.e2e.conftest import LiveFactory
from tests.e2e.live import build_live_workload
from tests.e2e.live_actions import FAST_TAKEOVER, join_at, kill_and_replace_at

pytestmark = [pytest.mark.e2e, pytest.mark.integration]

LATENESS = {"AGGREGATION_ALLOWED_LATENESS": "60", "AGGREGATION_INTERVAL": "10"}


@pytest.mark.timeout(200)
async def test_late_events_within_the_lateness_correct_their_window(
    live: LiveFactory, postgres_dsn: str
) -> None:
    workload = build_live_workload(1701, events=50_000, rate=2000, partitions=4)
    async with live(
        workload, postgres_dsn=postgres_dsn, seed=1701, late=20, corrections=40, env=LATENESS
    ) as run:
        await run.stream()
        problems = await run.check()
    assert len(run.feed.corrected) == 40 and len(run.feed.released) == 20
    assert not problems, "\n".join(problems)
    assert run.exit_codes == {0: 0}


@pytest.mark.timeout(300)
async def test_corrections_stay_exact_through_kill9_cycles(
    live: LiveFactory, postgres_dsn: str
) -> None:
    """The instance is killed and replaced three times: every replay recomputes the
    same revisions, and the read-back writes none of them twice to Kafka."""
    workload = build_live_workload(1702, events=60_000, rate=1500, partitions=4)
    async with live(
        workload,
        postgres_dsn=postgres_dsn,
        seed=1702,
        late=15,
        corrections=40,
        env={**LATENESS, **FAST_TAKEOVER},
    ) as run:
        await run.stream(kill_and_replace_at(0.3, 0.55, 0.8))
        problems = await run.check(counters=False)  # the killed instances' counters died
    assert not problems, "\n".join(problems)
    assert run.exit_codes == {3: 0}


@pytest.mark.timeout(240)
async def test_corrections_stay_exact_through_a_hand_off(
    live: LiveFactory, postgres_dsn: str
) -> None:
    """A second instance joins mid-stream: half of the partitions move to it with their
    kept windows (revoked, checkpointed, restored) and are corrected there."""
    workload = build_live_workload(1703, events=60_000, rate=2000, partitions=4)
    async with live(
        workload, postgres_dsn=postgres_dsn, seed=1703, late=15, corrections=40, env=LATENESS
    ) as run:
        await run.stream(join_at(0.4))
        # the first instance counted what it did before the hand-off, the second what it
        # re-read from the checkpoints too: /metrics need not add up
        problems = await run.check(counters=False)
    assert not problems, "\n".join(problems)
    assert run.exit_codes == {0: 0, 1: 0}
