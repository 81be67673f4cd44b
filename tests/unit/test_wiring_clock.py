"""The wiring hands its one injected clock to every output: none falls back to the
system clock, so write latencies and dead-letter times follow the clock a test drives."""

from __future__ import annotations

from service.config import Config, PostgresConfig
from service.config.masking import Secret
from service.core.clock import ManualClock
from service.metrics.collector import MetricsCollector
from service.wiring import build_outputs


def test_every_output_gets_the_wirings_clock() -> None:
    clock = ManualClock(1_700_000_000.0)
    config = Config(
        outputs=("kafka", "postgres"),
        postgres=PostgresConfig(dsn=Secret("postgresql://u@127.0.0.1:1/db")),
    )
    outputs = build_outputs(config, MetricsCollector(clock), clock)
    assert sorted(s.name for s in outputs.sinks) == ["kafka", "postgres"]
    assert all(getattr(s, "_clock", None) is clock for s in outputs.sinks)
