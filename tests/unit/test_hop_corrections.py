"""Corrections of hopping windows (AGGREGATION_HOP with AGGREGATION_ALLOWED_LATENESS,
service.aggregation.hop_corrections): every revision of every window equals an
independent computation from the raw events judged one event at a time, whatever the
batch cuts and through a checkpoint; kept panes expire; the ledger balances."""

from __future__ import annotations

import math
import random
from collections import defaultdict
from typing import Any

import orjson
from hypothesis import given, settings
from hypothesis import strategies as st

from service.aggregation.aggregator import EventAggregator
from service.aggregation.partition import HOP_LATE_STATE_FORMAT, HOP_STATE_FORMAT
from service.checkpoints.base import PartitionCheckpoint
from service.core.clock import ManualClock
from service.core.events import Aggregate
from tests.unit.test_hopping import FUNCS, T0, assert_equal, batch, ev, make, reference

E = tuple[str, str, float, float]  # name, func, value, ts
RevKey = tuple[str, str, float, int]  # name, func, window start, revision


def value_of(func: str, pairs: list[tuple[float, float]], interval: float, hop: float) -> float:
    """One window's result from its (ts, value) pairs, by test_hopping's reference."""
    evs = [("x", func, v, t) for t, v in pairs]
    got = reference(evs, interval, hop)
    # a window holding every pair (they are all in one window)
    for value, count in got.values():
        if count == len(pairs):
            return value
    raise AssertionError(pairs)


def expected(
    records: list[list[E]], interval: float, hop: float, lateness: float, grace: float = 0.0
) -> tuple[dict[RevKey, tuple[float, int]], int, int]:
    """Every revision of every window, judging each event alone in the order given (the
    per-record semantics), independently of the service: an event for a pane the
    boundary passed is in every window covering the pane while the first of them (the
    earliest) has an end plus the lateness the watermark has not reached, else
    dead-lettered (a window emitted before the event gets a revision, one still open
    has it in its revision 1). Revision 1 holds the events that reached the window
    before it was emitted; each record that reaches it after gives the next revision.
    Returns the revisions, the dead-lettered and the applied late events."""
    n = round(interval / hop)
    max_ts = -math.inf
    members: dict[tuple[str, str, float], list[tuple[float, float, int, bool]]] = defaultdict(list)
    dead = applied = 0
    for r, record in enumerate(records):
        for name, func, value, ts in record:
            boundary = math.floor((max_ts - grace) / hop) * hop if max_ts > -math.inf else -math.inf
            q = math.floor(ts / hop) * hop
            cover = [q - (n - 1 - j) * hop for j in range(n)]
            if q + hop > boundary:
                for s in cover:
                    members[(name, func, s)].append((ts, value, r, False))
                max_ts = max(max_ts, ts)
                continue
            if max_ts - grace >= cover[0] + interval + lateness:
                dead += 1
                continue
            applied += 1
            for s in cover:
                members[(name, func, s)].append((ts, value, r, s + interval <= boundary))
    out: dict[RevKey, tuple[float, int]] = {}
    for (name, func, s), ms in members.items():
        before = [m for m in ms if not m[3]]
        late_records = sorted({m[2] for m in ms if m[3]})
        revision = 0
        if before:
            revision = 1
            out[(name, func, s, 1)] = _result(func, before, interval, hop)
        for r in late_records:
            revision += 1
            upto = before + [m for m in ms if m[3] and m[2] <= r]
            out[(name, func, s, revision)] = _result(func, upto, interval, hop)
    return out, dead, applied


def _result(
    func: str, ms: list[tuple[float, float, int, bool]], interval: float, hop: float
) -> tuple[float, int]:
    # in arrival order (first/last break ties by it), as the service sees them
    return value_of(func, [(m[0], m[1]) for m in ms], interval, hop), len(ms)


