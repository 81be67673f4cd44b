"""A snapshot changes nothing; what it covered is dropped only once it is durable.

The ledger keeps the counts per interval of receipt until a checkpoint has written the
final ones (all but the newest two). A checkpoint can be given up before it is durable
(a revocation or a shutdown past its deadline), so taking one must not drop them.
"""

from __future__ import annotations

from typing import Any

import orjson

from service.aggregation.aggregator import EventAggregator
from service.aggregation.partition import PartitionState
from service.aggregation.stage import AggregatorStage
from service.bus.base import PartitionsAssigned, SourceBatch
from service.checkpoints.base import PartitionCheckpoint
from service.config import AggregationConfig
from service.core.clock import ManualClock
from service.metrics.collector import MetricsCollector
from service.pipeline.flow import Checkpoint, CheckpointRequest, Outputs, ReadBack, Tick
from service.pipeline.hub import Delivery

NOW = 1_700_000_000.0


def four_intervals() -> PartitionState:
    p = PartitionState(position="4")
    for start in (0.0, 60.0, 120.0, 180.0):
        p.count(start, 2, 1, {"late": 1})
    return p


def intervals(cp: PartitionCheckpoint) -> dict[str, Any]:
    assert cp.ledger is not None
    return dict(cp.ledger["intervals"])


def test_a_snapshot_given_up_then_another_taken_covers_the_same_intervals() -> None:
    p = four_intervals()
    given_up = p.snapshot("p0")
    again = p.snapshot("p0")
    assert list(intervals(again)) == ["0.0", "60.0", "120.0", "180.0"]
    assert intervals(again) == intervals(given_up) and again.state == given_up.state


def test_a_durable_snapshot_drops_the_final_intervals_it_wrote() -> None:
    p = four_intervals()
    p.on_durable(p.snapshot("p0").ledger or {})
    assert sorted(p.intervals) == [120.0, 180.0]
    assert list(intervals(p.snapshot("p0"))) == ["120.0", "180.0"]


def test_an_interval_counted_again_after_the_snapshot_is_kept_for_the_next() -> None:
    p = four_intervals()
    cp = p.snapshot("p0")
    p.count(0.0, 1, 1, {})  # not a case the service has, but nothing may be lost if it were
    p.on_durable(cp.ledger or {})
    assert sorted(p.intervals) == [0.0, 120.0, 180.0]


async def test_through_the_stage_only_a_confirmed_checkpoint_drops_what_it_covered() -> None:
    clock = ManualClock(NOW + 3600)
    published: list[Outputs | Checkpoint | ReadBack] = []

    async def publish(item: Outputs | Checkpoint | ReadBack) -> None:
        published.append(item)

    agg = EventAggregator(AggregationConfig(interval_s=60.0), MetricsCollector(clock), clock)
    stage = AggregatorStage(agg, publish, clock, checkpoint_interval_s=3600)
    event = orjson.dumps({"name": "a", "value": 1.0, "timestamp": NOW})
    batches = [SourceBatch("p0", [event], "test", str(i), NOW + 60 * i) for i in range(4)]
    given_up, durable, after = CheckpointRequest(), CheckpointRequest(), CheckpointRequest()
    assigned = PartitionsAssigned([PartitionCheckpoint("p0", None, None, outputs={})])
    await stage.handle(Delivery([assigned, *batches, given_up]))
    given_up.done.abandon()  # the shutdown's deadline passed before the sender got to it
    await stage.handle(Delivery([Tick(), durable]))
    durable.done.confirm()  # the sender saved it
    await stage.handle(Delivery([Tick(), after]))

    def covered(request: CheckpointRequest) -> list[str]:
        [cp] = next(
            i for i in published if type(i) is Checkpoint and i.done is request.done
        ).checkpoints
        return sorted(intervals(cp), key=float)

    starts = covered(given_up)
    assert len(starts) == 4
    assert covered(durable) == starts, "the snapshot given up dropped intervals"
    assert covered(after) == starts[-2:]
