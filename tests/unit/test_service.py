"""The wired service on fakes: graceful stop keeps windows, a restart resumes exactly."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import orjson

from service.app import Service
from service.checkpoints.file import FileCheckpointStore
from service.config import AggregationConfig, Config
from service.core.clock import ManualClock
from service.metrics.collector import MetricsCollector
from service.pipeline.flow import INPUT, CheckpointRequest
from tests.fakes.bus import MemoryBus
from tests.fakes.running import run_until
from tests.fakes.sinks import MemorySink

START = 1_699_999_980.0  # a multiple of 60


def ev(name: str, value: float, ts: float) -> bytes:
    return orjson.dumps({"name": name, "value": value, "timestamp": ts, "agg_func": "sum"})


def build(
    records: dict[str, list[Any]], state: Path, sink: MemorySink
) -> tuple[Service, MemoryBus]:
    clock = ManualClock(START + 600)
    config = Config(aggregation=AggregationConfig(interval_s=60.0))
    bus = MemoryBus(records, batch_size=3, clock=clock)
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


async def test_restart_after_graceful_stop_continues_open_windows_exactly(tmp_path: Path) -> None:
    sink = MemorySink()
    first = [
        ev("a", 1, START + 1),
        ev("a", 2, START + 2),
        ev("b", 5, START + 3),
        ev("a", 10, START + 61),
        ev("b", 20, START + 62),
    ]
    service, bus = build({"p0": first}, tmp_path, sink)
    await run_until(service, lambda: len(sink.aggregates) == 2 and bus.positions.get("p0") == 5)
    assert {k[:2]: a.value for k, a in sink.aggregates.items()} == {
        ("a", "sum"): 3.0,
        ("b", "sum"): 5.0,
    }
    assert bus.commits[-1] == {"p0": "5"}  # committed at the final checkpoint
    sender = service.status()["subscribers"]["sender"]
    assert set(sender) == {"processed", "errors", "dropped", "depth"}
    assert sender["processed"] > 0 and sender["errors"] == 0

    # same records again (a replaying source) plus new ones that close the second window
    second = [*first, ev("a", 100, START + 63), ev("a", 0, START + 125)]
    service2, bus2 = build({"p0": second}, tmp_path, sink)
    await run_until(service2, lambda: len(sink.aggregates) == 4)
    window2 = {k[0]: a for k, a in sink.aggregates.items() if k[2] == START + 60}
    assert (window2["a"].value, window2["a"].count) == (110.0, 2)  # 10 + 100, not 10 counted twice
    assert (window2["b"].value, window2["b"].count) == (20.0, 1)
    assert bus2.positions["p0"] == 7


async def test_sink_outage_holds_the_commit_until_outputs_are_durable(tmp_path: Path) -> None:
    sink = MemorySink()
    records = [ev("a", 1, START + 1), ev("a", 1, START + 61)]
    service, bus = build({"p0": records}, tmp_path, sink)
    await sink.start()
    sink.pause()  # writes hang, as with an output that is down
    task = asyncio.create_task(service.run())
    async with asyncio.timeout(10):
        while bus.positions.get("p0") != 2:
            await asyncio.sleep(0.01)
    handled = service.hub.stats()["aggregator"].processed
    request = CheckpointRequest()
    await service.hub.publish(INPUT, request)
    async with asyncio.timeout(10):  # the aggregator has passed the checkpoint on
        while service.hub.stats()["aggregator"].processed <= handled:
            await asyncio.sleep(0.01)
    await sink.wait_until(lambda s: s.writes_started >= 1)  # and the held write began
    assert not request.done.settled
    assert bus.commits == []  # nothing committed while the output holds the aggregate
    sink.resume()
    await asyncio.wait_for(request.done.wait(), 5)
    assert len(sink.aggregates) == 1
    assert bus.commits == [{"p0": "2"}]
    service.request_stop()
    await asyncio.wait_for(task, 10)
