"""HOT PATH: the aggregator alone, in-process, on the benchmark workload (no I/O).

``python -m bench.hotpath [-n N] [-r R] [--batch B] [--tags [S]] [--hop H] [--rollups L,..]``
``[--source-rule] [--profile]``

Feeds the workload's JSON texts as Kafka-like ``SourceBatch`` objects (``bytes``
records with offsets, per partition, ``batch`` records each) through
:class:`EventAggregator.process`, and reports events per CPU-second
(``time.process_time``) over ``R`` repetitions with a fresh aggregator each. The
emitted aggregates are checked against the workload's expected results, so a fast but
wrong change fails here too. ``--profile`` runs one
repetition under cProfile and prints the top functions.

``--tags S``: every event also carries ``"tags": {"host": ..., "region": ..., "rack": ...}``
(``rack`` is not grouped by) and the aggregator runs with
``AGGREGATION_GROUP_BY=host,region``: ``S`` series per name (default 1: the cost of
tags alone, with as many aggregates as without). With ``S`` > 1 each (name, window) has
about 50 events, so most of them open a key: that measures the cost of ``S`` times the
keys. The series of a name and window are merged back (sum, count, min, max; avg
weighted) for the check.

``--hop H``: hopping windows (``AGGREGATION_HOP=H``, docs/hopping.md): 60 / H times the
windows; those starting at a multiple of 60 (the tumbling ones) are checked.
``--rollups L[,L2]``: the aggregator runs with ``AGGREGATION_ROLLUPS`` (e.g. ``600`` or
``600,1200`` over the workload's 20 minutes of 60 s windows); the base windows are
checked as before, the rollup rows come on top (the cost of one or two levels).
``--source-rule``: the partitions are source 2's of three (``s2/...``) and a routing rule
``{match: ["*"], source: 2}`` marks every event's series at intake (docs/routes.md,
"Sources"): the cost of deciding routes per event, at its worst.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import sys
import time
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import orjson

from bench.check import check
from bench.workload import Workload, generate
from service.aggregation.aggregator import EventAggregator
from service.bus.base import SourceBatch
from service.checkpoints.base import PartitionCheckpoint
from service.config import AggregationConfig
from service.core.clock import ManualClock
from service.core.events import Aggregate, iso_utc
from service.metrics.collector import MetricsCollector

if TYPE_CHECKING:
    from service.aggregation.source_marks import SourceMarks


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


GROUP_BY = ("host", "region")


def with_tags(w: Workload, series: int) -> None:
    """Give every data event two group-by tags and one other (see the module doc)."""
    tagged = []
    for i, (value, k) in enumerate(zip(w.values, w.name_index, strict=True)):
        ev = orjson.loads(value)
        s = k + i % series
        ev["tags"] = {"host": f"host-{s % 100}", "region": ("eu", "us", "ap")[s % 3], "rack": i}
        tagged.append(orjson.dumps(ev))
    w.values = tagged


def merged(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The series of each name and window merged into one record, as without tags."""
    out: dict[tuple[str, str], dict[str, Any]] = {}
    for r in records:
        key = (r["name"], r["window_start"])
        m = out.get(key)
        if m is None:
            out[key] = dict(r)
            continue
        func, n, v = r["agg_func"], r["count"], r["value"]
        if func == "sum":
            m["value"] += v
        elif func == "min":
            m["value"] = min(m["value"], v)
        elif func == "max":
            m["value"] = max(m["value"], v)
        else:
            m["value"] = (m["value"] * m["count"] + v * n) / (m["count"] + n)
        m["count"] += n
    return list(out.values())


