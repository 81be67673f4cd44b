"""KEPT: what keeping emitted windows for corrections costs (AGGREGATION_ALLOWED_LATENESS).

``python -m bench.kept_memory [--keys 10000] [--windows 30] [--lateness 60] [--func sum]``

Feeds ``--windows`` consecutive 10 s windows of ``--keys`` names (one event per name and
window, in order, one partition) through the aggregator in-process, once with the
allowed lateness 0 and once with ``--lateness``, and reports for each: the memory the
aggregator holds at the end (tracemalloc, after a collection; the input is generated
on the fly and not counted), the kept window keys, and the CPU time of the feed (in
another pass, without tracemalloc). The difference divided by the kept keys is the cost
of one kept window key.
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

T0 = 1_700_000_000.0
INTERVAL = 10.0
BATCH = 10_000


def feed(
    keys: int, windows: int, lateness: float, func: str, *, trace: bool
) -> tuple[int, int, float, int, float]:
    """(bytes held by the aggregator when ``trace``, kept keys, CPU seconds, checkpoint
    state bytes, seconds to take the checkpoint)."""
    with Heap(trace=trace) as heap:
        clock = ManualClock(T0 + windows * INTERVAL + 3600.0)
        cfg = AggregationConfig(
            interval_s=INTERVAL, allowed_lateness_s=lateness, idle_timeout_s=3600.0
        )
        agg = EventAggregator(cfg, MetricsCollector(clock), clock)
        dumps = orjson.dumps
        cpu = 0.0
        for w in range(windows):
            for first in range(0, keys, BATCH):
                records = [
                    dumps(
                        {
                            "name": f"host-{i:07d}.cpu.load",
                            "value": i * 0.5,
                            "timestamp": T0 + w * INTERVAL + (i % 10) * 0.9,
                            "agg_func": func,
                        }
                    )
                    for i in range(first, min(first + BATCH, keys))
                ]
                t0 = time.process_time()
                agg.process(SourceBatch("p0", records, "bench", str(w), T0))
                cpu += time.process_time() - t0
        del records  # orjson's bytes are ~4 KB each: not the aggregator's
        held = heap.held()
    t0 = time.perf_counter()
    [cp] = agg.snapshot()
    took = time.perf_counter() - t0
    state = cp.state or b"{}"
    kept = len(orjson.loads(state).get("kept", []))
    del agg
    return held, kept, cpu, len(state), took


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--keys", type=int, default=10_000)
    ap.add_argument("--windows", type=int, default=30)
    ap.add_argument("--lateness", type=float, default=60.0)
    ap.add_argument("--func", default="sum")
    args = ap.parse_args()
    runs = []
    for lateness in (0.0, args.lateness):
        held, kept, *_ = feed(args.keys, args.windows, lateness, args.func, trace=True)
        _, _, cpu, size, took = feed(args.keys, args.windows, lateness, args.func, trace=False)
        runs.append((held, kept, cpu, size, took))
    off, on = runs
    for label, (held, kept, cpu, size, took) in (
        ("lateness 0", off),
        (f"lateness {args.lateness:g}", on),
    ):
        print(
            f"{label:>13}: {held / 1e6:7.2f} MB held, {kept:,} kept window keys, "
            f"feed {cpu:.2f} CPU s ({args.keys * args.windows / cpu:,.0f} ev/CPU-s), "
            f"checkpoint {size / 1e6:.2f} MB in {took * 1000:.0f} ms"
        )
    extra = on[0] - off[0]
    print(
        f"keeping costs {extra / 1e6:.2f} MB for {on[1]:,} kept keys: "
        f"{extra / max(1, on[1]):,.0f} bytes per kept window key ({args.func}, "
        f"{args.keys:,} keys, {INTERVAL:g} s windows)"
    )


if __name__ == "__main__":
    main()
