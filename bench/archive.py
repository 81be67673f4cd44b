"""ARCHIVE: the cost of ``ARCHIVE_URL`` in-process, on the hot-path workload.

``python -m bench.archive [-n N] [-r R] [--batch B] [--every K]``

Alternates, ``R`` times each, the aggregator alone (as ``bench.hotpath``) and the
aggregator with an archive: every batch through the capturing reference step, and every
``K`` batches (about a 1 s checkpoint at 100k events/s with the default batch) the
buffered rows taken as at a checkpoint and written by the archive writer into a
temporary directory (Parquet encoding, atomic writes, fsync). Reports events per
CPU-second (``time.process_time``: the writer's threads count too) for each, and the
emitted aggregates are checked against the workload's expected results both ways.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.check import check
from bench.hotpath import batches, output_records, w_end
from bench.workload import Workload, generate
from service.aggregation.aggregator import EventAggregator
from service.archive.stores import DirectoryStore
from service.archive.writer import ArchiveWriter
from service.bus.base import SourceBatch
from service.checkpoints.base import PartitionCheckpoint
from service.config import AggregationConfig
from service.core.clock import ManualClock
from service.metrics.collector import MetricsCollector


async def run_once(
    w: Workload, feed: list[SourceBatch], root: Path | None, every: int
) -> tuple[float, list[dict[str, Any]], int]:
    clock = ManualClock(start=w_end(w) + 600)
    metrics = MetricsCollector(clock)
    cfg = AggregationConfig(interval_s=60.0)
    agg = EventAggregator(cfg, metrics, clock, archive=root is not None)
    writer = None if root is None else ArchiveWriter(DirectoryStore(str(root)), metrics)
    agg.restore([PartitionCheckpoint(b.partition, None, None) for b in feed[: w.partitions]])
    t0 = time.process_time()
    emitted = []
    for i, b in enumerate(feed):
        emitted.extend(agg.process(b).aggregates)
        if writer is not None and (i % every == every - 1 or i == len(feed) - 1):
            slices = agg.archived(agg.snapshot())
            await writer.write(slices or [])
    took = time.process_time() - t0
    files = 0 if root is None else len(list(root.rglob("*.parquet")))
    return took, output_records(emitted), files


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("-n", type=int, default=300_000)
    ap.add_argument("-r", type=int, default=3)
    ap.add_argument("--batch", type=int, default=5000, help="records per SourceBatch")
    ap.add_argument("--every", type=int, default=20, help="batches per checkpoint")
    args = ap.parse_args()
    w = generate(args.n)
    feed = batches(w, args.batch)
    rates: dict[str, list[float]] = {"without": [], "with": []}
    files = 0
    for rep in range(args.r):
        for kind in ("without", "with"):
            with tempfile.TemporaryDirectory() as tmp:
                root = None if kind == "without" else Path(tmp) / "archive"
                took, records, n = asyncio.run(run_once(w, feed, root, args.every))
            if not check(records, w.expected)["ok"]:
                print(f"WRONG RESULT {kind} the archive", file=sys.stderr)
                sys.exit(1)
            files = max(files, n)
            rates[kind].append(args.n / took)
            print(f"rep {rep + 1} {kind} archive: {args.n / took:,.0f} ev/CPU-s", flush=True)
    med = {k: sorted(v)[len(v) // 2] for k, v in rates.items()}
    print(
        f"median without {med['without']:,.0f} ev/CPU-s, with {med['with']:,.0f} ev/CPU-s "
        f"({med['with'] / med['without'] - 1:+.0%}; {files} files; n={args.n:,}, "
        f"batch={args.batch}, a checkpoint every {args.every} batches, {args.r} reps, correct)"
    )


if __name__ == "__main__":
    main()
