"""Factories: turn configuration into concrete buses, sinks and checkpoint stores."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from service.bus.base import Bus
from service.checkpoints.base import CheckpointStore
from service.config import BusConfig, Config
from service.core.clock import Clock
from service.metrics.collector import MetricsCollector
from service.pipeline.sender import ReadBackSink, SharedTransaction
from service.routes.matching import Router
from service.sinks.base import Sink

if TYPE_CHECKING:
    from service.lease.fence import LeaseFence
    from service.lease.postgres import PostgresLease

__all__ = [
    "OutputWiring",
    "build_bus",
    "build_lease",
    "build_outputs",
    "build_source",
    "checkpoint_namespace",
]


def build_bus(cfg: Config, metrics: MetricsCollector, clock: Clock) -> Bus:
    """The bus of VABUS_URL: its one source's, or a :class:`MultiBus` over several, each
    source's bus reporting through its own view of ``metrics`` (label ``source``)."""
    if not cfg.more_sources:
        return build_source(cfg, cfg.bus, metrics.for_source(1), clock)
    from service.bus.multi import MultiBus

    buses = [
        (build_source(cfg, source, metrics.for_source(k), clock), source.url)
        for k, source in enumerate(cfg.sources, start=1)
    ]
    return MultiBus(
        buses,
        clock,
        queue_size=cfg.runtime.source_queue_size,
        idle_timeout_s=cfg.aggregation.effective_idle_timeout_s,
    )


def build_source(cfg: Config, source: BusConfig, metrics: MetricsCollector, clock: Clock) -> Bus:
    if source.kind == "http":
        from service.bus.http import HttpBus

        return HttpBus(source, metrics, clock)
    if source.kind == "kafka" and source.kafka_repartition:
        from service.repartition.router import build_repartitioned_bus

        return build_repartitioned_bus(source, cfg.kafka, cfg.aggregation, metrics, clock)
    if source.kind == "kafka":
        from service.bus.kafka import KafkaBus

        return KafkaBus(source, cfg.kafka, metrics, clock)
    from service.bus.demo import DemoBus

    return DemoBus(source, metrics, clock)


def build_lease(cfg: Config, clock: Clock) -> PostgresLease | None:
    """The lease that makes one instance of an HTTP bus its only reader, or None.

    Only the HTTP bus needs one: a Kafka bus shares its partitions through the consumer
    group, and each demo bus generates a stream of its own. The lease lives where the
    checkpoints do, so that whoever takes it over can continue from the last one: a
    PostgreSQL advisory lock when PostgreSQL is an output. Without PostgreSQL the HTTP
    bus checkpoints to a local file, which a standby on another machine could not read:
    there is no lease, and a second instance on the same HTTP bus is not supported (it
    would read the stream a second time, or half of it from a queue-like server).
    Neither is it with several sources (docs/sources.md): their Kafka sources share
    partitions through their groups, but nothing leases their HTTP sources yet.
    """
    if cfg.more_sources or cfg.bus.kind != "http" or "postgres" not in cfg.outputs:
        return None
    from service.lease.postgres import PostgresLease

    return PostgresLease(cfg.postgres.dsn.value, checkpoint_namespace(cfg), clock)


def checkpoint_namespace(cfg: Config) -> str:
    """Identifies one logical input, so two services sharing a store never mix states.
    With several sources, source 1's: its checkpoints stay valid when sources are added
    after it, and the others' partition ids are qualified (service.bus.sources)."""
    b = cfg.bus
    if b.kind == "kafka":
        return f"kafka:{b.kafka_topic}:{b.kafka_group}"
    if b.kind == "http":
        return f"http:{b.http_base_url}"
    return "demo"


def build_router(cfg: Config) -> Router | None:
    """ROUTES_FILE's rules for the sinks; None without rules (nothing changes then)."""
    if not cfg.routes:
        return None
    return Router(
        cfg.routes,
        outputs=cfg.outputs,
        kafka_topic=cfg.kafka.topic,
        postgres_table=cfg.postgres.table,
    )


@dataclass(frozen=True, slots=True)
class OutputWiring:
    sinks: list[Sink]
    store: CheckpointStore
    shared_transaction: SharedTransaction | None
    read_back: list[ReadBackSink] = field(default_factory=list)


def build_outputs(
    cfg: Config, metrics: MetricsCollector, clock: Clock, fence: LeaseFence | None = None
) -> OutputWiring:
    """The sinks STORAGE_TYPE names and the checkpoint store that goes with them.

    Checkpoints live in the cluster, so partitions move between the instances of a
    consumer group with their state: in PostgreSQL when it is an output (they then
    commit inside the PostgreSQL sink's write transaction), otherwise, on the Kafka
    bus, in the group's checkpoint topic. Only a single reader (HTTP or demo bus)
    keeps them in a local file in STATE_DIR. ``fence`` (the lease's, when a lease
    guards the bus) is checked in every PostgreSQL write transaction.
    """
    sinks: list[Sink] = []
    read_back: list[ReadBackSink] = []
    router = build_router(cfg)
    if "kafka" in cfg.outputs:
        from service.sinks.kafka import KafkaSink

        kafka_sink = KafkaSink(cfg.kafka, metrics, clock, router=router)
        sinks.append(kafka_sink)
        read_back.append(kafka_sink)
    namespace = checkpoint_namespace(cfg)
    if "postgres" in cfg.outputs:
        from service.checkpoints.postgres import PostgresCheckpointStore
        from service.sinks.postgres import PostgresSink

        pg_sink = PostgresSink(
            cfg.postgres, metrics, clock, fence=fence, dedup_scope=namespace, router=router
        )
        pg_store = PostgresCheckpointStore(cfg.postgres.dsn.value, namespace, fence=fence)
        sinks.append(pg_sink)
        return OutputWiring(sinks, pg_store, SharedTransaction(pg_sink, pg_store), read_back)
    if cfg.bus.kind == "kafka":
        from service.checkpoints.kafka import KafkaCheckpointStore, checkpoint_topic
        from service.kafka.options import bus_client_options

        options = bus_client_options(cfg.bus, cfg.kafka)
        topic = checkpoint_topic(cfg.bus.kafka_group)
        store = KafkaCheckpointStore(options, topic, namespace)
        return OutputWiring(sinks, store, None, read_back)
    from service.checkpoints.file import FileCheckpointStore

    return OutputWiring(
        sinks, FileCheckpointStore(cfg.runtime.state_dir, namespace), None, read_back
    )
