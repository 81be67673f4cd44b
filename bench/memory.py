"""MEMORY: bytes per open window, and 1M open windows, in-process through the aggregator.

``python -m bench.memory [-n N] [--func sum] [--limit L] [--extra E]``

Feeds ``N`` events with ``N`` distinct names (``host-NNNNNNN.cpu.load``, 21 characters)
into one 60 s window, as Kafka-like batches of 10,000 JSON messages generated on the fly
(so the input itself is not counted), then reports from ``/proc/self/status``:

* RSS before and after, and (after - before) / N = **bytes per open window** (the key
  tuple, the name string, the accumulator, the dict slots);
* the peak RSS (VmHWM) of the intake, then of one checkpoint snapshot of all windows,
  then of emitting them all;
* with ``--extra E`` another E distinct names beyond ``--limit`` (the cardinality budget,
  default N): they must all be dead-lettered ``cardinality_limit`` while the open
  windows stay at the limit; the run fails (exit 1) otherwise.

Each scenario should run in a fresh process (peaks are per process).
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
from pathlib import Path

import orjson

from service.aggregation.aggregator import EventAggregator
from service.bus.base import SourceBatch
from service.config import AggregationConfig
from service.core.clock import ManualClock
from service.metrics.collector import MetricsCollector
from service.pipeline.flow import Outputs

T0 = 1_699_999_980.0
BATCH = 10_000


def status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def mb(kb: int) -> str:
    return f"{kb / 1024:,.1f} MB"


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("-n", type=int, default=1_000_000, help="distinct names (open windows)")
    ap.add_argument("--func", default="sum", help="agg_func of every event")
    ap.add_argument("--limit", type=int, default=0, help="max open windows (default: n)")
    ap.add_argument("--extra", type=int, default=0, help="distinct names beyond n")
    args = ap.parse_args()
    limit = args.limit or args.n
    total = args.n + args.extra
    clock = ManualClock(T0 + 30.0)
    agg = EventAggregator(
        AggregationConfig(interval_s=60.0, max_open_windows=limit), MetricsCollector(clock), clock
    )
    dumps = orjson.dumps
    gc.collect()
    rss0 = status_kb("VmRSS")
    t0 = time.process_time()
    rejected: dict[str, int] = {}
    for first in range(0, total, BATCH):
        records = [
            dumps(
                {
                    "name": f"host-{i:07d}.cpu.load",
                    "value": i * 0.5,
                    "timestamp": T0 + (i % 50),
                    "agg_func": args.func,
                }
            )
            for i in range(first, min(first + BATCH, total))
        ]
        out = agg.process(SourceBatch("p0", records, "bench", str(first), T0))
        for d in out.dead_letters:
            rejected[d.reason] = rejected.get(d.reason, 0) + 1
        assert not out.aggregates
    intake_cpu = time.process_time() - t0
    gc.collect()
    rss1 = status_kb("VmRSS")
    hwm_intake = status_kb("VmHWM")
    per_window = (rss1 - rss0) * 1024 / max(1, agg.open_windows)
    print(
        f"func={args.func} names={total:,} limit={limit:,} open_windows={agg.open_windows:,} "
        f"rejected={rejected}"
    )
    print(
        f"RSS before {mb(rss0)}, after {mb(rss1)}: {per_window:,.0f} bytes per open window; "
        f"intake {intake_cpu:.1f} CPU s ({total / intake_cpu:,.0f} ev/CPU-s), "
        f"peak {mb(hwm_intake)}"
    )
    t0 = time.perf_counter()
    snap = agg.snapshot()
    took = time.perf_counter() - t0
    size = sum(len(c.state or b"") for c in snap)
    del snap
    gc.collect()
    print(
        f"checkpoint snapshot: {size / 1e6:,.1f} MB of state in {took:.2f} s, "
        f"peak now {mb(status_kb('VmHWM'))}"
    )
    clock.advance(120.0)
    t0 = time.perf_counter()
    flushed = Outputs()  # every partition reports silence: the quiet rule emits all
    for partition in agg.partitions():
        flushed.extend(agg.process(SourceBatch(partition, [], "bench", None, 0.0, caught_up=True)))
    took = time.perf_counter() - t0
    print(
        f"emit all: {len(flushed.aggregates):,} aggregates in {took:.2f} s, "
        f"peak now {mb(status_kb('VmHWM'))}"
    )
    ok = agg.open_windows == 0 and len(flushed.aggregates) == min(total, limit)
    if args.extra:
        ok = ok and rejected == {"cardinality_limit": total - limit}
    print("OK" if ok else "FAILED: the cardinality limit did not hold")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
