"""Names and text that PostgreSQL cannot hold, through the real aggregator, sender,
PostgreSQL output and PostgreSQL checkpoint store (one transaction for rows and
checkpoints, as the service runs them): hostile names on time and late, and raw
messages that are not UTF-8 or hold NUL bytes, are dead letters in the table; the
output and the checkpoints go on; the valid events around them are exact."""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from typing import Any

import pytest

from service.aggregation.aggregator import EventAggregator
from service.bus.base import SourceBatch
from service.checkpoints.postgres import PostgresCheckpointStore
from service.config import AggregationConfig, PostgresConfig
from service.core.clock import ManualClock, SystemClock
from service.metrics.collector import MetricsCollector
from service.pipeline.flow import Checkpoint
from service.pipeline.hub import Delivery
from service.pipeline.sender import DataSender, SharedTransaction
from service.postgres.schema import WINDOW_LATE_TABLE
from service.sinks.postgres import PostgresSink

pytestmark = pytest.mark.integration

START = 1_699_999_980.0  # a multiple of 60
NOW = START + 600
# JSON texts of names that storage cannot hold (NUL, US, DEL, lone surrogates).
HOSTILE = ['"a\\u0000b"', '"y\\u001f"', '"x\x7f"', '"\\ud800"', '"z\\udc00"']


def message(name_json: str | bytes, value: float, ts: float) -> bytes:
    name = name_json if isinstance(name_json, bytes) else name_json.encode()
    return b'{"name":' + name + f',"value":{value},"timestamp":{ts}}}'.encode()


async def test_hostile_names_on_time_and_late_are_dead_letters_and_output_and_checkpoints_go_on(
    postgres_dsn: str, unique_name: str, conn: Any, pg_outputs: PostgresConfig
) -> None:
    cfg = pg_outputs
    cp_table = f"{unique_name}_cp"
    clock = ManualClock(NOW)
    metrics = MetricsCollector(clock)
    agg = EventAggregator(AggregationConfig(interval_s=60.0), metrics, clock)
    commits: list[Mapping[str, str]] = []

    async def commit(positions: Mapping[str, str]) -> None:
        commits.append(dict(positions))

    on_time = [
        message('"ok"', 1, START + 1),
        *(message(n, 100, START + 2) for n in HOSTILE),
        b"[" + message('"ok"', 2, START + 3) + b"," + message('"\\ud800"', 100, START + 4) + b"]",
        message(b'"bad\xff"', 100, START + 5),  # not UTF-8: one invalid_json
        message('"ok"', 100, START + 6) + b"\x00",  # a NUL byte after the event
        message(b'"raw\x00nul"', 100, START + 7),  # a raw NUL inside a string
        message('"ok"', 4, START + 61),  # the window [START, START+60) is emitted
    ]
    late = [
        message('"ok"', 100, START + 8),  # valid, late
        *(message(n, 100, START + 9) for n in HOSTILE),
        message('"ok"', 8, START + 62),
    ]
    after = [message('"ok"', 16, START + 125)]  # emits [START+60, START+120)

    try:
        async with (
            PostgresSink(cfg, metrics, SystemClock()) as pg,
            PostgresCheckpointStore(postgres_dsn, unique_name, table=cp_table) as store,
        ):
            sender = DataSender(
                [pg], store, commit, metrics, clock, shared_transaction=SharedTransaction(pg, store)
            )
            offset = 0
            for records in (on_time, late, after):
                offsets = list(range(offset, offset + len(records)))
                offset += len(records)
                out = agg.process(SourceBatch("p0", records, "test p0", str(offset), NOW, offsets))
                await sender.handle(Delivery([out, Checkpoint(agg.snapshot())]))

            assert commits == [{"p0": "11"}, {"p0": "18"}, {"p0": "19"}]
            assert (await store.load(["p0"]))["p0"].position == "19"
            rows = await conn.fetch(
                f"SELECT name, extract(epoch FROM window_start)::float8 AS ws, value, count"
                f" FROM {cfg.table} ORDER BY ws"
            )
            assert [tuple(r) for r in rows] == [("ok", START, 3.0, 2), ("ok", START + 60, 12.0, 2)]
            dead = await conn.fetch(
                f"SELECT raw, reason, detail, source FROM {cfg.dead_letter_table}"
            )
            assert Counter(r["reason"] for r in dead) == {
                "invalid_name": 2 * len(HOSTILE) + 1,
                "invalid_json": 3,
                "late": 1,
            }
            raws = {r["raw"] for r in dead if r["reason"] == "invalid_json"}
            assert raws == {
                '{"name":"bad\ufffd","value":100,"timestamp":1699999985.0}',
                '{"name":"ok","value":100,"timestamp":1699999986.0}\\u0000',
                '{"name":"raw\\u0000nul","value":100,"timestamp":1699999987.0}',
            }
            late_rows = await conn.fetch(
                f"SELECT name FROM {WINDOW_LATE_TABLE} WHERE namespace = $1", unique_name
            )
            assert [r["name"] for r in late_rows] == ["ok"]
    finally:
        await conn.execute(f"DROP TABLE IF EXISTS {cfg.table}, {cfg.dead_letter_table}, {cp_table}")
        await conn.execute(f"DELETE FROM {WINDOW_LATE_TABLE} WHERE namespace = $1", unique_name)
