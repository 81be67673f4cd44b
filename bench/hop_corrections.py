"""CPU OF CORRECTIONS with hopping windows against tumbling ones (docs/hopping.md).

``python -m bench.hop_corrections``

200,000 events of 1,000 series over 1,200 s in batches of 1,000 records, one partition,
``AGGREGATION_ALLOWED_LATENESS=120``, every ``k``-th event (after the first 20,000)
30 s late: the CPU seconds of the feed (``time.process_time``) and the corrections
applied, for tumbling windows of 60 s and with ``AGGREGATION_HOP=10``.
"""

from __future__ import annotations

import time

import orjson

from service.aggregation.aggregator import EventAggregator
from service.bus.base import SourceBatch
from service.config import AggregationConfig
from service.core.clock import ManualClock
from service.metrics.collector import MetricsCollector

T0 = 1_700_000_040.0


def run(late_every: int, hop: float | None) -> tuple[float, int]:
    """(CPU seconds, corrections applied)."""
    clock = ManualClock(T0 + 36_000)
    cfg = AggregationConfig(interval_s=60.0, hop_s=hop, allowed_lateness_s=120.0)
    agg = EventAggregator(cfg, MetricsCollector(clock), clock)
    records = []
    for i in range(200_000):
        ts = T0 + i * 0.006
        if late_every and i % late_every == 0 and i > 20_000:
            ts -= 30.0
        ev = {"name": f"s{i % 1000}", "agg_func": "sum", "value": 1.0, "timestamp": ts}
        records.append(orjson.dumps(ev))
    started = time.process_time()
    for j in range(0, len(records), 1000):
        agg.process(SourceBatch("p0", records[j : j + 1000], "bench", None, T0, None, False))
    ledger = agg.ledger()
    assert ledger["imbalance"] == 0
    return time.process_time() - started, ledger.get("late_applied", 0)


def main() -> None:
    for hop in (None, 10.0):
        for late_every in (0, 1000, 100):
            cpu, applied = run(late_every, hop)
            label = "tumbling" if hop is None else f"hop {hop:g}"
            print(f"{label:9} late every {late_every:5}: {cpu:6.2f} CPU s, {applied} corrections")


if __name__ == "__main__":
    main()
