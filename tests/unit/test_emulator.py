"""The VaBus emulator speaks protocol v1 over a real socket; the load generator is driven
by a manual clock."""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import orjson
import pytest

from service.core.clock import ManualClock
from service.core.events import AGG_FUNCS
from service.dev.emulator import Emulator, main
from service.dev.event_log import EventLog
from service.dev.load import LoadGenerator


@pytest.fixture
async def emulator() -> AsyncIterator[Emulator]:
    async with Emulator() as emu:
        yield emu


@pytest.fixture
async def client() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


async def get_events(
    client: aiohttp.ClientSession, emu: Emulator, **params: Any
) -> tuple[list[Any], str]:
    query = {k: str(v) for k, v in params.items()}
    async with client.get(f"{emu.url}/events", params=query) as response:
        assert response.status == 200, await response.text()
        body = orjson.loads(await response.read())
    return body["events"], body["cursor"]


async def wait_until(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.005)


def numbered(start: int, stop: int) -> list[dict[str, Any]]:
    return [{"name": "n", "value": i, "timestamp": 1_700_000_000 + i} for i in range(start, stop)]


async def test_cursor_returns_the_events_after_it_and_an_older_cursor_replays(
    emulator: Emulator, client: aiohttp.ClientSession
) -> None:
    emulator.append(numbered(0, 5))
    first, cursor = await get_events(client, emulator, limit=3, wait=0)
    rest, end = await get_events(client, emulator, limit=3, wait=0, cursor=cursor)
    replay, _ = await get_events(client, emulator, limit=10, wait=0, cursor=cursor)
    assert [e["value"] for e in first] == [0, 1, 2]
    assert [e["value"] for e in rest] == [3, 4]
    assert [e["value"] for e in replay] == [3, 4]
    assert end == emulator.stats()["end_cursor"]


async def test_requests_without_cursor_hand_out_each_event_once(
    emulator: Emulator, client: aiohttp.ClientSession
) -> None:
    emulator.append(numbered(0, 5))
    first, _ = await get_events(client, emulator, limit=2, wait=0)
    second, _ = await get_events(client, emulator, limit=10, wait=0)
    third, _ = await get_events(client, emulator, limit=10, wait=0)
    assert [e["value"] for e in first + second] == [0, 1, 2, 3, 4]
    assert third == []
    assert emulator.stats()["events_handed_out"] == 5


async def test_long_poll_answers_as_soon_as_an_event_is_appended(
    emulator: Emulator, client: aiohttp.ClientSession
) -> None:
    cursor = emulator.append([])
    request = asyncio.create_task(get_events(client, emulator, limit=10, wait=30, cursor=cursor))
    await wait_until(lambda: emulator.stats()["long_polls_waiting"] == 1)
    emulator.append(numbered(7, 8))
    async with asyncio.timeout(5):  # far less than the 30 s the request may wait
        events, _ = await request
    assert [e["value"] for e in events] == [7]


async def test_long_poll_answers_empty_with_the_same_cursor_when_the_wait_expires(
    emulator: Emulator, client: aiohttp.ClientSession
) -> None:
    cursor = emulator.append(numbered(0, 1))
    events, after = await get_events(client, emulator, limit=10, wait=0.05, cursor=cursor)
    assert events == []
    assert after == cursor


async def test_cursor_older_than_retention_starts_at_the_oldest_event_kept(
    client: aiohttp.ClientSession,
) -> None:
    async with Emulator(max_events=3) as emu:
        start = emu.append([])
        for i in range(10):
            emu.append(numbered(i, i + 1))
        events, _ = await get_events(client, emu, limit=10, wait=0, cursor=start)
    assert [e["value"] for e in events] == [7, 8, 9]


async def test_cursor_of_another_emulator_replays_everything_kept(
    emulator: Emulator, client: aiohttp.ClientSession
) -> None:
    async with Emulator() as other:
        foreign = other.append(numbered(0, 100))
    emulator.append(numbered(0, 2))
    events, _ = await get_events(client, emulator, limit=10, wait=0, cursor=foreign)
    assert [e["value"] for e in events] == [0, 1]


async def test_malformed_cursor_and_limit_are_rejected_with_400(
    emulator: Emulator, client: aiohttp.ClientSession
) -> None:
    for params in ({"cursor": "garbage"}, {"limit": "ten"}, {"wait": "-1"}):
        async with client.get(f"{emulator.url}/events", params=params) as response:
            assert response.status == 400
            assert "error" in orjson.loads(await response.read())


async def test_posted_events_are_stored_one_per_array_element(
    emulator: Emulator, client: aiohttp.ClientSession
) -> None:
    async with client.post(f"{emulator.url}/events", data=orjson.dumps(numbered(0, 3))) as r:
        assert r.status == 200
        assert (await r.json())["accepted"] == 3
    async with client.post(f"{emulator.url}/events", data=b'{"name": "single"}') as r:
        assert r.status == 200
    events, _ = await get_events(client, emulator, limit=10, wait=0)
    assert [e.get("value") for e in events] == [0, 1, 2, None]
    assert events[3] == {"name": "single"}


async def test_posted_numbers_beyond_a_double_keep_their_exact_text(
    emulator: Emulator, client: aiohttp.ClientSession
) -> None:
    huge = "1" + "0" * 400
    body = f'[{{"name":"a","value":1e999,"timestamp":1}}, {{"name":"b","value":{huge}}}]'
    async with client.post(f"{emulator.url}/events", data=body.encode()) as r:
        assert r.status == 200
    async with client.get(f"{emulator.url}/events", params={"wait": "0"}) as r:
        text = await r.text()
    assert '{"name":"a","value":1e999,"timestamp":1}' in text
    assert f'{{"name":"b","value":{huge}}}' in text


