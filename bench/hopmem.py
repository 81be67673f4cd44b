"""OPEN-STATE MEMORY of hopping windows against tumbling ones (issue 18, docs/hopping.md).

``python -m bench.hopmem [-n N] [--hop H] [--interval I] [--names K] [--lateness L] [--collect]``

Feeds the same events (the benchmark workload's shape: ``K`` names, event time rising
over 1,200 s) through an aggregator with tumbling windows of ``I`` seconds and one with
hopping windows (``AGGREGATION_HOP=H``), and reports the peak and the mean over batches
of the memory ``tracemalloc`` sees allocated and not freed (the open state: windows or
panes, the ledger; every output is dropped as it comes; bench.heap). ``--collect``
samples after a full collection, which also empties CPython's free lists (freed
objects kept for reuse, which tracemalloc counts as allocated). ``--lateness``: both
run with AGGREGATION_ALLOWED_LATENESS (emitted windows, or panes, kept for corrections).
"""

from __future__ import annotations

import argparse
import random

import orjson

from bench.heap import Heap
from service.aggregation.aggregator import EventAggregator
from service.bus.base import SourceBatch
from service.checkpoints.base import PartitionCheckpoint
from service.config import AggregationConfig
from service.core.clock import ManualClock
from service.metrics.collector import MetricsCollector

T0 = 1_699_999_980.0
SPAN_S = 1200.0
FUNCS = ("sum", "avg", "min", "max", "count", "first", "last", "stddev", "p50", "p99")


def events(n: int, names: int, seed: int = 1) -> list[list[bytes]]:
    """Batches of 1,000 records for 4 partitions (a name always in the same one)."""
    rng = random.Random(seed)
    per: list[list[bytes]] = [[] for _ in range(4)]
    for i in range(n):
        k = rng.randrange(names)
        ev = {
            "name": f"sensor-{k}",
            "agg_func": FUNCS[k % len(FUNCS)],
            "value": round(rng.uniform(-1000, 1000), 6),
            "timestamp": T0 + SPAN_S * i / n,
        }
        per[k % 4].append(orjson.dumps(ev))
    return per


def measure(
    per: list[list[bytes]],
    interval: float,
    hop: float | None,
    *,
    collect: bool = False,
    lateness: float = 0.0,
) -> tuple[int, int]:
    """(peak, mean) bytes of open state over the batches."""
    clock = ManualClock(T0 + SPAN_S + 3600)
    cfg = AggregationConfig(interval_s=interval, hop_s=hop, allowed_lateness_s=lateness)
    agg = EventAggregator(cfg, MetricsCollector(clock), clock)
    agg.restore([PartitionCheckpoint(f"p{i}", None, None) for i in range(len(per))])
    feed = [
        SourceBatch(f"p{i}", recs[j : j + 1000], "bench", None, T0, None, False)
        for j in range(0, max(len(r) for r in per), 1000)
        for i, recs in enumerate(per)
    ]
    with Heap(collect=collect) as heap:
        for b in feed:
            agg.process(b)  # outputs dropped at once
            heap.sample()
    return heap.peak, heap.mean


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("-n", type=int, default=200_000)
    ap.add_argument("--interval", type=float, default=60.0)
    ap.add_argument("--hop", type=float, default=10.0)
    ap.add_argument("--names", type=int, default=1000)
    ap.add_argument("--lateness", type=float, default=0.0, help="AGGREGATION_ALLOWED_LATENESS")
    ap.add_argument(
        "--collect",
        action="store_true",
        help="sample after a full collection (also empties CPython's free lists)",
    )
    args = ap.parse_args()
    per = events(args.n, args.names)
    late = args.lateness
    t_peak, t_mean = measure(per, args.interval, None, collect=args.collect, lateness=late)
    h_peak, h_mean = measure(per, args.interval, args.hop, collect=args.collect, lateness=late)
    print(f"{args.n:,} events, {args.names} names, interval {args.interval:g} s", end="")
    print(f", allowed lateness {late:g} s" if late else "")
    print(f"tumbling:     peak {t_peak / 1e6:8.2f} MB  mean {t_mean / 1e6:8.2f} MB")
    print(f"hop {args.hop:<6g}    peak {h_peak / 1e6:8.2f} MB  mean {h_mean / 1e6:8.2f} MB")
    print(f"ratio: peak {h_peak / t_peak:.2f}x  mean {h_mean / t_mean:.2f}x")


if __name__ == "__main__":
    main()
