"""The service process, HTTP emulator bus into Kafka and PostgreSQL (PostgreSQL also the
checkpoint store): names that storage cannot hold (NUL, U+001F, U+007F, lone
surrogates), on time and late, and an element that is not UTF-8. They are dead letters
in both outputs (the Kafka ones parse with a strict parser), the valid events around
them are exact in both outputs, and checkpoints reach the end of the input."""

from __future__ import annotations

import math
import time
from collections import Counter
from pathlib import Path

import asyncpg
import pytest

from service.dev.emulator import Emulator
from service.postgres.schema import CHECKPOINT_TABLE
from tests.e2e.test_e2e_http import _epoch, read_topic, stored_rows, wait_until
from tests.e2e.workload import ServiceProcess, free_port

pytestmark = [pytest.mark.e2e, pytest.mark.integration]

HOSTILE = ['"a\\u0000b"', '"y\\u001f"', '"x\x7f"', '"\\ud800"', '"z\\udc00"']


def event(name_json: str | bytes, value: float, ts: float, marker: str) -> bytes:
    name = name_json if isinstance(name_json, bytes) else name_json.encode()
    tail = f',"value":{value},"timestamp":{ts},"test":"{marker}"}}'
    return b'{"name":' + name + tail.encode()


async def test_hostile_names_are_dead_letters_in_both_outputs_and_checkpoints_reach_the_end(
    kafka_bootstrap: str, postgres_dsn: str, unique_name: str, tmp_path: Path
) -> None:
    t0 = math.floor(time.time() / 10) * 10 - 200.0
    ok = f'"ok-{unique_name}"'
    hostile_on_time = [event(n, 100, t0 + 2, unique_name) for n in HOSTILE]
    hostile_late = [event(n, 100, t0 + 4, unique_name) for n in HOSTILE]
    items = [
        event(ok, 1, t0 + 1, unique_name),
        *hostile_on_time,
        event(b'"bad\xff"', 100, t0 + 2, unique_name),  # not UTF-8: one invalid_json
        event(ok, 2, t0 + 11, unique_name),  # closes [t0, t0+10)
        event(ok, 100, t0 + 3, unique_name),  # late
        *hostile_late,  # late too, but their names are refused first
        event(ok, 4, t0 + 12, unique_name),
        event(ok, 8, t0 + 25, unique_name),
        event(ok, 16, t0 + 31, unique_name),  # its window closes by the idle timeout
    ]
    name = f"ok-{unique_name}"
    expected = {
        (name, "sum", t0): (1.0, 1),
        (name, "sum", t0 + 10): (6.0, 2),
        (name, "sum", t0 + 20): (8.0, 1),
        (name, "sum", t0 + 30): (16.0, 1),
    }
    table, topic = f"agg_{unique_name}", f"agg-{unique_name}"
    async with Emulator() as emulator:
        end_cursor = emulator.append(items)
        proc = ServiceProcess(
            {
                "VABUS_URL": emulator.url,
                "VABUS_WAIT": "0.5",
                "VABUS_BATCH_LIMIT": "4",  # several batches, so several checkpoints
                "STORAGE_TYPE": "kafka,postgres",
                "KAFKA_BOOTSTRAP_SERVERS": kafka_bootstrap,
                "KAFKA_TOPIC": topic,
                "POSTGRES_DSN": postgres_dsn,
                "POSTGRES_TABLE": table,
                "AGGREGATION_INTERVAL": "10",
                "AGGREGATION_IDLE_TIMEOUT": "2",
                "HTTP_HOST": "127.0.0.1",
                "HTTP_PORT": str(free_port()),
                "STATE_DIR": str(tmp_path / "state"),
            },
            tmp_path,
        )
        conn = await asyncpg.connect(postgres_dsn)
        try:

            async def all_stored() -> bool:
                return len(await stored_rows(postgres_dsn, table)) >= len(expected)

            await wait_until(all_stored, 60, "aggregates in PostgreSQL", proc)

            async def checkpointed_to_the_end() -> bool:
                position = await conn.fetchval(
                    f"SELECT position FROM {CHECKPOINT_TABLE} WHERE namespace = $1",
                    f"http:{emulator.url}",
                )
                return bool(position == end_cursor)

            await wait_until(checkpointed_to_the_end, 30, "the last checkpoint", proc)
            assert await stored_rows(postgres_dsn, table) == expected

            dead = await conn.fetch(
                "SELECT raw, reason, detail FROM dead_letters WHERE strpos(raw, $1) > 0",
                unique_name,
            )
            reasons = Counter(r["reason"] for r in dead)
            assert reasons == {"invalid_name": 2 * len(HOSTILE), "invalid_json": 1, "late": 1}
            assert any('"a\\u0000b"' in r["raw"] for r in dead)  # JSON's own escape, as sent
            assert all("U+" in r["detail"] for r in dead if r["reason"] == "invalid_name")

            # Kafka: every record parses with orjson (read_topic), the same verdicts.
            kafka_dead = await read_topic(kafka_bootstrap, f"{topic}.dlq", len(dead))
            assert Counter(v["reason"] for _, v in kafka_dead) == reasons
            aggregates = await read_topic(kafka_bootstrap, topic, len(expected))
            assert {
                (v["name"], v["agg_func"], _epoch(v["window_start"])): (v["value"], v["count"])
                for _, v in aggregates
            } == expected
        finally:
            await conn.close()
            code = proc.terminate()
        assert code == 0, proc.log_text()[-3000:]
