"""The sketch SQL functions that ``migrate`` creates, on the real PostgreSQL, against the
service's own sketches, the Python consumer helper and the ddsketch library.

The acceptance test (issue 17, contract 12.5): one million log-normal values over sixty
one-minute windows, one sketch per window made by the service's own code path; the
hour's p50/p90/p99 from ``vabus_quantile`` and from the helper are within 1 % of the
exact values, and every grouping of the merge gives the same answer."""

from __future__ import annotations

import base64
import math
import random
import struct
import time
from collections.abc import AsyncIterator, Sequence
from typing import Any

import asyncpg
import orjson
import pytest
from ddsketch import DDSketch
from ddsketch.pb import ddsketch_pb2, proto

from service.aggregation import quantile_sketch as dd
from service.aggregation.aggregator import EventAggregator
from service.aggregation.functions import exact_percentile
from service.bus.base import SourceBatch
from service.checkpoints.base import PartitionCheckpoint
from service.config import AggregationConfig
from service.consumer import sketches as helper
from service.core.clock import ManualClock
from service.core.events import Aggregate
from service.metrics.collector import MetricsCollector
from service.postgres.schema import migrate_connection

pytestmark = pytest.mark.integration

pb: Any = ddsketch_pb2
DDSketchProto: Any = proto.DDSketchProto  # untyped
HOUR_QS = (0.5, 0.9, 0.99)


@pytest.fixture
async def conn(postgres_dsn: str, unique_name: str) -> AsyncIterator[Any]:
    c = await asyncpg.connect(postgres_dsn)
    await migrate_connection(c, f"{unique_name}_agg", f"{unique_name}_dlq")
    yield c
    await c.close()


T0 = 1_700_000_000.0 // 3600 * 3600  # an hour's start


def _minute_aggregates(windows: list[list[float]]) -> list[Aggregate]:
    """The service's own code path: the values as ``p99`` events of one name through the
    aggregator, one window per minute, a third of each window's events on a second input
    partition (so the shares merge at emission: raw lists, sketches, both); the emitted
    aggregates by window."""
    clock = ManualClock(T0 + 3_700)
    agg = EventAggregator(AggregationConfig(interval_s=60.0), MetricsCollector(clock), clock)
    agg.restore([PartitionCheckpoint(p, None, None) for p in ("p0", "p1")])
    emitted: list[Aggregate] = []

    def feed(partition: str, records: list[bytes]) -> None:
        for s in range(0, len(records), 5_000):
            chunk = records[s : s + 5_000]
            batch = SourceBatch(partition, chunk, f"test {partition}", None, T0, None, False)
            emitted.extend(agg.process(batch).aggregates)

    for i, values in enumerate(windows):
        ts = T0 + 60 * i + 1
        events = [
            orjson.dumps({"name": "latency", "value": v, "timestamp": ts, "agg_func": "p99"})
            for v in values
        ]
        feed("p1", events[::3])
        feed("p0", [e for j, e in enumerate(events) if j % 3])
    closing = orjson.dumps({"name": "closing", "value": 0.0, "timestamp": T0 + 3_660})
    feed("p0", [closing])
    feed("p1", [closing])
    return sorted((a for a in emitted if a.name == "latency"), key=lambda a: a.window_start)


async def _quantile(conn: Any, sketches: Sequence[bytes | None], q: float) -> float | None:
    value: float | None = await conn.fetchval("SELECT vabus_quantile($1::bytea[], $2)", sketches, q)
    return value


