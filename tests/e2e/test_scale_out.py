"""Scale-out acceptance, process level: the group grows and loses a member mid-stream.

Input on 8 partitions, fed live at a steady rate: keyed by name, and unkeyed (every
name spread over every partition) with ``repartition=true``, where the windows are fed
through the group's internal topic and the routing stage moves at the join and the kill
too. Two instances of the consumer
group start; a third joins at about a third of the stream; at about two thirds one of
the original two is killed with ``kill -9`` and not restarted, while the stream goes
on to its end. Partitions move at the join (a rebalance: revoked, checkpointed, adopted)
and after the kill (the survivors restore the dead instance's partitions from their last
checkpoints and re-read what came after). For every ``STORAGE_TYPE`` the result must be
exact in every output, no valid event dead-lettered, the late events exactly the
released ones, and the survivors must exit 0 on SIGTERM. With ``kafka`` alone there is
no PostgreSQL anywhere: the checkpoints live in the group's Kafka topic.

The hand-off after the kill is measured and printed, not asserted: from the kill until
the dead instance's partitions are assigned to survivors, and until each has delivered
past the position the dead instance had reached.
"""

from __future__ import annotations

import ast
import asyncio
import re
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.live import LiveRun, build_live_workload
from tests.fault.harness import wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.integration]

PARTITIONS = 8
EVENTS = 60_000
RATE = 2000.0  # messages/s: a 30 s stream
JOIN_AT, KILL_AT = 1 / 3, 2 / 3  # fractions of the stream sent
VICTIM = 1  # one of the two original instances
HANDOFF_TIMEOUT_S = 30.0
POLL_S = 0.1


@dataclass
class Handoff:
    """What the survivors' /status showed of the dead instance's partitions."""

    killed_at: float  # monotonic
    before: dict[str, int | None]  # partition -> position in the victim's last /status
    assigned: dict[str, float] = field(default_factory=dict)  # s after the kill
    delivered: dict[str, float] = field(default_factory=dict)  # s after the kill
    restored: dict[str, int] = field(default_factory=dict)  # position sought to (the logs)

    def summary(self) -> str:
        parts = sorted(self.before, key=_partition_number)

        def fmt(d: dict[str, float]) -> str:
            if not d:
                return "never"
            return f"{max(d.values()):.1f} s (first {min(d.values()):.1f} s)"

        reread = {
            _partition_number(p): (self.before[p] or 0) - self.restored[p]
            for p in parts
            if p in self.restored
        }
        return (
            f"partitions {[_partition_number(p) for p in parts]} of the killed instance: "
            f"assigned to survivors {fmt(self.assigned)} after the kill, delivering past "
            f"their pre-kill positions {fmt(self.delivered)} after it; messages re-read "
            f"from their checkpoints (pre-kill position - restored one) {reread}"
        )


def _partition_number(pid: str) -> int:
    return int(pid.rsplit(":", 1)[1])


def _position(view: dict[str, Any]) -> int | None:
    pos = view.get("position")
    return None if pos is None else int(pos)


_ASSIGNED = re.compile(r"kafka bus: assigned (\[.*?\]) at (\[.*?\])")


def _restored_positions(run: LiveRun) -> dict[str, int]:
    """Where each live instance's latest assignment started reading, by partition (the
    service logs it; an assignment names all of an instance's partitions, so the last
    one of each survivor is the one after the kill)."""
    out: dict[str, int] = {}
    for inc in run.alive():
        found = list(_ASSIGNED.finditer(inc.proc.log_text()))
        if found:
            last = found[-1]
            out.update(zip(ast.literal_eval(last[1]), ast.literal_eval(last[2]), strict=True))
    return out


async def _watch_handoff(run: LiveRun, h: Handoff) -> None:
    """Poll the survivors' /status until every partition of the victim is held by one of
    them and has moved past the position the victim had reached."""
    deadline = h.killed_at + HANDOFF_TIMEOUT_S
    while len(h.delivered) < len(h.before) and time.monotonic() < deadline:
        run.check_alive()
        states = await asyncio.gather(*(inc.status() for inc in run.alive()))
        now = time.monotonic() - h.killed_at
        held: dict[str, dict[str, Any]] = {}
        for st in states:
            held.update((st or {}).get("partitions") or {})
        for p, before in h.before.items():
            view = held.get(p)
            if view is None:
                continue
            pos = _position(view)
            h.assigned.setdefault(p, now)
            if p not in h.delivered and pos is not None and (before is None or pos > before):
                h.delivered[p] = now
        await asyncio.sleep(POLL_S)


