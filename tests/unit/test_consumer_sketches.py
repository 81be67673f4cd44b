"""The consumer helper: the forms a sketch comes in, merging, and what it refuses."""

from __future__ import annotations

import base64
from typing import Any

import pytest
from ddsketch import DDSketch
from ddsketch.mapping import LinearlyInterpolatedMapping
from ddsketch.pb import proto

from service.aggregation import quantile_sketch as dd
from service.consumer import sketches as helper

_to_proto: Any = proto.DDSketchProto.to_proto  # untyped


def test_bytes_base64_text_and_decoded_sketches_merge_alike() -> None:
    a, b = dd.to_bytes(dd.of([1.0, 2.0, 3.0])), dd.to_bytes(dd.of([10.0, -4.0, 0.0]))
    text = base64.b64encode(b).decode()
    forms: list[list[helper.Sketch]] = [
        [a, b],
        [a, text],
        [helper.decode(a), memoryview(b)],
        [bytearray(a), text],
    ]
    for pair in forms:
        merged = helper.merge(pair)
        assert merged is not None and merged.count == 6
    assert helper.quantile([a, text], 1.0) == pytest.approx(10.0, rel=0.01)
    assert helper.quantile([a, text], 0.0) == pytest.approx(-4.0, rel=0.01)


def test_merging_leaves_its_inputs_unchanged() -> None:
    first = helper.decode(dd.to_bytes(dd.of([1.0, 2.0])))
    helper.merge([first, dd.to_bytes(dd.of([5.0] * 10))])
    assert first.count == 2


def test_nothing_gives_none_and_q_must_be_a_fraction() -> None:
    assert helper.merge([]) is None
    assert helper.quantile([], 0.5) is None
    assert helper.quantile([dd.to_bytes(dd.new())], 0.5) is None
    with pytest.raises(ValueError, match="between 0 and 1"):
        helper.quantile([dd.to_bytes(dd.of([1.0]))], 99)


def test_an_aggregate_without_a_sketch_has_none() -> None:
    assert helper.from_aggregate({"agg_func": "avg", "value": 1.0}) is None
    text = base64.b64encode(dd.to_bytes(dd.of([3.0]))).decode()
    sketch = helper.from_aggregate({"agg_func": "p50", "sketch": text})
    assert sketch is not None and sketch.count == 1


def test_sketches_of_other_mappings_and_broken_input_are_refused() -> None:
    ours = dd.to_bytes(dd.of([1.0]))
    coarse = DDSketch(0.02)
    coarse.add(1.0)
    with pytest.raises(ValueError, match="different"):
        helper.merge([ours, _to_proto(coarse).SerializeToString()])
    linear = DDSketch(0.01)
    linear._mapping = LinearlyInterpolatedMapping(0.01)
    linear.add(1.0)
    with pytest.raises(ValueError, match="different mappings"):
        helper.merge([ours, _to_proto(linear).SerializeToString()])
    with pytest.raises(ValueError, match="base64"):
        helper.decode("not base64!")
    with pytest.raises(ValueError, match="DDSketch"):
        helper.decode(b"\x0a\xff")