def run_once(
    w: Workload,
    feed: list[SourceBatch],
    group_by: tuple[str, ...] = (),
    hop: float | None = None,
    rollups: tuple[float, ...] = (),
    marks: SourceMarks | None = None,
) -> tuple[float, list[dict[str, Any]]]:
    clock = ManualClock(start=w_end(w) + 600)
    cfg = AggregationConfig(interval_s=60.0, group_by=group_by, hop_s=hop, rollups_s=rollups)
    agg = EventAggregator(cfg, MetricsCollector(clock), clock, marks=marks)
    agg.restore([PartitionCheckpoint(b.partition, None, None) for b in feed[: w.partitions]])
    t0 = time.process_time()  # CPU time: less sensitive to other load on the machine
    emitted = []
    for b in feed:
        emitted.extend(agg.process(b).aggregates)
    took = time.process_time() - t0
    # the base windows (rollups on top); with --hop the tumbling ones among them
    base = [
        a for a in emitted if a.window_end - a.window_start == 60.0 and a.window_start % 60.0 == 0.0
    ]
    return took, output_records(base)


def output_records(aggregates: Iterable[Aggregate]) -> list[dict[str, Any]]:
    """Aggregates as bench.check reads them (the fields of the Kafka output it judges)."""
    return [
        {
            "name": a.name,
            "agg_func": a.agg_func,
            "value": a.value,
            "count": a.count,
            "window_start": iso_utc(a.window_start),
            "window_end": iso_utc(a.window_end),
        }
        for a in aggregates
    ]


def w_end(w: Workload) -> float:
    return 1_699_999_980 + 1200 + 120


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("-n", type=int, default=1_000_000)
    ap.add_argument("-r", type=int, default=5)
    ap.add_argument("--batch", type=int, default=5000, help="records per SourceBatch")
    ap.add_argument(
        "--tags",
        type=int,
        nargs="?",
        const=1,
        default=0,
        metavar="S",
        help="events with 2 group-by tags, S series per name (default 1)",
    )
    ap.add_argument("--hop", type=float, default=None, help="AGGREGATION_HOP (seconds)")
    ap.add_argument(
        "--rollups",
        type=lambda v: tuple(float(x) for x in v.split(",")),
        default=(),
        metavar="L[,L2]",
        help="AGGREGATION_ROLLUPS lengths in seconds (multiples of 60)",
    )
    ap.add_argument("--source-rule", action="store_true", help="every event marked at intake")
    ap.add_argument("--profile", action="store_true")
    args = ap.parse_args()
    w = generate(args.n)
    group_by: tuple[str, ...] = ()
    if args.tags:
        with_tags(w, args.tags)
        group_by = GROUP_BY
    feed = batches(w, args.batch)
    marks = None
    if args.source_rule:  # imported here: without it, the same modules as before
        from service.aggregation.source_marks import SourceMarks
        from service.routes.rules import Route, Routes

        rule = Route("all", ("*",), ("postgres",), source=2, postgres_table="t")
        marks = SourceMarks(Routes("bench", (rule,), sources=3))
        for b in feed:
            b.partition = f"s2/{b.partition}"
    if args.profile:
        prof = cProfile.Profile()
        prof.enable()
        run_once(w, feed, group_by, args.hop, args.rollups, marks)
        prof.disable()
        pstats.Stats(prof).sort_stats("tottime").print_stats(15)
        return
    rates = []
    for rep in range(args.r):
        took, records = run_once(w, feed, group_by, args.hop, args.rollups, marks)
        summary = check(merged(records) if group_by else records, w.expected)
        if not summary["ok"]:
            print(f"WRONG RESULT: {summary}", file=sys.stderr)
            sys.exit(1)
        rates.append(args.n / took)
        print(f"rep {rep + 1}: {took:.3f} CPU s, {args.n / took:,.0f} ev/CPU-s", flush=True)
    rates.sort()
    print(
        f"median {rates[len(rates) // 2]:,.0f} ev/CPU-s, range {rates[0]:,.0f}-{rates[-1]:,.0f} "
        f"(n={args.n:,}, batch={args.batch}, {args.r} reps, "
        f"{f'2 group-by tags, {args.tags} series per name, ' if group_by else ''}"
        f"{f'rollups {args.rollups}, ' if args.rollups else ''}"
        f"{'every event marked by a source rule, ' if marks else ''}correct)"
    )


if __name__ == "__main__":
    main()