def revisions(aggs: list[Aggregate]) -> dict[RevKey, tuple[float, int]]:
    out: dict[RevKey, tuple[float, int]] = {}
    for a in aggs:
        key = (a.name, a.agg_func, a.window_start, a.revision)
        assert key not in out, f"{key} emitted twice"
        out[key] = (a.value, a.count)
    return out


def assert_revisions(
    actual: dict[RevKey, tuple[float, int]], want: dict[RevKey, tuple[float, int]]
) -> None:
    # assert_equal compares (name, func, start) keys: the revision rides in the name
    assert_equal(
        {(f"{k[0]}#{k[3]}", k[1], k[2]): v for k, v in actual.items()},
        {(f"{k[0]}#{k[3]}", k[1], k[2]): v for k, v in want.items()},
    )


def stream(rng: random.Random, count: int, funcs: list[str]) -> list[list[E]]:
    """Records of 1-3 events moving forward in time, some of them late by up to 45 s."""
    records: list[list[E]] = []
    t = T0
    for _ in range(count):
        record: list[E] = []
        for _ in range(rng.choice([1, 1, 1, 2, 3])):
            t += rng.uniform(0.0, 1.5)
            late = rng.choice([0.0] * 6 + [-8.0, -17.0, -26.0, -45.0])
            value = float(rng.randint(-20, 20))
            record.append((rng.choice(["a", "b"]), rng.choice(funcs), value, t + late))
        records.append(record)
    return records


def run(
    records: list[list[E]],
    cuts: list[int],
    *,
    interval: float,
    hop: float,
    lateness: float,
    restart_at: int | None = None,
) -> tuple[list[Aggregate], EventAggregator, list[str]]:
    """Feed the records in batches of the sizes ``cuts`` (cycled), restarting from a
    checkpoint after batch ``restart_at``, then flush by the quiet rule."""
    agg = make(interval=interval, hop=hop, allowed_lateness_s=lateness)
    out: list[Aggregate] = []
    dead: list[str] = []
    agg.process(batch([]))  # unread data: holds the watermark from the start
    i = b = 0
    while i < len(records):
        size = cuts[b % len(cuts)]
        chunk = records[i : i + size]
        got = agg.process(
            batch([orjson.dumps([dict(zip(_FIELDS, e, strict=True)) for e in r]) for r in chunk])
        )
        out += got.aggregates
        dead += [d.reason for d in got.dead_letters]
        i += size
        b += 1
        if b == restart_at:
            snap = agg.snapshot()
            agg = make(interval=interval, hop=hop, allowed_lateness_s=lateness)
            agg.restore(snap)
    clock = agg._clock
    assert isinstance(clock, ManualClock)
    out += agg.process(batch([], caught_up=True)).aggregates
    clock.advance(3600.0)
    out += agg.process(batch([], caught_up=True)).aggregates
    return out, agg, dead


_FIELDS = ("name", "agg_func", "value", "timestamp")


def test_every_revision_equals_the_raw_events_judged_one_at_a_time() -> None:
    rng = random.Random(5)
    records = stream(rng, 400, FUNCS)
    want, dead, applied = expected(records, 20.0, 5.0, 12.0)
    assert dead and applied  # both rules at work
    assert any(k[3] > 2 for k in want)  # windows corrected more than once
    out, agg, dead_letters = run(records, [1], interval=20.0, hop=5.0, lateness=12.0)
    assert_revisions(revisions(out), want)
    assert dead_letters == ["late"] * dead
    ledger = agg.ledger()
    assert ledger["imbalance"] == 0
    assert ledger["late"] == dead and ledger["late_applied"] == applied
    assert ledger["received"] == sum(len(r) for r in records)
    assert agg.open_windows == 0


