"""Rows to Parquet: one file per hour of event time (UTC).

Columns (contract §12.9): ``name`` (string), ``agg_func`` (string, the canonical
function), ``value`` (double), ``timestamp`` (timestamp[us, UTC]), ``tags`` (JSON text
of the grouped tags, or null), and ``partition`` (the source partition, for diagnosis).
"""

from __future__ import annotations

import math
from typing import Final

import pyarrow as pa
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


def _micros(ts: float) -> int:
    return round(ts * 1_000_000)


def by_hour(rows: Rows, partition: str) -> dict[int, bytes]:
    """The Parquet bytes of ``rows`` per hour since the epoch, in event order."""
    hours: dict[int, list[int]] = {}
    for i, ts in enumerate(rows.times):
        hours.setdefault(math.floor(ts / 3600.0), []).append(i)
    files = {}
    for hour, picked in hours.items():
        table = pa.table(
            [
                pa.array([rows.names[i] for i in picked], pa.string()),
                pa.array([rows.funcs[i] for i in picked], pa.string()),
                pa.array([rows.values[i] for i in picked], pa.float64()),
                pa.array([_micros(rows.times[i]) for i in picked], pa.int64()).cast(
                    SCHEMA.field("timestamp").type
                ),
                pa.array([rows.tags[i] for i in picked], pa.string()),
                pa.array([partition] * len(picked), pa.string()),
            ],
            schema=SCHEMA,
        )
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink, compression="zstd")
        files[hour] = sink.getvalue().to_pybytes()
    return files


def read_rows(data: bytes) -> pa.Table:
    """One archive file back as a table (tests, tools)."""
    return pq.read_table(pa.BufferReader(data))