async def test_an_hour_of_minute_sketches_merges_to_within_one_percent_in_any_grouping(
    conn: Any, unique_name: str
) -> None:
    rng = random.Random(20261203)
    # window sizes around 16,667: some stay raw lists (<= 10,000), most become sketches
    sizes = [rng.randrange(5_000, 28_334) for _ in range(59)]
    sizes.append(1_000_000 - sum(sizes))
    assert sizes[-1] > 0
    windows = [[rng.lognormvariate(3.0, 1.2) for _ in range(n)] for n in sizes]
    aggregates = _minute_aggregates(windows)
    assert [a.count for a in aggregates] == sizes
    sketches = [a.sketch for a in aggregates if a.sketch is not None]
    assert len(sketches) == 60
    everything = sorted(v for w in windows for v in w)
    assert len(everything) == 1_000_000

    table = f"{unique_name}_rows"
    await conn.execute(f"CREATE TABLE {table} (minute integer PRIMARY KEY, sketch bytea)")
    await conn.executemany(f"INSERT INTO {table} VALUES ($1, $2)", list(enumerate(sketches)))

    kafka_text = [a.to_json_obj()["sketch"] for a in aggregates]  # base64, as in Kafka
    for q in HOUR_QS:
        exact = exact_percentile(everything, q)
        started = time.perf_counter()
        in_sql = await conn.fetchval(
            f"SELECT vabus_quantile(array_agg(sketch), $1) FROM {table}", q
        )
        seconds = time.perf_counter() - started
        in_python = helper.quantile(kafka_text, q)
        assert in_python is not None
        assert abs(in_sql - exact) <= 0.01 * exact, (q, in_sql, exact)
        assert abs(in_python - exact) <= 0.01 * exact, (q, in_python, exact)
        assert math.isclose(in_sql, in_python, rel_tol=1e-9)
        print(f"q={q}: exact {exact:.6g} sql {in_sql:.6g} python {in_python:.6g} ({seconds:.2f} s)")

        # any grouping: all at once (above), pairwise, by tens, random order, nested merges
        pairwise: list[bytes] = list(sketches)
        while len(pairwise) > 1:
            pairwise = [
                await conn.fetchval("SELECT vabus_sketch_merge($1::bytea[])", pairwise[i : i + 2])
                for i in range(0, len(pairwise), 2)
            ]
        tens = [
            await conn.fetchval("SELECT vabus_sketch_merge($1::bytea[])", sketches[i : i + 10])
            for i in range(0, 60, 10)
        ]
        shuffled = rng.sample(sketches, len(sketches))
        for grouping in (pairwise, tens, shuffled):
            assert await _quantile(conn, grouping, q) == in_sql
            assert helper.quantile(grouping, q) == in_python
        first_half = helper.merge(sketches[:30])
        assert first_half is not None
        assert helper.quantile([first_half, *sketches[30:]], q) == in_python

    # the merged hour of SQL is the sketch of the service's own merge, byte for byte
    merged = dd.new()
    for w in windows:
        dd.merge(merged, dd.of(w))
    in_sql_bytes = await conn.fetchval(f"SELECT vabus_sketch_merge(array_agg(sketch)) FROM {table}")
    assert in_sql_bytes == dd.to_bytes(merged)


async def test_sql_quantiles_equal_the_library_for_signed_values_and_zeros(conn: Any) -> None:
    rng = random.Random(4)
    parts = [
        [rng.choice((0.0, rng.gauss(0, 50), -rng.lognormvariate(0, 4))) for _ in range(300)]
        for _ in range(5)
    ]
    sketches = [dd.to_bytes(dd.of(p)) for p in parts]
    library = DDSketch(0.01)
    for v in (v for p in parts for v in p):
        library.add(v)
    for q in (0.0, 0.01, 0.2, 0.33, 0.5, 0.66, 0.8, 0.99, 1.0):
        expected = library.get_quantile_value(q)
        got = await _quantile(conn, [*sketches, None], q)
        assert got is not None and expected is not None
        assert math.isclose(got, expected, rel_tol=1e-9, abs_tol=0.0), (q, got, expected)


async def test_doubles_decode_and_encode_exactly_as_ieee_754(conn: Any) -> None:
    rng = random.Random(8)
    doubles = [0.0, 1.0, -2.5, 5e-324, -2.2250738585072014e-308, 1.7976931348623157e308]
    doubles += [struct.unpack("<d", struct.pack("<Q", rng.getrandbits(64)))[0] for _ in range(3000)]
    doubles = [x for x in doubles if math.isfinite(x)]
    decoded = await conn.fetchval(
        "SELECT array_agg(vabus_sketch_double(b, 0) ORDER BY i)"
        " FROM unnest($1::bytea[]) WITH ORDINALITY AS u(b, i)",
        [struct.pack("<d", x) for x in doubles],
    )
    assert decoded == doubles
    encoded = await conn.fetchval(
        "SELECT array_agg(vabus_sketch_double_bytes(x) ORDER BY i)"
        " FROM unnest($1::float8[]) WITH ORDINALITY AS u(x, i)",
        doubles,
    )
    assert encoded == [struct.pack("<d", abs(x) if x == 0 else x) for x in doubles]


