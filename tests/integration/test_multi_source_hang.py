"""On the real broker: one HTTP source that stops answering and one Kafka source that
flows, in one service (contract §12.8, issue 19).

The HTTP source is an aiohttp server of this test on 127.0.0.1 that, once told to
hang, holds every request without answering. The Kafka source's windows must still
close on time: the hung source's partition stops holding the watermark by the idleness
rule (§11: no message of any kind for the idle timeout), so they come out within the
quiet bound (idle timeout + 10 s) of the hang. When the HTTP source answers again its
events flow too, and every aggregate of both sources equals an independent computation,
written once.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import Counter, defaultdict
from collections.abc import AsyncIterator
from datetime import datetime
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiokafka import AIOKafkaConsumer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from service.app import build_service
from service.bus.multi import MultiBus
from service.config.loader import load_config
from tests.e2e.kafka_pg import produce
from tests.e2e.workload import free_port
from tests.hanging_vabus import HangingVabus, serve_hanging_vabus

pytestmark = pytest.mark.integration

INTERVAL = 5.0
IDLE_S = 2.0  # AGGREGATION_IDLE_TIMEOUT
QUIET_BOUND_S = IDLE_S + 10.0  # §11: a silent partition stops holding within this

Key = tuple[str, str, float]
Event = dict[str, Any]


@pytest.fixture
async def vabus() -> AsyncIterator[tuple[HangingVabus, str]]:
    async with serve_hanging_vabus() as served:
        yield served


def events_of(name: str, start: float, end: float, n: int) -> list[Event]:
    step = (end - start) / n
    return [
        {"name": name, "agg_func": func, "value": float(i % 7), "timestamp": start + i * step}
        for i in range(n)
        for func in ("sum", "count")
    ]


def expected_of(events: list[Event]) -> dict[Key, tuple[int, float]]:
    counts: dict[Key, int] = defaultdict(int)
    sums: dict[Key, float] = defaultdict(float)
    for e in events:
        key = (e["name"], e["agg_func"], math.floor(e["timestamp"] / INTERVAL) * INTERVAL)
        counts[key] += 1
        sums[key] += e["value"]
    return {k: (n, float(n) if k[1] == "count" else sums[k]) for k, n in counts.items()}


def key_of(value: dict[str, Any]) -> Key:
    start = datetime.fromisoformat(value["window_start"]).timestamp()
    return (value["name"], value["agg_func"], start)


class Output:
    """The aggregates topic, read as it fills."""

    def __init__(self, bootstrap: str, topic: str) -> None:
        self._consumer = AIOKafkaConsumer(
            topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest", group_id=None
        )
        self.values: list[dict[str, Any]] = []
        self.seen_at: dict[Key, float] = {}

    async def __aenter__(self) -> Output:
        await self._consumer.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._consumer.stop()

    async def until(self, keys: set[Key], timeout_s: float) -> None:
        try:
            async with asyncio.timeout(timeout_s):
                while not keys <= set(self.seen_at):
                    for msgs in (await self._consumer.getmany(timeout_ms=200)).values():
                        for m in msgs:
                            value = orjson.loads(m.value)
                            self.values.append(value)
                            self.seen_at.setdefault(key_of(value), time.monotonic())
        except TimeoutError:
            missing = sorted(keys - set(self.seen_at))
            raise AssertionError(
                f"{len(missing)} windows not written, e.g. {missing[:3]}"
            ) from None


async def test_a_hung_http_source_delays_no_window_of_the_kafka_source(
    kafka_bootstrap: str,
    unique_name: str,
    tmp_path: Path,
    vabus: tuple[HangingVabus, str],
) -> None:
    server, http_url = vabus
    source, topic = f"in-{unique_name}", f"out-{unique_name}"
    admin = AIOKafkaAdminClient(bootstrap_servers=kafka_bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(source, 2, 1), NewTopic(topic, 1, 1)])
    finally:
        await admin.close()

    base = math.floor(time.time() / INTERVAL) * INTERVAL - 20 * INTERVAL
    w = [base + i * INTERVAL for i in range(12)]  # window starts
    http_before = events_of("http.a", w[0], w[1], 20)
    kafka_before = events_of("kafka.a", w[0], w[2], 40)
    http_last = events_of("http.a", w[1], w[1] + 4, 20)  # then it hangs
    kafka_while_hung = events_of("kafka.a", w[2], w[4], 40)
    http_after = events_of("http.a", w[5], w[6], 20)
    kafka_after = events_of("kafka.a", w[4], w[7], 60)

    server.add(http_before)
    await produce(kafka_bootstrap, source, kafka_before)
    config = load_config(
        {
            "VABUS_URL": f"kafka://{kafka_bootstrap}/{source}?group=g-{unique_name}"
            f"&metrics_topic=m-{unique_name}  {http_url}",
            "VABUS_WAIT": "1",
            "VABUS_TIMEOUT": "120",  # the hang outlasts no request: nothing times out
            "STORAGE_TYPE": "kafka",
            "KAFKA_BOOTSTRAP_SERVERS": kafka_bootstrap,
            "KAFKA_TOPIC": topic,
            "AGGREGATION_INTERVAL": str(INTERVAL),
            "AGGREGATION_IDLE_TIMEOUT": str(IDLE_S),
            "HTTP_HOST": "127.0.0.1",
            "HTTP_PORT": str(free_port()),
            "STATE_DIR": str(tmp_path / "state"),
        },
        dotenv=None,
    )
    service = build_service(config)
    assert isinstance(service.bus, MultiBus)
    task = asyncio.create_task(service.run())
    try:
        async with Output(kafka_bootstrap, topic) as out:
            # w[0] closes once the HTTP source, answering empty long polls, is idle
            await out.until({("kafka.a", "sum", w[0]), ("http.a", "sum", w[0])}, 60)
            assert server.handed == len(http_before)
            # it hands out its last events, then hangs while its partition still holds
            # the watermark (at w[1] + 4): only the idleness rule can release it
            server.hang_at = len(http_before) + len(http_last)
            server.add(http_last)
            async with asyncio.timeout(30):
                await server.hanging.wait()
            await produce(kafka_bootstrap, source, kafka_while_hung)
            expected_now = expected_of(kafka_before + kafka_while_hung + http_before + http_last)
            closed = {k for k in expected_now if k[2] < w[3]}
            await out.until(closed, QUIET_BOUND_S + 20)
            assert server.hung and server.answered_while_hung == 0
            assert server.hung_since is not None
            since = {k: out.seen_at[k] - server.hung_since for k in closed}
            during = {k: t for k, t in since.items() if t > 0}
            slowest = max(during.values())
            print(
                f"windows written while the HTTP source hung: {len(during)}; slowest {slowest:.1f}s"
            )
            assert ("kafka.a", "sum", w[2]) in during and ("http.a", "sum", w[1]) in during
            assert slowest <= QUIET_BOUND_S, during
            status = service.status()
            http = next(s for s in status["sources"] if s["transport"] == "http")
            assert (
                http["source"] == 2 and status["partitions"]["s2/http"]["holds_watermark"] is False
            )
            assert status["sources"][0]["events"] >= len(kafka_before + kafka_while_hung)

            server.release()
            server.add(http_after)
            await produce(kafka_bootstrap, source, kafka_after)
            everything = [*http_before, *http_last, *http_after]
            everything += kafka_before + kafka_while_hung + kafka_after
            expected = expected_of(everything)
            # every partition then falls silent: the quiet rule writes the rest
            await out.until(set(expected), 60)
    finally:
        service.request_stop()
        await asyncio.wait_for(task, 30)

    written = Counter(key_of(v) for v in out.values)
    assert [k for k, n in written.items() if n > 1] == []
    assert {key_of(v): (v["count"], v["value"]) for v in out.values} == expected
