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

Then, untraced, it runs the hopping aggregator once more and checks every window it
emits against an independent computation from the raw events (every window of
``interval`` starting at a multiple of ``hop``: sum/avg/stddev within 1e-9 relative,
the others exact), so the memory figure is that of correct output.
"""

from __future__ import annotations

import argparse
import math
import random
import statistics
from collections import defaultdict

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


Window = tuple[str, float]  # (name, window start)


def reference(
    per: list[list[bytes]], interval: float, hop: float
) -> dict[Window, list[tuple[float, float]]]:
    """Every window's events as (event time, value) pairs, in each partition's order;
    a window is ``[start, start + interval)`` for every start a multiple of ``hop``."""
    windows: dict[Window, list[tuple[float, float]]] = defaultdict(list)
    n = round(interval / hop)
    for recs in per:
        for raw in recs:
            ev = orjson.loads(raw)
            last = math.floor(ev["timestamp"] / hop) * hop
            for j in range(n):
                windows[(ev["name"], last - j * hop)].append((ev["timestamp"], ev["value"]))
    return windows


def expected_value(func: str, pairs: list[tuple[float, float]]) -> float:
    values = [v for _, v in pairs]
    if func in ("sum", "avg"):
        total = math.fsum(values)
        return total if func == "sum" else total / len(values)
    if func in ("min", "max"):
        return min(values) if func == "min" else max(values)
    if func == "count":
        return float(len(values))
    if func in ("first", "last"):
        pick = min if func == "first" else max
        return pick(enumerate(pairs), key=lambda ip: (ip[1][0], ip[0]))[1][1]
    if func == "stddev":
        return statistics.pstdev(values)
    ordered, q = sorted(values), int(func[1:]) / 100  # exact up to 10,000 values
    h = (len(ordered) - 1) * q
    lo = math.floor(h)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (h - lo) * (ordered[hi] - ordered[lo])


def verify(per: list[list[bytes]], interval: float, hop: float) -> tuple[int, int, list[str]]:
    """(windows emitted, windows expected, problems) of one untraced hopping run."""
    clock = ManualClock(T0 + SPAN_S + 3600)
    agg = EventAggregator(
        AggregationConfig(interval_s=interval, hop_s=hop), MetricsCollector(clock), clock
    )
    agg.restore([PartitionCheckpoint(f"p{i}", None, None) for i in range(len(per))])
    emitted = []
    for j in range(0, max(len(r) for r in per), 1000):
        for i, recs in enumerate(per):
            batch = SourceBatch(f"p{i}", recs[j : j + 1000], "bench", None, T0, None, False)
            emitted.extend(agg.process(batch).aggregates)
    windows = reference(per, interval, hop)
    problems = []
    for a in emitted:
        pairs = windows.get((a.name, a.window_start))
        if pairs is None or a.window_end != a.window_start + interval:
            problems.append(f"{a.name} {a.window_start}: no such window")
            continue
        want = expected_value(a.agg_func, pairs)
        tol = 1e-9 if a.agg_func in ("sum", "avg", "stddev") else 0.0
        if a.count != len(pairs) or not math.isclose(a.value, want, rel_tol=tol, abs_tol=tol):
            problems.append(f"{a.name} {a.agg_func} {a.window_start}: {a.value}/{a.count}")
    # due for certain: every window ending a hop before the last event time (the
    # watermark is the least of the partitions' latest times, just below it)
    closed = {w for w in windows if w[1] + interval <= T0 + SPAN_S - hop}
    missing = closed - {(a.name, a.window_start) for a in emitted}
    problems += [f"{w[0]} {w[1]}: not emitted" for w in sorted(missing)[:5]]
    return len(emitted), len(closed), problems


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
    emitted, closed, problems = verify(per, args.interval, args.hop)
    print(
        f"hopping output: {emitted:,} windows emitted, every one equal to the independent "
        f"computation; at least {closed:,} were due"
        if not problems
        else f"hopping output WRONG ({len(problems)}): " + "; ".join(problems[:5])
    )
    if problems:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