@settings(max_examples=30, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    cuts=st.lists(st.integers(1, 60), min_size=1, max_size=4),
    hop=st.sampled_from([5.0, 10.0]),
    lateness=st.sampled_from([3.0, 12.0, 40.0]),
    restart=st.one_of(st.none(), st.integers(1, 8)),
)
def test_the_same_revisions_whatever_the_batch_cuts_and_through_a_checkpoint(
    seed: int, cuts: list[int], hop: float, lateness: float, restart: int | None
) -> None:
    rng = random.Random(seed)
    records = stream(rng, 150, ["sum", "min", "last", "count", "avg"])
    want, dead, _ = expected(records, 20.0, hop, lateness)
    out, agg, dead_letters = run(
        records, cuts, interval=20.0, hop=hop, lateness=lateness, restart_at=restart
    )
    assert_revisions(revisions(out), want)
    assert dead_letters == ["late"] * dead
    assert agg.ledger()["imbalance"] == 0


def test_a_late_event_is_a_revision_for_emitted_windows_and_in_open_ones() -> None:
    agg = make(interval=20.0, hop=5.0, allowed_lateness_s=15.0)
    records = [
        ev("a", "sum", 1.0, T0 + 1),
        ev("a", "sum", 2.0, T0 + 12),
        ev("a", "sum", 1.0, T0 + 30),
    ]
    agg.process(batch(records))
    p = agg._parts["p0"]
    assert p.closed_until == T0 + 30  # windows ending up to T0 + 30 are out
    # pane T0 + 15: windows T0 .. T0 + 10 are out and correctable (the watermark, T0 +
    # 30, is below their end + 15), T0 + 15 is still open: its revision 1 takes it
    out = agg.process(batch([ev("a", "sum", 5.0, T0 + 17)]))
    assert out.dead_letters == []
    got = {(a.window_start, a.revision): a.value for a in out.aggregates}
    assert got == {(T0, 2): 8.0, (T0 + 5, 2): 7.0, (T0 + 10, 2): 7.0}
    assert sorted(p.hop_revisions.values()) == [2, 2, 2]
    out = agg.process(batch([ev("a", "sum", 1.0, T0 + 36)]))
    got = {(a.window_start, a.revision): a.value for a in out.aggregates}
    assert got == {(T0 + 15, 1): 6.0}  # 5 (late, open then) + 1 at T0 + 30
    # pane T0 + 20 at watermark T0 + 36: its first window, T0 + 5, is correctable
    # until T0 + 40; windows T0 + 5 .. T0 + 15 are out (revisions), T0 + 20 is open
    out = agg.process(batch([ev("a", "sum", 100.0, T0 + 22)]))
    assert out.dead_letters == []
    got = {(a.window_start, a.revision): a.value for a in out.aggregates}
    assert got == {(T0 + 5, 3): 107.0, (T0 + 10, 3): 107.0, (T0 + 15, 2): 106.0}
    # pane T0 + 5: its first window, T0 - 10, was correctable until T0 + 25: dead-lettered
    # though window T0 + 5 still is (a pane holds no event one of its windows lacks)
    out = agg.process(batch([ev("a", "sum", 100.0, T0 + 7)]))
    assert [d.reason for d in out.dead_letters] == ["late"]
    assert {s for (_, _, s) in p.late_windows} == {T0 - 10, T0 - 5, T0, T0 + 5}
    out = agg.process(batch([ev("a", "sum", 1.0, T0 + 41)]))
    got = {(a.window_start, a.revision): a.value for a in out.aggregates}
    assert got == {(T0 + 20, 1): 102.0}  # T0 + 22 (late, open then), T0 + 30, T0 + 36
    ledger = agg.ledger()
    assert ledger["imbalance"] == 0 and ledger["late_applied"] == 2 and ledger["late"] == 1
    # far later: every kept pane and revision expires
    agg.process(batch([ev("a", "sum", 1.0, T0 + 200)]))
    assert p.kept_panes is not None and not p.kept_panes.panes and not p.hop_revisions
    out = agg.process(batch([ev("a", "sum", 1.0, T0 + 16)]))
    assert [d.reason for d in out.dead_letters] == ["late"]
    assert agg.ledger()["late"] == 2
    assert agg.ledger()["imbalance"] == 0


