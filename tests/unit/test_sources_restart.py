"""Two sources through the wired service on fakes: each source's partitions are
checkpointed under their own ids (the same local id in both never mixes), and a restart
continues each one from its own position, exactly."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson

from service.app import Service
from service.bus.multi import MultiBus
from service.checkpoints.file import FileCheckpointStore
from service.config import AggregationConfig, BusConfig, Config
from service.core.clock import ManualClock
from service.metrics.collector import MetricsCollector
from tests.fakes.bus import MemoryBus
from tests.fakes.running import run_until
from tests.fakes.sinks import MemorySink

START = 1_699_999_980.0  # a multiple of 60


def ev(name: str, value: float, ts: float) -> bytes:
    return orjson.dumps({"name": name, "value": value, "timestamp": ts, "agg_func": "sum"})


def build(
    first: list[Any], second: list[Any], state: Path, sink: MemorySink
) -> tuple[Service, MemoryBus, MemoryBus]:
    clock = ManualClock(START + 600)
    config = Config(aggregation=AggregationConfig(interval_s=60.0), more_sources=(BusConfig(),))
    one = MemoryBus({"p0": first}, batch_size=2, clock=clock)
    two = MemoryBus({"p0": second}, batch_size=2, clock=clock)
    bus = MultiBus([(one, "one"), (two, "two")], clock, queue_size=2, idle_timeout_s=60.0)
    service = Service(
        config,
        bus=bus,
        sinks=[sink],
        store=FileCheckpointStore(str(state), "test"),
        metrics=MetricsCollector(clock),
        clock=clock,
        serve_http=False,
    )
    return service, one, two


async def test_each_source_resumes_from_its_own_checkpoint_after_a_restart(
    tmp_path: Path,
) -> None:
    sink = MemorySink()
    a1 = [ev("a", 1, START + 1), ev("a", 2, START + 2), ev("a", 10, START + 61)]
    b1 = [ev("a", 100, START + 3), ev("b", 5, START + 4), ev("b", 7, START + 62)]
    service, one, two = build(a1, b1, tmp_path, sink)
    await run_until(
        service,
        lambda: len(sink.aggregates) == 2 and one.positions == {"p0": 3} == two.positions,
    )
    window1 = {k[0]: (a.value, a.count) for k, a in sink.aggregates.items()}
    assert window1 == {"a": (103.0, 3), "b": (5.0, 1)}  # both sources in one window
    store = FileCheckpointStore(str(tmp_path), "test")
    async with store:
        stored = await store.load(["p0", "s2/p0"])
    assert {p: c.position for p, c in stored.items()} == {"p0": "3", "s2/p0": "3"}
    assert one.commits[-1] == {"p0": "3"} and two.commits[-1] == {"p0": "3"}

    # each source replays what it had and adds more; the second window closes
    a2 = [*a1, ev("a", 20, START + 63), ev("a", 0, START + 125)]
    b2 = [*b1, ev("b", 30, START + 64), ev("b", 0, START + 126), ev("c", 1, START + 127)]
    service2, one2, two2 = build(a2, b2, tmp_path, sink)
    await run_until(service2, lambda: len(sink.aggregates) == 4)
    window2 = {k[0]: (a.value, a.count) for k, a in sink.aggregates.items() if k[2] == START + 60}
    assert window2 == {"a": (30.0, 2), "b": (37.0, 2)}  # nothing counted twice
    assert one2.positions == {"p0": 5} and two2.positions == {"p0": 6}
    sources = service2.status()["sources"]
    assert [s["source"] for s in sources] == [1, 2]
    assert [s["partitions"] for s in sources] == [1, 1]  # the placeholders are gone
