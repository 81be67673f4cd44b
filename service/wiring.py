"""Factories: turn configuration into concrete buses, sinks and checkpoint stores."""

from __future__ import annotations

from service.bus.base import Bus
from service.checkpoints.base import CheckpointStore
from service.clock import Clock
from service.config import Config
from service.ops.metrics import MetricsCollector
from service.sinks.base import Sink

__all__ = ["build_bus", "build_sinks", "build_store", "checkpoint_namespace"]


def build_bus(cfg: Config, metrics: MetricsCollector, clock: Clock) -> Bus:
    if cfg.bus.kind == "http":
        from service.bus.http import HttpBus

        return HttpBus(cfg.bus, metrics, clock)
    if cfg.bus.kind == "kafka":
        from service.bus.kafka import KafkaBus

        return KafkaBus(cfg.bus, cfg.kafka, metrics, clock)
    from service.bus.demo import DemoBus

    return DemoBus(cfg.bus, metrics, clock)


def build_sinks(cfg: Config, metrics: MetricsCollector) -> list[Sink]:
    sinks: list[Sink] = []
    if "kafka" in cfg.outputs:
        from service.sinks.kafka import KafkaSink

        sinks.append(KafkaSink(cfg.kafka, metrics))
    if "postgres" in cfg.outputs:
        from service.sinks.postgres import PostgresSink

        sinks.append(PostgresSink(cfg.postgres, metrics))
    return sinks


def checkpoint_namespace(cfg: Config) -> str:
    """Identifies one logical input, so two services sharing a store never mix states."""
    b = cfg.bus
    if b.kind == "kafka":
        return f"kafka:{b.kafka_topic}:{b.kafka_group}"
    if b.kind == "http":
        return f"http:{b.http_base_url}"
    return "demo"


def build_store(cfg: Config) -> CheckpointStore:
    """PostgreSQL when it is an output (shared by every instance of a consumer group, so
    partitions can move between machines); otherwise a file in STATE_DIR.

    The PostgreSQL store is built from the same DSN as the PostgreSQL sink, which is how
    the DataSender recognises that checkpoints can commit in the sink's transaction."""
    namespace = checkpoint_namespace(cfg)
    if "postgres" in cfg.outputs:
        from service.checkpoints.postgres import PostgresCheckpointStore

        return PostgresCheckpointStore(cfg.postgres.dsn.value, namespace)
    from service.checkpoints.file import FileCheckpointStore

    return FileCheckpointStore(cfg.runtime.state_dir, namespace)