def test_checkpoint_holds_kept_panes_and_revisions() -> None:
    agg = make(interval=20.0, hop=5.0, allowed_lateness_s=30.0)
    agg.process(batch([ev("a", "sum", 1.0, T0 + 1), ev("a", "sum", 1.0, T0 + 30)]))
    agg.process(batch([ev("a", "sum", 5.0, T0 + 2)]))
    [cp] = agg.snapshot()
    body: dict[str, Any] = orjson.loads(cp.state or b"{}")
    assert body["format"] == HOP_LATE_STATE_FORMAT
    assert body["kept_panes"] and body["hop_revisions"]
    again = make(interval=20.0, hop=5.0, allowed_lateness_s=30.0)
    again.restore([cp])
    out = again.process(batch([ev("a", "sum", 1.0, T0 + 3)]))
    got = {(a.window_start, a.revision): a.value for a in out.aggregates}
    assert got[(T0, 3)] == 7.0 and got[(T0 - 15, 3)] == 7.0


def test_a_checkpoint_without_kept_panes_makes_the_emitted_windows_final() -> None:
    """A hop state of format 4 (no lateness then): late events for windows emitted
    before are dead-lettered, never a revision lacking what was emitted."""
    before = make(interval=20.0, hop=5.0)
    before.process(batch([ev("a", "sum", 1.0, T0 + 1), ev("a", "sum", 1.0, T0 + 30)]))
    [cp] = before.snapshot()
    assert orjson.loads(cp.state or b"{}")["format"] == HOP_STATE_FORMAT
    agg = make(interval=20.0, hop=5.0, allowed_lateness_s=30.0)
    agg.restore([cp])
    out = agg.process(batch([ev("a", "sum", 5.0, T0 + 2)]))  # pane T0: all windows out
    assert [d.reason for d in out.dead_letters] == ["late"] and out.aggregates == []
    # pane T0 + 20: its first window, T0 + 5, is final: late too (though T0 + 20 is open)
    out = agg.process(batch([ev("a", "sum", 5.0, T0 + 22)]))
    assert [d.reason for d in out.dead_letters] == ["late"] and out.aggregates == []
    assert agg.ledger()["imbalance"] == 0


def test_a_correction_merges_the_panes_of_every_partition() -> None:
    agg = make(interval=20.0, hop=5.0, allowed_lateness_s=30.0)
    for p in ("p0", "p1"):
        agg.process(batch([], p))
    agg.process(batch([ev("a", "sum", 1.0, T0 + 1)], "p0"))
    agg.process(batch([ev("a", "sum", 10.0, T0 + 2)], "p1"))
    agg.process(batch([ev("a", "sum", 0.0, T0 + 30)], "p0"))
    out = agg.process(batch([ev("a", "sum", 0.0, T0 + 30)], "p1")).aggregates
    assert {(a.window_start, a.revision): a.value for a in out if a.window_start == T0} == {
        (T0, 1): 11.0
    }
    out = agg.process(batch([ev("a", "sum", 5.0, T0 + 3)], "p0")).aggregates
    got = {(a.window_start, a.revision): a.value for a in out}
    assert got == {(T0 + s, 2): 16.0 for s in (-15.0, -10.0, -5.0, 0.0)}
    # p1 contributed: it holds the revision too, and its own correction follows it
    assert agg._parts["p1"].hop_revisions[(T0, ("a", "sum"))] == 2
    out = agg.process(batch([ev("a", "sum", 1.0, T0 + 4)], "p1")).aggregates
    got = {(a.window_start, a.revision): a.value for a in out}
    assert got == {(T0 + s, 3): 17.0 for s in (-15.0, -10.0, -5.0, 0.0)}
    assert agg.ledger()["imbalance"] == 0


