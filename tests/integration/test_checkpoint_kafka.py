"""KafkaCheckpointStore against the real broker: round trips, large states in chunks,
two instances of a group sharing the topic, a save interrupted between its chunks and
its head, and restore time with 100k open windows."""

from __future__ import annotations

import re
import socket
import time

import orjson
import pytest
from aiokafka import AIOKafkaProducer

from service.checkpoints.base import PartitionCheckpoint
from service.checkpoints.kafka import KafkaCheckpointStore, checkpoint_topic
from service.core.errors import TransientError

pytestmark = pytest.mark.integration


def store(bootstrap: str, topic: str, namespace: str = "ns", **kw: int) -> KafkaCheckpointStore:
    return KafkaCheckpointStore({"bootstrap_servers": bootstrap}, topic, namespace, **kw)


def cp(partition: str, position: str | None, state: bytes | None) -> PartitionCheckpoint:
    return PartitionCheckpoint(partition, position, state)


async def test_saved_checkpoints_load_back_in_a_new_store(
    kafka_bootstrap: str, unique_name: str
) -> None:
    topic = checkpoint_topic(unique_name)
    async with store(kafka_bootstrap, topic) as first:
        assert await first.load(["t:0"]) == {}
        await first.save([cp("t:0", "10", b"state-0"), cp("t:1", "7", None)])
        await first.save([cp("t:0", "12", b"state-0b")])
        assert await first.load(["t:0", "t:1", "t:2"]) == {
            "t:0": cp("t:0", "12", b"state-0b"),
            "t:1": cp("t:1", "7", None),
        }
    async with store(kafka_bootstrap, topic) as second:  # another process, from scratch
        assert await second.load(["t:0", "t:1"]) == {
            "t:0": cp("t:0", "12", b"state-0b"),
            "t:1": cp("t:1", "7", None),
        }


async def test_a_state_larger_than_a_message_is_split_and_joined(
    kafka_bootstrap: str, unique_name: str
) -> None:
    topic = checkpoint_topic(unique_name)
    big = bytes(range(256)) * 12_000  # ~3 MB: several chunks of 1 MiB or less
    async with store(kafka_bootstrap, topic, chunk_bytes=1 << 20) as s:
        await s.save([cp("t:0", "1", big)])
        await s.save([cp("t:0", "2", big[:1000])])  # fewer chunks than before
    async with store(kafka_bootstrap, topic, chunk_bytes=1 << 20) as s:
        assert await s.load(["t:0"]) == {"t:0": cp("t:0", "2", big[:1000])}
        await s.save([cp("t:0", "3", big)])
    async with store(kafka_bootstrap, topic) as s:
        assert await s.load(["t:0"]) == {"t:0": cp("t:0", "3", big)}


async def test_instances_of_a_group_see_each_others_checkpoints(
    kafka_bootstrap: str, unique_name: str
) -> None:
    """A partition moves: its new owner loads what the old one saved last."""
    topic = checkpoint_topic(unique_name)
    async with store(kafka_bootstrap, topic) as a, store(kafka_bootstrap, topic) as b:
        await a.save([cp("t:0", "5", b"a-state")])
        assert await b.load(["t:0"]) == {"t:0": cp("t:0", "5", b"a-state")}
        await b.save([cp("t:0", "9", b"b-state")])
        assert await a.load(["t:0"]) == {"t:0": cp("t:0", "9", b"b-state")}


async def test_namespaces_do_not_see_each_other(kafka_bootstrap: str, unique_name: str) -> None:
    topic = checkpoint_topic(unique_name)
    async with (
        store(kafka_bootstrap, topic, "one") as one,
        store(kafka_bootstrap, topic, "two") as two,
    ):
        await one.save([cp("t:0", "1", b"x")])
        assert await two.load(["t:0"]) == {}


async def test_a_save_cut_between_its_chunks_and_its_head_leaves_the_previous_checkpoint(
    kafka_bootstrap: str, unique_name: str
) -> None:
    topic = checkpoint_topic(unique_name)
    async with store(kafka_bootstrap, topic, chunk_bytes=4) as s:
        await s.save([cp("t:0", "1", b"previous-state")])
    # a crashed save: chunks of a newer epoch in the other slot, no head
    producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap)
    await producer.start()
    try:
        for i in range(3):
            key = orjson.dumps(["ns", "t:0", "chunk", 1, i])
            await producer.send_and_wait(topic, (2**62).to_bytes(8, "big") + b"newx", key=key)
    finally:
        await producer.stop()
    async with store(kafka_bootstrap, topic, chunk_bytes=4) as s:
        assert await s.load(["t:0"]) == {"t:0": cp("t:0", "1", b"previous-state")}


async def test_restore_of_100k_open_windows_is_fast(kafka_bootstrap: str, unique_name: str) -> None:
    """Prints the figure of docs/delivery.md#checkpoints; asserts only that it came back whole."""
    topic = checkpoint_topic(unique_name)
    windows = [[1_700_000_000.0, f"name-{i}", "sum", [3, 1.5, 0.0]] for i in range(100_000)]
    state = orjson.dumps({"format": 1, "max_ts": 1.0, "closed_until": None, "windows": windows})
    async with store(kafka_bootstrap, topic) as s:
        await s.save([cp(f"t:{p}", "1", state[p:]) for p in range(4)])
    started = time.perf_counter()
    async with store(kafka_bootstrap, topic) as s:
        loaded = await s.load([f"t:{p}" for p in range(4)])
    took = time.perf_counter() - started
    assert [len(loaded[f"t:{p}"].state or b"") for p in range(4)] == [
        len(state) - p for p in range(4)
    ]
    print(f"\n[kafka checkpoints] {4 * len(state) / 1e6:.1f} MB of state restored in {took:.2f} s")


async def test_an_unreachable_broker_is_transient_and_names_the_servers(unique_name: str) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"127.0.0.1:{s.getsockname()[1]}"
    with pytest.raises(TransientError, match=rf"Kafka at {re.escape(dead)} unavailable"):
        await store(dead, checkpoint_topic(unique_name)).start()