@pytest.fixture(params=[("kafka", 606), ("kafka,postgres", 607)], ids=lambda p: p[0])
def storage(request: pytest.FixtureRequest) -> tuple[str, int, str | None]:
    """(STORAGE_TYPE, seed, PostgreSQL DSN or None): PostgreSQL only when it is an output
    (a synchronous fixture, so the session server can start outside the test's loop)."""
    kind, seed = request.param
    dsn = request.getfixturevalue("postgres_dsn") if "postgres" in kind else None
    return kind, seed, dsn


@pytest.mark.timeout(150)
@pytest.mark.parametrize("unkeyed", [False, True], ids=["keyed", "unkeyed-repartition"])
async def test_scale_out_join_and_kill9_mid_stream_is_exact(
    storage: tuple[str, int, str | None],
    unkeyed: bool,
    kafka_bootstrap: str,
    unique_name: str,
    tmp_path: Path,
) -> None:
    kind, seed, dsn = storage
    workload = build_live_workload(
        seed, events=EVENTS, rate=RATE, partitions=PARTITIONS, unkeyed=unkeyed
    )
    figures: list[str] = []

    async def scale(run: LiveRun) -> None:
        await wait_for(_progress(run, JOIN_AT), 60, "a third of the stream sent")
        join_started, sent_at_join = time.monotonic(), run.feed.elapsed()
        joiner = run.start_instance()

        async def three_share() -> bool:
            counts = await run.assigned()
            return len(counts) == 3 and min(counts) > 0 and sum(counts) == PARTITIONS

        await wait_for(
            three_share, 30, "the third instance holding partitions", run.instances[joiner].proc
        )
        figures.append(
            f"join at {sent_at_join:.1f} s into the stream: the third instance "
            f"held partitions {time.monotonic() - join_started:.1f} s after its "
            "start"
        )

        await wait_for(_progress(run, KILL_AT), 60, "two thirds of the stream sent")
        st = await run.instances[VICTIM].status()
        assert st is not None, "the instance to be killed does not answer /status"
        before = {p: _position(v) for p, v in (st.get("partitions") or {}).items()}
        assert before, f"instance {VICTIM} holds no partition before the kill"
        sent_at_kill = run.feed.elapsed()
        run.kill9(VICTIM)
        h = Handoff(time.monotonic(), before)
        await _watch_handoff(run, h)
        restored = _restored_positions(run)
        h.restored = {p: restored[p] for p in before if p in restored}
        figures.append(f"kill -9 at {sent_at_kill:.1f} s into the stream: {h.summary()}")
        missing = sorted(set(before) - set(h.delivered), key=_partition_number)
        if missing:
            run.problems.append(
                f"partitions {missing} of the killed instance did not deliver past their "
                f"pre-kill positions {[before[p] for p in missing]} within "
                f"{HANDOFF_TIMEOUT_S:.0f} s (assigned: "
                f"{ {p: h.assigned.get(p) for p in missing} })"
            )

    async with LiveRun(
        workload,
        kafka_bootstrap=kafka_bootstrap,
        postgres_dsn=dsn,
        unique_name=unique_name,
        workdir=tmp_path,
        storage=kind,
        instances=2,
        env={"VABUS_KAFKA_SESSION_TIMEOUT_MS": "3000"},
        seed=seed,
    ) as run:
        await run.stream(scale)
        # the dead instance's counters died with it and the survivors re-read what came
        # after its checkpoints: /metrics cannot add up to the totals here
        problems = await run.check(counters=False)
        if unkeyed:
            states = [await inc.status() for inc in run.alive()]
            dropped = sum((st or {}).get("replays_dropped", 0) for st in states)
            held = [p for st in states for p in (st or {}).get("partitions") or {}]
            assert held and all(p.startswith(run.windowed + ":") for p in held), held
            figures.append(f"routed records dropped as replays by the survivors: {dropped}")
    label = f"{kind}, {'unkeyed' if unkeyed else 'keyed'}"
    print(f"[scale-out {label}] " + f"\n[scale-out {label}] ".join(figures))
    assert not problems, "\n".join(problems)
    assert run.exit_codes == {0: 0, 2: 0}, f"exit codes of the survivors: {run.exit_codes}"


def _progress(run: LiveRun, fraction: float) -> Callable[[], Coroutine[Any, Any, bool]]:
    async def reached() -> bool:
        return run.feed.progress >= fraction

    return reached
