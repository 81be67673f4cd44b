"""PERCENTILES: what a percentile key costs on the hot path and at emission.

``python -m bench.percentiles [-v VALUES] [-r R]``

For one ``p99`` key of ``VALUES`` (default 10,000, the exact limit) log-normal values,
best of ``R`` runs, in milliseconds per key:

* ``hot path``: ``new`` + ``add`` of every value (a list append below the limit);
* ``result``: the value at emission (sort + exact percentile, or the sketch's);
* ``sketch``: the DDSketch protobuf bytes emission adds (bins in bulk + encoding);
* ``library add``: the same sketch built with the ddsketch library's per-value ``add``
  and its own encoder, for comparison (what the bulk bins avoid).

Also the size of the sketch in bytes and in the Kafka JSON value (base64).
"""

from __future__ import annotations

import argparse
import random
import time
from collections.abc import Callable
from typing import Any

from ddsketch import DDSketch
from ddsketch.pb import proto

from service.aggregation import percentiles
from service.aggregation.functions import FUNCTIONS
from service.core.events import Aggregate

_to_proto: Any = proto.DDSketchProto.to_proto  # untyped


def best_ms(fn: Callable[[], object], runs: int) -> float:
    best = float("inf")
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--values", type=int, default=10_000)
    parser.add_argument("-r", "--runs", type=int, default=20)
    args = parser.parse_args()
    rng = random.Random(42)
    values = [rng.lognormvariate(3.0, 1.2) for _ in range(args.values)]
    fn = FUNCTIONS["p99"]

    def hot() -> list[Any]:
        acc = fn.new(values[0], 0.0)
        add = fn.add
        for v in values[1:]:
            add(acc, v, 0.0)
        return acc

    acc = hot()

    def library() -> bytes:
        sketch = DDSketch(0.01)
        for v in values:
            sketch.add(v)
        data: bytes = _to_proto(sketch).SerializeToString()
        return data

    def result() -> float:
        return fn.result(acc)

    sketch = percentiles.sketch_of("p99", acc) or b""
    text = Aggregate("m", "p99", 1.0, len(values), 0.0, 60.0, 60.0, sketch=sketch).to_json_obj()
    print(f"{args.values:,} values of one p99 key (best of {args.runs}), ms per key:")
    print(f"  hot path (new + add):      {best_ms(hot, args.runs):8.3f}")
    print(f"  result at emission:        {best_ms(result, args.runs):8.3f}")
    emit = best_ms(lambda: percentiles.sketch_of("p99", acc), args.runs)
    print(f"  sketch at emission:        {emit:8.3f}")
    print(f"  library add + encode:      {best_ms(library, max(1, args.runs // 4)):8.3f}")
    print(f"  sketch bytes: {len(sketch):,}; base64 in the Kafka value: {len(text['sketch']):,}")


if __name__ == "__main__":
    main()
