"""Merge the ``sketch`` of percentile aggregates and read any quantile of the merged values.

A consumer of the aggregates topic (or of the PostgreSQL table) holds one DDSketch per
window and percentile row: base64 text in the Kafka JSON value, ``bytea`` in
PostgreSQL. The sketches of any set of rows of one series merge into the sketch of all
their values, so the p99 of an hour comes from its sixty per-minute rows::

    from service.consumer.sketches import quantile

    p99 = quantile((row["sketch"] for row in rows_of_the_hour), 0.99)

The sketches are DataDog's DDSketch (``ddsketch`` library, protobuf ``DDSketch``
message, relative accuracy 1 %); these functions return the library's objects, so
anything the library offers works on them. Importing this module starts nothing and
needs only ``ddsketch`` and ``protobuf`` (docs/sketches.md).
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Iterable, Mapping
from typing import Any

from ddsketch.ddsketch import BaseDDSketch
from ddsketch.pb import ddsketch_pb2, proto
from ddsketch.store import DenseStore
from google.protobuf.message import DecodeError

__all__ = ["Sketch", "decode", "from_aggregate", "merge", "quantile"]

Sketch = bytes | bytearray | memoryview | str | BaseDDSketch
"""A sketch as a consumer meets it: protobuf bytes (PostgreSQL), base64 text (Kafka),
or an already decoded one."""

_pb: Any = ddsketch_pb2
_from_proto: Any = proto.DDSketchProto.from_proto  # the library's decoder (untyped)


def decode(sketch: Sketch) -> BaseDDSketch:
    """The DDSketch of protobuf bytes or of their base64 text; raises ``ValueError`` for
    anything else. A decoded sketch is returned as it is."""
    if isinstance(sketch, BaseDDSketch):
        return sketch
    if isinstance(sketch, str):
        try:
            data = base64.b64decode(sketch, validate=True)
        except binascii.Error as exc:
            raise ValueError(f"sketch is not base64 text: {exc}") from exc
    else:
        data = bytes(sketch)
    try:
        decoded: BaseDDSketch = _from_proto(_pb.DDSketch.FromString(data))
    except DecodeError as exc:
        raise ValueError(f"sketch is not a DDSketch protobuf message: {exc}") from exc
    return decoded


def merge(sketches: Iterable[Sketch]) -> BaseDDSketch | None:
    """One sketch of all the values of these (None when there are none). Merging is exact:
    any grouping or order gives the same bins. Raises ``ValueError`` when two sketches
    have different mappings (another relative accuracy): their bins do not add up."""
    merged: BaseDDSketch | None = None
    for sketch in sketches:
        one = decode(sketch)
        if merged is None:  # a fresh sketch: the inputs are never changed
            merged = BaseDDSketch(one._mapping, DenseStore(), DenseStore(), 0.0)
        elif _mapping_of(one) != _mapping_of(merged):
            # the library compares gamma alone; an offset or interpolation moves keys too
            raise ValueError(
                f"cannot merge DDSketches of different mappings: {_mapping_of(merged)} "
                f"and {_mapping_of(one)}"
            )
        merged.merge(one)
    return merged


def _mapping_of(sketch: BaseDDSketch) -> tuple[str, float, float]:
    mapping = sketch._mapping
    return type(mapping).__name__, mapping.gamma, mapping._offset


def quantile(sketches: Iterable[Sketch], q: float) -> float | None:
    """The ``q`` quantile (0 <= q <= 1) of all the values of these sketches, within 1 % of
    the exact value of rank ``q * (count - 1)``; None when they hold no value."""
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"q must be between 0 and 1, got {q!r}")
    merged = merge(sketches)
    if merged is None:
        return None
    value: float | None = merged.get_quantile_value(q)
    return None if value is None else float(value)


def from_aggregate(value: Mapping[str, Any]) -> BaseDDSketch | None:
    """The sketch of one decoded Kafka aggregate (its JSON value), None when it has none
    (aggregates of functions other than ``p50`` .. ``p99``)."""
    text = value.get("sketch")
    return None if text is None else decode(text)