async def test_values_at_the_edges_of_the_double_range_stay_finite(conn: Any) -> None:
    edge = [1.7976931348623157e308, -1.7976931348623157e308, 1e-300, -1e-300, 1.0]
    state = dd.of(edge)
    for q in (0.0, 0.25, 0.5, 0.75, 1.0):
        got = await _quantile(conn, [dd.to_bytes(state)], q)
        assert got is not None and math.isfinite(got)
        assert math.isclose(got, dd.quantile(state, q), rel_tol=1e-9), q


async def test_the_bin_count_map_and_unpacked_doubles_are_read_too(conn: Any) -> None:
    gamma = DDSketch(0.01)._mapping.gamma
    # positive bins as map entries (one key twice: the last wins), negative ones unpacked
    positive = pb.Store(binCounts={10: 2.0, -3: 1.0})
    message = pb.DDSketch(
        mapping=pb.IndexMapping(gamma=gamma), positiveValues=positive, zeroCount=1.0
    ).SerializeToString()
    message += pb.DDSketch(positiveValues=pb.Store(binCounts={10: 4.0})).SerializeToString()
    # contiguousBinCounts = 2 unpacked: tag (2 << 3 | 1), then the double; offset key 5
    unpacked = b"\x11" + struct.pack("<d", 3.0) + b"\x18" + bytes([10])
    message += b"\x1a" + bytes([len(unpacked)]) + unpacked
    rows = await conn.fetch(
        "SELECT sign, key, n FROM vabus_sketch_bins($1) WHERE n <> 0 ORDER BY sign, key", message
    )
    assert [tuple(r) for r in rows] == [(-1, 5, 3.0), (0, 0, 1.0), (1, -3, 1.0), (1, 10, 4.0)]
    mapping = DDSketch(0.01)._mapping
    expected_top = mapping.value(10)
    assert math.isclose(await _quantile(conn, [message], 1.0) or 0, expected_top, rel_tol=1e-12)
    assert math.isclose(
        await _quantile(conn, [message], 0.0) or 0, -mapping.value(5), rel_tol=1e-12
    )


async def test_sketches_of_another_accuracy_are_refused_with_a_clear_error(conn: Any) -> None:
    ours = dd.to_bytes(dd.of([1.0, 2.0]))
    coarse = DDSketch(0.02)
    coarse.add(1.0)
    theirs = DDSketchProto.to_proto(coarse).SerializeToString()
    with pytest.raises(asyncpg.InvalidParameterValueError, match="different mappings"):
        await _quantile(conn, [ours, theirs], 0.5)
    with pytest.raises(asyncpg.InvalidParameterValueError, match="different mappings"):
        await conn.fetchval("SELECT vabus_sketch_merge($1::bytea[])", [ours, theirs])
    assert await _quantile(conn, [theirs], 0.5) == pytest.approx(1.0, rel=0.021)


@pytest.mark.parametrize(
    "broken",
    [
        b"\x0a",
        b"\x0a\x05\x09",
        b"\x09\x00\x00",
        b"\x0b",
        b"\x0a\x09\x09" + b"\x00" * 6 + b"\xf0\x7f",
    ],
)
async def test_malformed_bytes_are_refused(conn: Any, broken: bytes) -> None:
    with pytest.raises(asyncpg.InvalidParameterValueError, match="DDSketch"):
        await _quantile(conn, [broken], 0.5)


async def test_nothing_to_merge_is_null_and_q_out_of_range_is_an_error(conn: Any) -> None:
    empty = dd.to_bytes(dd.new())
    assert await _quantile(conn, [], 0.5) is None
    assert await _quantile(conn, [None, empty], 0.5) is None
    assert await conn.fetchval("SELECT vabus_sketch_merge('{}'::bytea[])") is None
    with pytest.raises(asyncpg.InvalidParameterValueError, match="between 0 and 1"):
        await _quantile(conn, [empty], 1.5)


async def test_migrate_twice_keeps_the_functions(conn: Any, unique_name: str) -> None:
    await migrate_connection(conn, f"{unique_name}_agg", f"{unique_name}_dlq")
    one = dd.to_bytes(dd.of([7.0]))
    assert await _quantile(conn, [one], 0.5) == pytest.approx(7.0, rel=0.01)
    assert base64.b64decode(base64.b64encode(one)) == one