def test_restored_with_lateness_0_kept_panes_are_freed() -> None:
    agg = make(interval=20.0, hop=5.0, allowed_lateness_s=30.0)
    agg.process(batch([ev("a", "sum", 1.0, T0 + 1), ev("a", "sum", 1.0, T0 + 30)]))
    agg.process(batch([ev("a", "sum", 5.0, T0 + 2)]))
    [cp] = agg.snapshot()
    again = make(interval=20.0, hop=5.0)
    again.restore([cp])
    p = again._parts["p0"]
    assert p.kept_panes is not None and not p.kept_panes.panes and not p.hop_revisions
    assert p.packed is not None and len(p.packed.table) == 0  # no key held for them
    out = again.process(batch([ev("a", "sum", 1.0, T0 + 3)]))
    assert [d.reason for d in out.dead_letters] == ["late"]
    assert again.ledger()["imbalance"] == 0


def test_a_late_tag_set_beyond_the_series_budget_goes_to_the_overflow_series() -> None:
    agg = make(
        interval=20.0,
        hop=5.0,
        allowed_lateness_s=30.0,
        group_by=("host",),
        max_series_per_name=1,
    )

    def tagged(host: str, value: float, ts: float) -> bytes:
        body = {"name": "a", "agg_func": "sum", "value": value, "timestamp": ts}
        return orjson.dumps({**body, "tags": {"host": host}})

    agg.process(batch([tagged("h1", 1.0, T0 + 1), tagged("h1", 1.0, T0 + 30)]))
    out = agg.process(batch([tagged("h2", 5.0, T0 + 2)]))  # pane T0 holds h1 already
    assert out.dead_letters == []
    hosts = {(a.window_start, a.revision): dict(a.tags or {}) for a in out.aggregates}
    assert hosts and all(h["host"] != "h2" for h in hosts.values())
    assert {a.value for a in out.aggregates} == {5.0}  # revision 1 of the overflow series
    assert agg.ledger()["series_overflow"] == 1 and agg.ledger()["imbalance"] == 0
    out = agg.process(batch([tagged("h1", 2.0, T0 + 3)]))
    assert {(a.window_start, a.revision, a.value) for a in out.aggregates} == {
        (T0 + s, 2, 3.0) for s in (-15.0, -10.0, -5.0, 0.0)
    }


def test_an_unusable_kept_pane_makes_its_windows_final() -> None:
    agg = make(interval=20.0, hop=5.0, allowed_lateness_s=30.0)
    agg.process(batch([ev("a", "sum", 1.0, T0 + 1), ev("a", "sum", 1.0, T0 + 30)]))
    [cp] = agg.snapshot()
    body: dict[str, Any] = orjson.loads(cp.state or b"{}")
    [entry] = body["kept_panes"]
    assert entry[0] == T0
    entry[3] = ["not", "a", "sum"]
    broken = PartitionCheckpoint(cp.partition, cp.position, orjson.dumps(body), cp.ledger)
    again = make(interval=20.0, hop=5.0, allowed_lateness_s=30.0)
    again.restore([broken])
    assert again.ledger()["imbalance"] == 0  # its events were emitted: none dropped
    out = again.process(batch([ev("a", "sum", 5.0, T0 + 2)]))
    assert [d.reason for d in out.dead_letters] == ["late"] and out.aggregates == []
    # pane T0 + 15's first window is T0 too: final; pane T0 + 20's (T0 + 5) is not
    out = again.process(batch([ev("a", "sum", 5.0, T0 + 17)]))
    assert [d.reason for d in out.dead_letters] == ["late"]
    out = again.process(batch([ev("a", "sum", 5.0, T0 + 22)]))
    assert out.dead_letters == []
    got = {(a.window_start, a.revision): a.value for a in out.aggregates}
    assert got == {(T0 + 5, 1): 5.0, (T0 + 10, 1): 5.0}  # no event of a there before
    assert again.ledger()["imbalance"] == 0
