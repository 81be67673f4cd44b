"""REPLAY: reading and recomputing one hour of an archive, in-process.

``python -m bench.replay [-n N] [--names K] [-r R]``

Writes one hour of ``N`` events (``sum``, ``K`` names, 4 partitions, a file per 50,000
events of a partition, like checkpoints) into a temporary archive directory, then runs
the replay's read-and-recompute step (``service.replay.command.recomputed``, 60 s
windows) ``R`` times. Reports events per CPU-second; the aggregates' counts are checked
against the input.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import random
import statistics
import tempfile
import time
from pathlib import Path

from service.archive.layout import data_name
from service.archive.parquet import by_hour
from service.archive.rows import Rows
from service.archive.stores import DirectoryStore
from service.config import AggregationConfig
from service.replay.command import Summary, recomputed
from service.replay.progress import Progress
from service.replay.span import ReplaySpan

START = 1_699_999_200.0  # the start of an hour
PARTS = 4
PER_FILE = 50_000


def write_archive(root: Path, n: int, names: int) -> None:
    rnd = random.Random(1)
    per = n // PARTS
    for p in range(PARTS):
        for first in range(0, per, PER_FILE):
            rows = Rows()
            for i in range(first, min(per, first + PER_FILE)):
                name = f"name{rnd.randrange(names)}"
                rows.add(name, "sum", rnd.random(), START + 3600 * i / per, None)
            for hour, data in by_hour(rows, f"t:{p}").items():
                path = root / data_name(hour, f"t:{p}", str(first), str(first + PER_FILE))
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(data)


def run_once(root: Path) -> tuple[float, int]:
    summary = Summary()
    cfg = AggregationConfig(interval_s=60.0)
    span = ReplaySpan(START, START + 3600)
    progress = Progress(io.StringIO(), tty=False)
    cpu = time.process_time()
    fresh = asyncio.run(recomputed(DirectoryStore(str(root)), cfg, span, 0.0, summary, progress))
    cpu = time.process_time() - cpu
    return summary.events / cpu, sum(a.count for a in fresh)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("-n", type=int, default=1_000_000, help="events (1,000,000)")
    ap.add_argument("--names", type=int, default=1000, help="distinct names (1000)")
    ap.add_argument("-r", type=int, default=3, help="runs (3)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-replay-") as tmp:
        root = Path(tmp)
        write_archive(root, args.n, args.names)
        rates = []
        for _ in range(args.r):
            rate, counted = run_once(root)
            if counted != args.n // PARTS * PARTS:
                raise SystemExit(f"replay counted {counted} events, the archive holds {args.n}")
            rates.append(rate)
    print(
        f"replay, one hour of {args.n:,} events, {args.names} names: "
        f"{statistics.median(rates):,.0f} events/CPU-s median of {args.r} "
        f"({min(rates):,.0f} - {max(rates):,.0f})"
    )


if __name__ == "__main__":
    main()
