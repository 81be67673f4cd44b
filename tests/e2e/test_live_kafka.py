"""The service fed live, as real producers do: it runs while a producer sends at a steady
rate over several partitions, so it is caught up with most partitions most of the time.
Each test ends with exact aggregates in PostgreSQL and Kafka, exactly the expected dead
letters (garbage and really-late events, never a valid event) and the late counter."""

from __future__ import annotations

import asyncio
import math
import time

import pytest

from service.dev.postgres_server import EmbeddedPostgres
from tests.e2e.conftest import LiveFactory
from tests.e2e.live import GRACE_S, INTERVAL, TIME_SCALE, LiveRun, build_live_workload
from tests.e2e.live_actions import FAST_TAKEOVER, kill_second_at, progress
from tests.e2e.test_e2e_http import stored_rows
from tests.fault.harness import wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.integration]

PG_DOWN_S = 15.0
SILENT_IDLE_S = 3.0  # AGGREGATION_IDLE_TIMEOUT of the silent-partition test


@pytest.mark.timeout(150)
async def test_live_stream_over_four_partitions_is_exact(
    live: LiveFactory, postgres_dsn: str
) -> None:
    workload = build_live_workload(101, events=50_000, rate=3500, partitions=4)
    async with live(workload, postgres_dsn=postgres_dsn, seed=101) as run:
        await run.stream()
        problems = await run.check()
    assert not problems, "\n".join(problems)
    assert run.exit_codes == {0: 0}


@pytest.mark.timeout(200)
async def test_live_stream_through_a_postgres_outage_is_exact(
    live: LiveFactory, pg_restartable: EmbeddedPostgres
) -> None:
    workload = build_live_workload(202, events=60_000, rate=2000, partitions=4)

    async def outage(run: LiveRun) -> None:
        await wait_for(progress(run, 0.25), 60, "a quarter of the stream sent")
        await pg_restartable.stop()
        down_at = time.monotonic()
        try:
            while time.monotonic() - down_at < PG_DOWN_S:  # a timed outage, not a wait
                run.check_alive()
                await asyncio.sleep(0.5)
        finally:
            await pg_restartable.start()

    async with live(workload, postgres_dsn=pg_restartable.dsn, seed=202) as run:
        await run.stream(outage)
        problems = await run.check()
    assert not problems, "\n".join(problems)
    assert run.exit_codes == {0: 0}


@pytest.mark.timeout(160)
async def test_live_stream_with_garbage_messages_is_exact(
    live: LiveFactory, postgres_dsn: str
) -> None:
    workload = build_live_workload(303, events=60_000, garbage=20_000, rate=4000, partitions=4)
    assert len(workload.rejects) == 9  # every garbage reason is exercised
    async with live(workload, postgres_dsn=postgres_dsn, seed=303) as run:
        await run.stream()
        problems = await run.check()
    assert not problems, "\n".join(problems)
    assert run.exit_codes == {0: 0}


@pytest.mark.timeout(200)
async def test_two_instances_one_killed_mid_stream_is_exact(
    live: LiveFactory, postgres_dsn: str
) -> None:
    """Checkpoints live in PostgreSQL, shared by the group: the survivor takes the dead
    instance's partitions over with their windows and their emitted history."""
    workload = build_live_workload(404, events=60_000, rate=2500, partitions=8)

    async with live(
        workload,
        postgres_dsn=postgres_dsn,
        instances=2,
        env=FAST_TAKEOVER,
        seed=404,
    ) as run:
        await run.stream(kill_second_at(0.5))
        # the dead instance's counters died with it and the survivor re-reads what came
        # after its checkpoints: /metrics cannot add up to the totals here
        problems = await run.check(counters=False)
    assert not problems, "\n".join(problems)
    assert run.exit_codes == {0: 0}


@pytest.mark.timeout(150)
async def test_a_partition_that_falls_silent_does_not_stop_windows(
    live: LiveFactory, postgres_dsn: str
) -> None:
    """Partition 3 gets events only during the first 10 % of the stream. Once it has been
    silent for the idle timeout it stops holding the watermark, so the windows after its
    last event come out while the other partitions still flow."""
    silent = 3
    workload = build_live_workload(
        505, events=50_000, rate=2500, partitions=4, silent_partition=silent
    )
    last_at, last_ts = workload.last_event(silent)
    beyond = math.floor(last_ts / INTERVAL) * INTERVAL + INTERVAL  # first window after it
    # the silent partition is released <= idle timeout + the 1 s tick after its last
    # message; the window then closes when the others' watermark passes its end
    others_pass = (beyond + INTERVAL + GRACE_S - workload.t0) / TIME_SCALE
    deadline = max(last_at + SILENT_IDLE_S + 1.0, others_pass) + 5.0  # + write and poll
    assert deadline < workload.duration - 3.0, "stream too short to tell"

    async def windows_flow(run: LiveRun) -> None:
        async def beyond_written() -> bool:
            rows = await stored_rows(run.dsn, run.table)
            return any(ws >= beyond for _, _, ws in rows)

        try:
            await wait_for(
                beyond_written,
                deadline - run.feed.elapsed(),
                f"a window starting at or after {beyond}",
            )
        except AssertionError as exc:
            run.problems.append(
                f"no window after the silent partition's last event time "
                f"{deadline:.1f} s into the stream: {exc}"
            )
            return
        seen = run.feed.elapsed()
        print(
            f"\n[live] silent partition's last message at {last_at:.1f} s; a later "
            f"window written at {seen:.1f} s (deadline {deadline:.1f} s)"
        )
        if run.feed.main_done_at is not None:
            run.problems.append(
                "the window after the silent partition came out only after the stream had ended"
            )

    async with live(
        workload,
        postgres_dsn=postgres_dsn,
        late_partitions=[p for p in range(4) if p != silent],
        env={"AGGREGATION_IDLE_TIMEOUT": f"{SILENT_IDLE_S:g}"},
        seed=505,
    ) as run:
        await run.stream(windows_flow)
        problems = await run.check()
    assert not problems, "\n".join(problems)
    assert run.exit_codes == {0: 0}
