"""Coverage-guided fuzzing of the input path with atheris (not part of `make test`).

    .venv/bin/pip install atheris          # or: pip install -e '.[fuzz]'
    .venv/bin/python tests/fuzz/fuzz_aggregator.py -max_total_time=60 [corpus_dir]

Each input is split into transport messages and fed to ``EventAggregator.process`` as
one Kafka-like batch, then flushed and checkpointed. The process must never raise, and
every element must be either aggregated or dead-lettered with a contract reason; a
violation stops the run with the input that caused it (libFuzzer writes it to
``crash-*``). The pytest twin, with hypothesis, is tests/unit/test_fuzz_decode.py.
"""

from __future__ import annotations

import json
import sys

import atheris
import orjson

with atheris.instrument_imports():
    from service.aggregation.aggregator import EventAggregator
    from service.bus.base import SourceBatch
    from service.config import AggregationConfig
    from service.core.clock import ManualClock
    from service.core.events import REJECT_REASONS
    from service.metrics.collector import MetricsCollector

NOW = 1_700_000_000.0
MAX_BYTES = 4096


def events_in(record: bytes) -> int:
    """Events in one message, decided apart from the code: an undecodable or oversized
    message is one (dead letter), an array is its length, anything else one."""
    if len(record) > MAX_BYTES:
        return 1
    try:
        decoded = orjson.loads(record)
    except orjson.JSONDecodeError:
        try:
            decoded = json.loads(record)
        except (ValueError, RecursionError):
            return 1
    return len(decoded) if type(decoded) is list else 1


def one_input(data: bytes) -> None:
    clock = ManualClock(NOW)
    metrics = MetricsCollector(clock)
    aggregator = EventAggregator(
        AggregationConfig(interval_s=10.0, max_open_windows=100),
        metrics,
        clock,
        max_message_bytes=MAX_BYTES,
    )
    records = data.split(b"\n")  # newline-separated messages: lets the fuzzer build batches
    out = aggregator.process(
        SourceBatch("p0", records, "fuzz", "1", NOW, list(range(len(records))))
    )
    clock.advance(30.0)
    out.extend(aggregator.process(SourceBatch("p0", [], "fuzz", None, NOW, caught_up=True)))
    aggregator.snapshot()
    if any(d.reason not in REJECT_REASONS for d in out.dead_letters):
        raise AssertionError(f"unknown reason in {out.dead_letters!r}")
    if metrics.events_aggregated + len(out.dead_letters) != sum(map(events_in, records)):
        raise AssertionError("an element was neither aggregated nor dead-lettered")


def main() -> None:
    atheris.Setup(sys.argv, one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