async def test_invalid_json_post_is_rejected_with_400_and_a_clear_message(
    emulator: Emulator, client: aiohttp.ClientSession
) -> None:
    for path in ("events", "metrics"):
        async with client.post(f"{emulator.url}/{path}", data=b'{"name": ') as response:
            assert response.status == 400
            assert "not valid JSON" in (await response.json())["error"]
    assert emulator.stats()["events_stored"] == 0


async def test_posted_metrics_are_kept_and_listed(
    emulator: Emulator, client: aiohttp.ClientSession
) -> None:
    sent = [{"name": "events_received_total", "value": 5, "timestamp": 1.5}]
    async with client.post(f"{emulator.url}/metrics", data=orjson.dumps(sent * 2)) as r:
        assert r.status == 200
    async with client.post(f"{emulator.url}/metrics", data=b'{"not": "an array"}') as r:
        assert r.status == 400
    async with client.get(f"{emulator.url}/metrics") as r:
        assert await r.json() == sent * 2
    async with client.get(f"{emulator.url}/stats") as r:
        assert (await r.json())["metrics_received"] == 2


async def test_kept_metrics_are_bounded(client: aiohttp.ClientSession) -> None:
    async with Emulator(max_metrics=3) as emu:
        body = orjson.dumps([{"name": "m", "value": i, "timestamp": i} for i in range(5)])
        async with client.post(f"{emu.url}/metrics", data=body) as r:
            assert r.status == 200
    assert [m["value"] for m in emu.metrics] == [2, 3, 4]


async def test_token_is_required_when_configured(client: aiohttp.ClientSession) -> None:
    async with Emulator(token="s3cret", base="/vabus") as emu:
        assert emu.url.endswith("/vabus")
        statuses = []
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Bearer s3cret"}):
            async with client.get(f"{emu.url}/stats", headers=headers) as response:
                statuses.append(response.status)
    assert statuses == [401, 401, 200]


async def test_log_keeps_the_last_max_events() -> None:
    log = EventLog(max_events=4)
    for i in range(20):
        log.extend([b"%d" % i])
    assert (log.oldest, log.end, len(log)) == (16, 20, 4)
    assert log.read(0, 10) == [b"16", b"17", b"18", b"19"]
    assert log.read(18, 1) == [b"18"]


def follows_contract(event: Any) -> bool:
    return (
        isinstance(event, dict)
        and isinstance(event.get("name"), str)
        and type(event.get("value")) in (int, float)
        and type(event.get("timestamp")) in (int, float)
        and event.get("agg_func", "sum") in AGG_FUNCS
    )


def generator(seed: int, **options: Any) -> LoadGenerator:
    return LoadGenerator(Emulator(), rate=100, names=5, seed=seed, clock=ManualClock(), **options)


async def test_load_generator_is_deterministic_for_a_seed() -> None:
    assert generator(7).generate(200) == generator(7).generate(200)
    assert generator(7).generate(200) != generator(8).generate(200)


async def test_load_generator_events_follow_the_contract() -> None:
    events = [orjson.loads(e) for e in generator(1).generate(500)]
    assert all(map(follows_contract, events))
    assert {e["name"] for e in events} == {f"load.{k:04d}" for k in range(5)}
    assert {e["agg_func"] for e in events} == set(AGG_FUNCS)
    assert all(e["timestamp"] == 1_700_000_000.0 for e in events)


async def test_load_generator_can_fix_one_agg_func_per_name() -> None:
    events = [orjson.loads(e) for e in generator(1, fixed_per_name=True).generate(500)]
    funcs: dict[str, set[str]] = {}
    for e in events:
        funcs.setdefault(e["name"], set()).add(e["agg_func"])
    assert all(len(f) == 1 for f in funcs.values())


async def test_load_generator_makes_invalid_and_late_events_on_request() -> None:
    invalid = [orjson.loads(e) for e in generator(1, invalid_fraction=1.0).generate(50)]
    late = [orjson.loads(e) for e in generator(1, late_fraction=1.0, late_by_s=60).generate(50)]
    assert not any(map(follows_contract, invalid))
    assert all(map(follows_contract, late))
    assert all(e["timestamp"] == 1_700_000_000.0 - 60 for e in late)


async def test_load_generator_appends_at_the_configured_rate_of_the_clock() -> None:
    clock, emu = ManualClock(), Emulator()
    load = LoadGenerator(emu, rate=1000, names=3, seed=1, clock=clock)
    running = asyncio.create_task(load.run())
    try:
        async with asyncio.timeout(5):
            await clock.sleeping()  # it has read its start time and waits for the next tick
        clock.advance(1.0)
        await wait_until(lambda: emu.stats()["events_stored"] == 1000)
        async with asyncio.timeout(5):
            await clock.sleeping()
        clock.advance(0.5)
        await wait_until(lambda: emu.stats()["events_stored"] == 1500)
    finally:
        running.cancel()
        await asyncio.wait({running})


async def test_main_serves_generated_load_until_cancelled(
    capsys: pytest.CaptureFixture[str], client: aiohttp.ClientSession
) -> None:
    args = argparse.Namespace(host="127.0.0.1", port=0, rate=2000.0, names=4, seed=3)
    serving = asyncio.create_task(main(args, handle_signals=False))
    printed = ""

    def url_printed() -> bool:
        nonlocal printed
        printed += capsys.readouterr().out
        return "http://" in printed

    try:
        await wait_until(url_printed)
        url = printed.split("at ", 1)[1].strip()
        events: list[Any] = []
        async with asyncio.timeout(10):
            while not events:
                async with client.get(f"{url}/events", params={"wait": "1"}) as r:
                    events = (await r.json())["events"]
        assert events[0]["name"].startswith("load.")
    finally:
        serving.cancel()
        await asyncio.wait({serving})
