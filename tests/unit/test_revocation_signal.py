"""The checkpoint of revoked partitions is given up only by an explicit signal.

A bus that stops waiting for it calls ``abandon()`` on the revocation's
:class:`Confirmation`, the stage hands that same object on with the checkpoint, and the
sender skips a checkpoint so abandoned. Waiting alone (a cancelled or timed-out waiter)
never decides it: the checkpoint is then saved as usual.
"""

from __future__ import annotations

import asyncio

from aiokafka import TopicPartition

from service.aggregation.aggregator import EventAggregator
from service.aggregation.stage import AggregatorStage
from service.bus.base import BusItem, PartitionsAssigned, PartitionsRevoked
from service.bus.kafka import KafkaBus
from service.bus.kafka_partitions import LivePartition
from service.checkpoints.base import PartitionCheckpoint
from service.config import AggregationConfig, BusConfig, KafkaConfig
from service.core.clock import ManualClock
from service.core.confirmation import Confirmation
from service.metrics.collector import MetricsCollector
from service.pipeline.flow import Checkpoint, Outputs, ReadBack
from service.pipeline.hub import Delivery
from tests.unit.test_sender import make


def kafka_bus(revoke_timeout_s: float) -> KafkaBus:
    clock = ManualClock()
    config = BusConfig(
        url="kafka://k:9092/t", kind="kafka", kafka_topic="t", kafka_bootstrap_servers=("k:9092",)
    )
    bus = KafkaBus(
        config, KafkaConfig(), MetricsCollector(clock), clock, revoke_timeout_s=revoke_timeout_s
    )
    bus._live[TopicPartition("t", 0)] = LivePartition("t:0", 5)
    return bus


class Unconfirmed:
    """An ``emit`` whose downstream never makes anything durable (an output is down)."""

    def __init__(self) -> None:
        self.revoked: list[PartitionsRevoked] = []

    async def __call__(self, item: BusItem) -> None:
        if type(item) is PartitionsRevoked:
            self.revoked.append(item)


async def test_the_kafka_bus_abandons_a_revocation_not_confirmed_within_its_timeout() -> None:
    bus = kafka_bus(revoke_timeout_s=0.01)
    emit = Unconfirmed()
    await bus._on_revoked({TopicPartition("t", 0)}, emit)
    [item] = emit.revoked
    assert item.partitions == ["t:0"] and item.done.abandoned


async def test_the_kafka_bus_abandons_a_revocation_whose_wait_a_stop_ends() -> None:
    bus = kafka_bus(revoke_timeout_s=3600)
    emit = Unconfirmed()
    guarded = asyncio.create_task(bus._guard(bus._on_revoked({TopicPartition("t", 0)}, emit)))
    async with asyncio.timeout(5):
        while not emit.revoked:
            await asyncio.sleep(0)
    assert not emit.revoked[0].done.abandoned
    await bus.stop()  # its callbacks give up waiting
    await asyncio.wait_for(guarded, 5)
    assert emit.revoked[0].done.abandoned


async def test_a_confirmed_revocation_is_not_abandoned() -> None:
    bus = kafka_bus(revoke_timeout_s=5)

    async def confirming(item: BusItem) -> None:
        if type(item) is PartitionsRevoked:
            item.done.confirm()
            revoked.append(item)

    revoked: list[PartitionsRevoked] = []
    await bus._on_revoked({TopicPartition("t", 0)}, confirming)
    assert revoked[0].done.confirmed and not revoked[0].done.abandoned


async def test_a_cancelled_waiter_does_not_give_the_checkpoint_up() -> None:
    """The old handshake: cancelling the waiter cancelled the future the sender read."""
    done = Confirmation()
    waiter = asyncio.create_task(done.wait())
    await asyncio.sleep(0)
    waiter.cancel()
    await asyncio.gather(waiter, return_exceptions=True)
    with_timeout = asyncio.create_task(asyncio.wait_for(done.wait(), 0.001))
    await asyncio.gather(with_timeout, return_exceptions=True)
    assert not done.abandoned and not done.settled

    sender, _, store, commits, _ = await make()
    cp = PartitionCheckpoint("p0", "3", None)
    await sender.handle(Delivery([Checkpoint([cp], done)]))
    assert store.saved == [[cp]] and commits == [{"p0": "3"}] and done.confirmed


async def test_the_revocation_signal_travels_from_the_bus_through_the_stage_to_the_sender() -> None:
    clock = ManualClock()
    published: list[Outputs | Checkpoint | ReadBack] = []

    async def publish(item: Outputs | Checkpoint | ReadBack) -> None:
        published.append(item)

    agg = EventAggregator(AggregationConfig(), MetricsCollector(clock), clock)
    stage = AggregatorStage(agg, publish, clock, checkpoint_interval_s=60)
    assigned = PartitionsAssigned([PartitionCheckpoint("p0", "1", None, outputs={})])
    kept, given_up = PartitionsRevoked(["p0"]), PartitionsRevoked(["p0"])
    given_up.done.abandon()  # as the bus does when it stops waiting
    await stage.handle(Delivery([assigned, kept, assigned, given_up]))
    checkpoints = [i for i in published if type(i) is Checkpoint]
    assert [c.done for c in checkpoints] == [kept.done, given_up.done]

    sender, _, store, commits, _ = await make()
    await sender.handle(Delivery(list(checkpoints)))
    assert [[c.partition for c in saved] for saved in store.saved] == [["p0"]]
    assert commits == [{"p0": "1"}]
    assert kept.done.confirmed and not given_up.done.settled
