"""HOT PATH: the aggregator alone, in-process, on the benchmark workload (no I/O).

``python -m bench.hotpath [-n N] [-r R] [--batch B] [--profile]``

Feeds the workload's JSON texts as Kafka-like ``SourceBatch`` objects (``bytes``
records with offsets, per partition, ``batch`` records each) through
:class:`EventAggregator.process`, and reports events per CPU-second
(``time.process_time``) over ``R`` repetitions with a fresh aggregator each. The
emitted aggregates are checked against the workload's expected results, so a fast but
wrong change fails here too. ``--profile`` runs one
repetition under cProfile and prints the top functions.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import sys
import time
from typing import Any

from bench.check import check
from bench.workload import Workload, generate
from service.aggregation.aggregator import EventAggregator
from service.bus.base import SourceBatch
from service.checkpoints.base import PartitionCheckpoint
from service.config import AggregationConfig
from service.core.clock import ManualClock
from service.core.events import iso_utc
from service.metrics.collector import MetricsCollector


def batches(w: Workload, size: int) -> list[SourceBatch]:
    """Per-partition batches in the order a consumer would see them (round-robin)."""
    per: list[list[bytes]] = [[] for _ in range(w.partitions)]
    for value, k in zip(w.values, w.name_index, strict=True):
        per[w.partition_of(k)].append(value)
    for p in per:
        p.append(w.watermark)
    out: list[SourceBatch] = []
    for start in range(0, max(len(p) for p in per), size):
        for pid, recs in enumerate(per):
            chunk = recs[start : start + size]
            if chunk:
                out.append(
                    SourceBatch(
                        partition=f"bench-events:{pid}",
                        records=chunk,
                        offsets=list(range(start, start + len(chunk))),
                        source=f"kafka bench-events/{pid}",
                        next_position=str(start + len(chunk)),
                        received_at=0.0,
                        caught_up=start + size >= len(recs),
                    )
                )
    return out


def run_once(w: Workload, feed: list[SourceBatch]) -> tuple[float, list[dict[str, Any]]]:
    clock = ManualClock(start=w_end(w) + 600)
    agg = EventAggregator(AggregationConfig(interval_s=60.0), MetricsCollector(clock), clock)
    agg.restore([PartitionCheckpoint(b.partition, None, None) for b in feed[: w.partitions]])
    t0 = time.process_time()  # CPU time: less sensitive to other load on the machine
    emitted = []
    for b in feed:
        emitted.extend(agg.process(b).aggregates)
    took = time.process_time() - t0
    records = [
        {
            "name": a.name,
            "agg_func": a.agg_func,
            "value": a.value,
            "count": a.count,
            "window_start": iso_utc(a.window_start),
            "window_end": iso_utc(a.window_end),
        }
        for a in emitted
    ]
    return took, records


def w_end(w: Workload) -> float:
    return 1_699_999_980 + 1200 + 120


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("-n", type=int, default=1_000_000)
    ap.add_argument("-r", type=int, default=5)
    ap.add_argument("--batch", type=int, default=5000, help="records per SourceBatch")
    ap.add_argument("--profile", action="store_true")
    args = ap.parse_args()
    w = generate(args.n)
    feed = batches(w, args.batch)
    if args.profile:
        prof = cProfile.Profile()
        prof.enable()
        run_once(w, feed)
        prof.disable()
        pstats.Stats(prof).sort_stats("tottime").print_stats(15)
        return
    rates = []
    for rep in range(args.r):
        took, records = run_once(w, feed)
        summary = check(records, w.expected)
        if not summary["ok"]:
            print(f"WRONG RESULT: {summary}", file=sys.stderr)
            sys.exit(1)
        rates.append(args.n / took)
        print(f"rep {rep + 1}: {took:.3f} CPU s, {args.n / took:,.0f} ev/CPU-s", flush=True)
    rates.sort()
    print(
        f"median {rates[len(rates) // 2]:,.0f} ev/CPU-s, range {rates[0]:,.0f}-{rates[-1]:,.0f} "
        f"(n={args.n:,}, batch={args.batch}, {args.r} reps, correct)"
    )


if __name__ == "__main__":
    main()
