"""Rows to Parquet: one file per hour of event time (UTC).

Columns (contract §12.9): ``name`` (string), ``agg_func`` (string, the canonical
function), ``value`` (double), ``timestamp`` (timestamp[us, UTC]), ``tags`` (JSON text
of the grouped tags, or null), and ``partition`` (the source partition, for diagnosis).
"""

from __future__ import annotations

from typing import Final

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from service.archive.rows import Rows

__all__ = ["SCHEMA", "by_hour", "read_rows"]

SCHEMA: Final = pa.schema(
    [
        pa.field("name", pa.string(), nullable=False),
        pa.field("agg_func", pa.string(), nullable=False),
        pa.field("value", pa.float64(), nullable=False),
        pa.field("timestamp", pa.timestamp("us", tz="UTC"), nullable=False),
        pa.field("tags", pa.string()),
        pa.field("partition", pa.string(), nullable=False),
    ]
)


def by_hour(rows: Rows, partition: str) -> dict[int, bytes]:
    """The Parquet bytes of ``rows`` per hour since the epoch, in event order."""
    seconds = pa.array(rows.times, pa.float64())
    micros = pc.cast(pc.round(pc.multiply(seconds, 1_000_000.0)), pa.int64())
    table = pa.table(
        [
            pa.array(rows.names, pa.string()),
            pa.array(rows.funcs, pa.string()),
            pa.array(rows.values, pa.float64()),
            micros.cast(SCHEMA.field("timestamp").type),
            pa.array(rows.tags, pa.string()),
            pa.repeat(pa.scalar(partition, pa.string()), len(rows)),
        ],
        schema=SCHEMA,
    )
    hours = pc.cast(pc.floor(pc.divide(seconds, 3600.0)), pa.int64())
    distinct = hours.unique().to_pylist()
    if len(distinct) == 1:
        return {distinct[0]: _encoded(table)}
    return {h: _encoded(table.filter(pc.equal(hours, h))) for h in distinct}


def _encoded(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression="zstd")
    data: bytes = sink.getvalue().to_pybytes()
    return data


def read_rows(data: bytes) -> pa.Table:
    """One archive file back as a table (tests, tools)."""
    return pq.read_table(pa.BufferReader(data))
