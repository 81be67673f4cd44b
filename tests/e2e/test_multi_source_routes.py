"""A rule that matches by source over three sources (docs/routes.md, "Sources"), as a
process fed live with a ``kill -9`` in the middle (the run of test_multi_source.py):
``cpu.*`` of source 2 goes to a table of its own, and since every source sends the same
names, that table must hold exactly source 2's ``cpu.*`` windows and the default table
and topic the other sources' (with every other name of all three), each window once."""

from __future__ import annotations

import asyncio
from collections import Counter
from pathlib import Path

import pytest

from tests.e2e.kafka_pg import read_all, stored_rows
from tests.e2e.test_multi_source import (
    FUNCS,
    NAMES,
    PHASES,
    WINDOWS_PER_PHASE,
    Key,
    expected_of,
    key_of,
    run_three_sources,
)

pytestmark = [pytest.mark.e2e, pytest.mark.integration]

PER_SOURCE_PHASE = WINDOWS_PER_PHASE * 15 * len(NAMES) * len(FUNCS)  # phase_events' size


def source_of(i: int) -> int:
    """The source of ``fed[i]``: run_three_sources feeds each phase as source 1's events,
    then 2's, then 3's, each phase_events long."""
    return (i // PER_SOURCE_PHASE) % 3 + 1


@pytest.mark.parametrize("with_kafka", [False, True], ids=["table", "table-and-topic"])
async def test_a_source_rule_takes_exactly_its_sources_windows_through_kill_9(
    kafka_bootstrap: str, postgres_dsn: str, unique_name: str, tmp_path: Path, with_kafka: bool
) -> None:
    """Also with the rule writing to Kafka: then its own topic holds exactly source 2's
    cpu windows, each once, and the default topic the others."""
    output, table = f"out-{unique_name}", f"agg_{unique_name}"
    hosts, hosts_topic = f"host_metrics_{unique_name}", f"hosts-{unique_name}"
    outputs = "[postgres, kafka]" if with_kafka else "[postgres]"
    topic = f", kafka_topic: {hosts_topic}" if with_kafka else ""
    routes = tmp_path / "routes.yaml"
    routes.write_text(
        "routes:\n"
        f"  - {{name: hosts, match: ['cpu.*'], source: 2, outputs: {outputs},"
        f" postgres_table: {hosts}{topic}}}\n"
    )
    fed = await run_three_sources(
        kafka_bootstrap, postgres_dsn, unique_name, tmp_path, {"ROUTES_FILE": str(routes)}, hosts
    )
    assert len(fed) == PHASES * 3 * PER_SOURCE_PHASE
    routed = [e for i, e in enumerate(fed) if source_of(i) == 2 and e["name"] == "cpu.load"]
    rest = [e for i, e in enumerate(fed) if not (source_of(i) == 2 and e["name"] == "cpu.load")]
    mine, others = expected_of(routed), expected_of(rest)
    assert set(mine) == {k for k in others if k[0] == "cpu.load"}  # one name, two series
    async with asyncio.timeout(60):  # the hosts table is complete; the default follows
        while set(await stored_rows(postgres_dsn, table)) != set(others):
            await asyncio.sleep(0.3)
    assert await stored_rows(postgres_dsn, hosts) == mine
    assert await stored_rows(postgres_dsn, table) == others
    written = await read_all(kafka_bootstrap, output, len(others))
    assert [k for k, n in Counter(key_of(v) for v in written).items() if n > 1] == []
    got: dict[Key, tuple[float, int]] = {key_of(v): (v["value"], v["count"]) for v in written}
    assert got == others
    if with_kafka:
        own = await read_all(kafka_bootstrap, hosts_topic, len(mine))
        assert [k for k, n in Counter(key_of(v) for v in own).items() if n > 1] == []
        assert {key_of(v): (v["value"], v["count"]) for v in own} == mine
