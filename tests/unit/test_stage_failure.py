"""A stage that raises in the middle of a delivery resumes from a consistent state.

The failure is injected into the aggregator's function table (used only by these tests):
an exception on the k-th ``count`` event of the run, once, or on every replay of one
poison event. The outputs must equal an independent computation from the input: no
event applied twice, none lost, and the stage keeps emitting afterwards.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from service.aggregation import batch_run
from service.aggregation.functions import Acc
from service.aggregation.partition import PartitionState
from service.app import Service
from service.checkpoints.file import FileCheckpointStore
from service.config import AggregationConfig, Config
from service.core.clock import ManualClock, SystemClock
from service.dev.emulator import Emulator
from service.metrics.collector import MetricsCollector
from tests.fakes.bus import MemoryBus
from tests.fakes.sinks import MemorySink
from tests.unit.test_http_bus import http_bus

START = 1_699_999_980.0  # a multiple of 60
INTERVAL = 60.0
POISON = 13.0

Expected = dict[tuple[str, str, float], tuple[int, float]]


def event(name: str, func: str, value: float, ts: float) -> dict[str, Any]:
    return {"name": name, "value": value, "timestamp": ts, "agg_func": func}


def stream(partition: int, n: int, t0: float = START) -> list[dict[str, Any]]:
    """``n`` events over a few windows, ``count`` and ``sum``, several names."""
    return [
        event(
            f"n{partition}-{i % 3}",
            "count" if i % 2 else "sum",
            float(i % 7),
            t0 + i * 180.0 / n,
        )
        for i in range(n)
    ]


def expected_of(events: list[dict[str, Any]]) -> Expected:
    """Every window's count and value, computed independently of the service."""
    counts: dict[tuple[str, str, float], int] = defaultdict(int)
    sums: dict[tuple[str, str, float], float] = defaultdict(float)
    for e in events:
        key = (e["name"], e["agg_func"], (e["timestamp"] // INTERVAL) * INTERVAL)
        counts[key] += 1
        sums[key] += e["value"]
    return {k: (n, float(n) if k[1] == "count" else sums[k]) for k, n in counts.items()}


def closer(partition: int, ts: float) -> bytes:
    """An event far ahead, so that the windows before it close (the memory bus sends
    no idleness reports, so only event time closes windows here)."""
    return orjson.dumps(event(f"closer{partition}", "sum", 0.0, ts))


def with_closers(events: dict[str, list[dict[str, Any]]], ts: float) -> dict[str, list[bytes]]:
    return {
        p: [*(orjson.dumps(e) for e in evs), closer(i, ts)]
        for i, (p, evs) in enumerate(events.items())
    }


def written(sink: MemorySink) -> Expected:
    return {(k[0], k[1], k[2]): (a.count, a.value) for k, a in sink.aggregates.items()}


def build(
    records: dict[str, list[Any]], state: Path, sink: MemorySink
) -> tuple[Service, MemoryBus]:
    # the clock is past every event time here: the closers far ahead of the windows
    # must not be ahead of the clock (AGGREGATION_MAX_WATERMARK_LEAD), or they close nothing
    clock = ManualClock(START + 1100)
    config = Config(aggregation=AggregationConfig(interval_s=INTERVAL))
    bus = MemoryBus(records, batch_size=10, clock=clock)
    service = Service(
        config,
        bus=bus,
        sinks=[sink],
        store=FileCheckpointStore(str(state), "test"),
        metrics=MetricsCollector(clock),
        clock=clock,
        serve_http=False,
    )
    return service, bus


async def run_until(service: Service, cond: Callable[[], bool], *, stop: bool = True) -> None:
    """Run until ``cond``; the manual clock moves on meanwhile (ticks, checkpoints)."""
    clock = service.clock
    assert isinstance(clock, ManualClock)
    async with asyncio.timeout(15):
        while not cond():
            await asyncio.sleep(0.005)
            clock.advance(0.25)
    if stop:
        service.request_stop()


@pytest.fixture
def failing_count(
    monkeypatch: pytest.MonkeyPatch,
) -> Iterator[Callable[[Callable[[float], bool]], list[float]]]:
    """Wraps the ``count`` add of the aggregator's table: raises when ``fails(value)``
    says so; returns the values it raised on."""

    def install(fails: Callable[[float], bool]) -> list[float]:
        raised: list[float] = []
        add = batch_run._ADD["count"]

        def add_or_raise(acc: Acc, value: float, ts: float) -> None:
            if fails(value):
                raised.append(value)
                raise RuntimeError(f"injected failure on {value}")
            add(acc, value, ts)

        monkeypatch.setitem(batch_run._ADD, "count", add_or_raise)
        return raised

    yield install


async def keeps_emitting(
    service: Service, bus: MemoryBus, sink: MemorySink, task: asyncio.Task[None]
) -> None:
    """New events after the failure come out too: the stage is alive."""
    more = [orjson.dumps(event("after", "count", 1.0, START + 700 + i)) for i in range(5)]
    bus.add("p0", [*more, closer(0, START + 1000)])
    bus.add("p1", [closer(1, START + 1000)])
    await run_until(service, lambda: ("after", "count", START + 660) in written(sink))
    await asyncio.wait_for(task, 10)
    assert written(sink)[("after", "count", START + 660)] == (5, 5.0)
    assert written(sink)[("closer0", "sum", START + 600)] == (1, 0.0)


async def test_failure_in_the_middle_of_a_delivery_applies_nothing_twice(
    tmp_path: Path, failing_count: Callable[[Callable[[float], bool]], list[float]]
) -> None:
    calls = 0

    def once_at_the_37th(value: float) -> bool:
        nonlocal calls
        calls += 1
        return calls == 37

    raised = failing_count(once_at_the_37th)
    events = {"p0": stream(0, 120), "p1": stream(1, 90)}
    sink = MemorySink()
    service, bus = build(with_closers(events, START + 600), tmp_path, sink)
    expected = expected_of(events["p0"] + events["p1"])
    task = asyncio.create_task(service.run())
    await run_until(service, lambda: len(sink.aggregates) >= len(expected), stop=False)
    assert len(raised) == 1  # the failure did happen, once
    assert {k: v for k, v in written(sink).items() if not k[0].startswith("closer")} == expected
    # every write of a window carried the same values: nothing emitted half-applied
    for aggregates, _ in sink.writes:
        for a in aggregates:
            key = (a.name, a.agg_func, a.window_start)
            assert (a.count, a.value) == expected.get(key, (a.count, a.value))
    assert sink.dead_letters == []
    assert bus.rewinds == [["p0", "p1"]]  # delivered again from their checkpoints, once
    assert service.metrics.stage_rewinds == 1

    await keeps_emitting(service, bus, sink, task)


async def test_an_event_that_raises_on_every_replay_is_dead_lettered_and_the_rest_is_exact(
    tmp_path: Path, failing_count: Callable[[Callable[[float], bool]], list[float]]
) -> None:
    raised = failing_count(lambda value: value == POISON)
    events = {"p0": stream(0, 120), "p1": stream(1, 90)}
    poison = event("n0-1", "count", POISON, START + 95.0)
    records = with_closers(events, START + 600)
    records["p0"].insert(57, orjson.dumps(poison))
    sink = MemorySink()
    service, bus = build(records, tmp_path, sink)
    expected = expected_of(events["p0"] + events["p1"])
    task = asyncio.create_task(service.run())
    await run_until(
        service,
        lambda: len(sink.aggregates) >= len(expected) and len(sink.dead_letters) >= 1,
        stop=False,
    )
    assert len(raised) == 2  # it raised again on a replay, then it was set aside
    assert bus.rewinds == [["p0", "p1"], ["p0", "p1"]]
    assert {k: v for k, v in written(sink).items() if not k[0].startswith("closer")} == expected
    for aggregates, _ in sink.writes:
        for a in aggregates:
            key = (a.name, a.agg_func, a.window_start)
            assert (a.count, a.value) == expected.get(key, (a.count, a.value))
    [dead] = sink.dead_letters
    assert dead.reason == "internal_error"
    assert orjson.loads(dead.raw) == poison
    assert "RuntimeError" in dead.detail and "injected failure" in dead.detail
    assert "offset=57" in dead.source

    await keeps_emitting(service, bus, sink, task)
    ledger = service.aggregator.ledger()
    assert ledger["imbalance"] == 0
    assert ledger["rejected:internal_error"] == 1


async def test_a_failure_while_closing_windows_blames_no_record_and_loses_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Windows are taken out of the partitions one by one while closing: a failure in
    # the middle leaves some taken and some not (a result that raises is no such
    # failure: that window is dropped as unusable, docs/aggregation.md).
    results = 0
    on_emitted = PartitionState.on_emitted

    def on_emitted_or_raise(self: PartitionState, keyed: dict[Any, Acc]) -> None:
        nonlocal results
        results += 1
        if results == 3:
            raise RuntimeError("injected failure while closing")
        on_emitted(self, keyed)

    monkeypatch.setattr(PartitionState, "on_emitted", on_emitted_or_raise)
    events = {"p0": stream(0, 120), "p1": stream(1, 90)}
    sink = MemorySink()
    service, bus = build(with_closers(events, START + 600), tmp_path, sink)
    expected = expected_of(events["p0"] + events["p1"])
    task = asyncio.create_task(service.run())
    await run_until(service, lambda: len(sink.aggregates) >= len(expected), stop=False)
    assert results > 3
    assert {k: v for k, v in written(sink).items() if not k[0].startswith("closer")} == expected
    assert sink.dead_letters == []
    assert bus.rewinds == [["p0", "p1"]]
    await keeps_emitting(service, bus, sink, task)


async def test_on_the_http_bus_the_replay_starts_again_from_the_stored_cursor(
    tmp_path: Path, failing_count: Callable[[Callable[[float], bool]], list[float]]
) -> None:
    seen: list[float] = []

    def once_and_poison(value: float) -> bool:  # 5.0 raises once, the poison every time
        seen.append(value)
        return value == POISON or (value == 5.0 and seen.count(5.0) == 3)

    raised = failing_count(once_and_poison)
    events = stream(0, 150)
    poison = event("n0-1", "count", POISON, START + 100.1)
    records = [
        *map(orjson.dumps, events[:80]),
        orjson.dumps(poison),
        *map(orjson.dumps, events[80:]),
    ]
    expected = expected_of(events)
    sink = MemorySink()
    async with Emulator() as emulator:
        emulator.append([*records, closer(0, START + 600)])
        clock = SystemClock()
        service = Service(
            Config(aggregation=AggregationConfig(interval_s=INTERVAL)),
            bus=http_bus(emulator.url, http_batch_limit=10),
            sinks=[sink],
            store=FileCheckpointStore(str(tmp_path), "test"),
            metrics=MetricsCollector(clock),
            clock=clock,
            serve_http=False,
        )
        task = asyncio.create_task(service.run())
        try:
            async with asyncio.timeout(30):
                while len(sink.aggregates) < len(expected) or not sink.dead_letters:
                    assert not task.done()
                    await asyncio.sleep(0.01)
                emulator.append(
                    [
                        orjson.dumps(event("after", "count", 1.0, START + 700)),
                        closer(0, START + 1000),
                    ]
                )
                while ("after", "count", START + 660) not in written(sink):
                    await asyncio.sleep(0.01)
        finally:
            service.request_stop()
            await asyncio.wait_for(task, 10)
    assert sorted(raised) == [5.0, POISON, POISON]
    assert {
        k: v for k, v in written(sink).items() if not k[0].startswith(("closer", "after"))
    } == expected
    assert [(d.reason, orjson.loads(d.raw)) for d in sink.dead_letters] == [
        ("internal_error", poison)
    ]
    assert service.metrics.stage_rewinds == 3
