"""Percentile sketches through the aggregator, its checkpoints and an upgrade: emitted
aggregates carry the DDSketch bytes, a pre-1.3 checkpoint's hand-written sketch restores
and is converted, and only states that a release before 1.3 would misread get format 3."""

from __future__ import annotations

import math
import random
from typing import Any

import orjson

from service.aggregation import quantile_sketch as dd
from service.aggregation.partition import V13_STATE_FORMAT
from service.checkpoints.base import PartitionCheckpoint
from service.consumer import sketches as helper
from service.core.events import Aggregate
from tests.unit.test_aggregator_overflow import START, batch, close_window, ev, make
from tests.unit.test_quantile_sketch import _v12_state


def _formats(agg: Any) -> dict[str, int]:
    return {c.partition: orjson.loads(c.state or b"")["format"] for c in agg.snapshot()}


def _p99(out_aggregates: list[Aggregate]) -> Aggregate:
    [p99] = [a for a in out_aggregates if a.agg_func == "p99" and a.name == "a"]
    return p99


def test_percentile_aggregates_carry_the_sketch_of_their_values_and_others_none() -> None:
    agg, _, _ = make()
    values = [float(v) for v in range(1, 101)]
    agg.process(batch([ev("a", v, START + 1, "p99") for v in values]))
    agg.process(batch([ev("a", 2.0, START + 1, "avg")]))
    out = close_window(agg)
    p99 = _p99(out.aggregates)
    assert p99.value == 100 - 0.01 * 99  # exact below 10,000 values, as before
    assert p99.sketch == dd.to_bytes(dd.of(values))
    decoded = helper.from_aggregate(orjson.loads(orjson.dumps(p99.to_json_obj())))
    assert decoded is not None and decoded.count == 100
    [avg] = [a for a in out.aggregates if a.agg_func == "avg"]
    assert avg.sketch is None and "sketch" not in avg.to_json_obj()


def test_only_a_state_holding_a_ddsketch_gets_format_3_and_it_restores() -> None:
    agg, clock, _ = make()
    rng = random.Random(1)
    big = [rng.lognormvariate(0.0, 1.0) for _ in range(10_001)]
    agg.process(batch([ev("a", v, START + 1, "p99") for v in big[:50]], "p0"))
    agg.process(batch([ev("a", v, START + 1, "p99") for v in big], "p1"))
    assert _formats(agg) == {"p0": 1, "p1": V13_STATE_FORMAT}
    again, _, _ = make(clock)
    again.restore(agg.snapshot())
    out = close_window(again, "p0")
    out = close_window(again, "p1")
    p99 = _p99(out.aggregates)
    assert p99.count == 10_051
    assert p99.sketch == dd.to_bytes(dd.of(big + big[:50]))


def test_a_pre_13_checkpoint_sketch_restores_and_is_converted_when_used() -> None:
    rng = random.Random(2)
    values = [rng.lognormvariate(2.0, 1.0) for _ in range(20_000)]
    old_window = [START, "a", "p99", [len(values), _v12_state(values)]]
    state = orjson.dumps(
        {
            "format": 1,
            "max_ts": START + 2,
            "closed_until": None,
            "origins": {},
            "routed": None,
            "ledger": {"totals": {"received": 20_000, "aggregated": 20_000}},
            "windows": [old_window],
        }
    )
    agg, _, metrics = make()
    agg.restore([PartitionCheckpoint("p0", "3", state)])
    assert _formats(agg) == {"p0": 1}  # untouched: still readable by the old release
    agg.process(batch([ev("a", 5.0, START + 3, "p99")]))  # the first use converts it
    assert _formats(agg) == {"p0": V13_STATE_FORMAT}
    out = close_window(agg)
    p99 = _p99(out.aggregates)
    exact = sorted([*values, 5.0])[math.floor(0.99 * 20_000)]
    assert abs(p99.value - exact) <= 0.01505 * exact
    # the decoder rebuilds the mapping from gamma: equal but for the last bits
    assert math.isclose(helper.quantile([p99.sketch or b""], 0.99) or 0.0, p99.value, rel_tol=1e-12)
    assert metrics.state_dropped == {}
    assert agg.ledger()["imbalance"] == 0
