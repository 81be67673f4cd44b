"""ROLLUPS: what open rollup windows hold (AGGREGATION_ROLLUPS), measured.

``python -m bench.rollup_memory [--keys 10000] [--windows 90] [--rollups 600,3600] [--func sum]``

Feeds ``--windows`` consecutive 10 s windows of ``--keys`` names (``--per`` events per
name and window, in order, one partition) through the aggregator in-process, once
without rollups and once with ``--rollups``, and reports for each the memory the
aggregator holds at the end (tracemalloc after a collection; the input is generated on
the fly and not counted), the open rollup window keys and the CPU time of the feed. The
windows stop inside the first rollup window, so its partials are all open; the
difference divided by the open rollup keys is the cost of one — the same however many
events went into it (a partial never holds events, only an accumulator).
"""

from __future__ import annotations

import argparse
import time

import orjson

from bench.heap import Heap
from service.aggregation.aggregator import EventAggregator
from service.bus.base import SourceBatch
from service.config import AggregationConfig
from service.core.clock import ManualClock
from service.metrics.collector import MetricsCollector

T0 = 1_699_999_200.0  # a multiple of 3600
INTERVAL = 10.0
BATCH = 10_000


def feed(
    keys: int, windows: int, per: int, rollups: tuple[float, ...], func: str, *, trace: bool
) -> tuple[int, int, float]:
    """(bytes held by the aggregator when ``trace``, open rollup keys, CPU seconds)."""
    with Heap(trace=trace) as heap:
        clock = ManualClock(T0 + windows * INTERVAL + 3600.0)
        cfg = AggregationConfig(interval_s=INTERVAL, rollups_s=rollups, idle_timeout_s=3600.0)
        agg = EventAggregator(cfg, MetricsCollector(clock), clock)
        dumps = orjson.dumps
        cpu = 0.0
        records: list[bytes] = []
        for w in range(windows):
            for first in range(0, keys, BATCH):
                records = [
                    dumps(
                        {
                            "name": f"host-{i:07d}.cpu.load",
                            "value": i * 0.5 + j,
                            "timestamp": T0 + w * INTERVAL + (j * 10 + i % 10) * 0.9 / per,
                            "agg_func": func,
                        }
                    )
                    for i in range(first, min(first + BATCH, keys))
                    for j in range(per)
                ]
                t0 = time.process_time()
                agg.process(SourceBatch("p0", records, "bench", str(w), T0))
                cpu += time.process_time() - t0
        del records  # orjson's bytes: not the aggregator's
        held = heap.held()
    partials = agg.rollup_partials
    del agg
    return held, partials, cpu


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--keys", type=int, default=10_000)
    ap.add_argument("--windows", type=int, default=90)
    ap.add_argument("--per", type=int, default=1, help="events per name and window")
    ap.add_argument(
        "--rollups", type=lambda v: tuple(float(x) for x in v.split(",")), default=(600.0, 3600.0)
    )
    ap.add_argument("--func", default="sum")
    args = ap.parse_args()
    runs = []
    for rollups in ((), args.rollups):
        held, partials, _ = feed(args.keys, args.windows, args.per, rollups, args.func, trace=True)
        _, _, cpu = feed(args.keys, args.windows, args.per, rollups, args.func, trace=False)
        runs.append((held, partials, cpu))
    off, on = runs
    events = args.keys * args.windows * args.per
    for label, (held, partials, cpu) in (("no rollups", off), (f"rollups {args.rollups}", on)):
        print(
            f"{label:>24}: {held / 1e6:7.2f} MB held, {partials:,} open rollup keys, "
            f"feed {cpu:.2f} CPU s ({events / cpu:,.0f} ev/CPU-s)"
        )
    extra = on[0] - off[0]
    print(
        f"rollups cost {extra / 1e6:.2f} MB for {on[1]:,} open rollup keys: "
        f"{extra / max(1, on[1]):,.0f} bytes per open rollup key ({args.func}, "
        f"{args.keys:,} names, {args.windows} windows of {INTERVAL:g} s, "
        f"{args.per} event(s) per name and window)"
    )


if __name__ == "__main__":
    main()
