"""The configuration's frozen sections: each component receives only its own."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from service.config.archive import ArchiveConfig
from service.config.masking import Secret, mask_password, plain
from service.core.retry import BackoffKind
from service.routes.rules import Routes

__all__ = [
    "AggregationConfig",
    "ArchiveConfig",
    "BusConfig",
    "ClusterSecurity",
    "Config",
    "HttpServerConfig",
    "KafkaConfig",
    "KafkaSecurity",
    "LogConfig",
    "PostgresConfig",
    "RuntimeConfig",
]


@dataclass(frozen=True, slots=True)
class ClusterSecurity:
    """How the clients of one Kafka cluster authenticate: its SASL and SSL settings."""

    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] | None = None
    sasl_username: str | None = None
    sasl_password: Secret = Secret("")
    ssl_cafile: str | None = None
    ssl_certfile: str | None = None
    ssl_keyfile: str | None = None


@dataclass(frozen=True, slots=True)
class KafkaConfig(ClusterSecurity):
    """Kafka client settings shared by the Kafka bus and the Kafka sink: the output
    cluster's brokers and security (KAFKA_*), and the output topics."""

    bootstrap_servers: tuple[str, ...] = ("localhost:9092",)
    topic: str = "aggregated-events"  # KAFKA_TOPIC
    dlq_topic: str = "aggregated-events.dlq"  # KAFKA_DLQ_TOPIC (default <topic>.dlq)
    linger_ms: int = 20  # KAFKA_LINGER_MS
    max_request_size: int = 1_048_576  # KAFKA_MAX_REQUEST_SIZE, bytes


@dataclass(frozen=True, slots=True)
class KafkaSecurity(ClusterSecurity):
    """SASL/SSL settings of the bus cluster's clients (VABUS_KAFKA_*), kept apart from
    the output cluster's (KAFKA_*) so that neither's credentials reach the other."""

    # True when no VABUS_KAFKA_* security variable is set and the bus's brokers are
    # exactly KAFKA_BOOTSTRAP_SERVERS: one cluster, so the KAFKA_* settings are used
    inherited: bool = False


@dataclass(frozen=True, slots=True)
class BusConfig:
    """VABUS_URL and what it implies. ``kind`` comes from the URL scheme."""

    url: str = "demo://?rate=1000&names=50"  # shown without credentials
    kind: Literal["http", "kafka", "demo"] = "demo"
    token: Secret = Secret("")  # VABUS_TOKEN
    # http(s)://host:port[/base]
    http_base_url: str = ""
    http_batch_limit: int = 5000  # VABUS_BATCH_LIMIT: events asked for per request
    http_wait_s: float = 5.0  # VABUS_WAIT: long-poll wait the server may use
    http_timeout_s: float = 30.0  # VABUS_TIMEOUT: per request, beyond the wait
    # kafka://host:port[,host:port]/<topic>?group=<id>&metrics_topic=<t>
    kafka_bootstrap_servers: tuple[str, ...] = ()
    kafka_topic: str = "vabus-events"
    kafka_group: str = "vabus-aggregator"
    kafka_metrics_topic: str = "vabus-metrics"
    kafka_session_timeout_ms: int = 10_000  # VABUS_KAFKA_SESSION_TIMEOUT_MS
    # ?repartition=true: the input is not keyed by event name; route every event by name
    # through the internal topic first (service/repartition/router.py)
    kafka_repartition: bool = False
    # VABUS_KAFKA_SECURITY_PROTOCOL, VABUS_KAFKA_SASL_*, VABUS_KAFKA_SSL_*: how the bus,
    # its metrics producer, the repartition topic and the Kafka checkpoint store connect
    kafka_security: KafkaSecurity = field(default_factory=KafkaSecurity)
    # demo://?rate=<events/s>&names=<n>
    demo_rate: float = 1000.0
    demo_names: int = 50
    max_message_bytes: int = 1_048_576  # VABUS_MAX_MESSAGE_BYTES: larger -> too_large
    # VABUS_MAX_RESPONSE_BYTES: HTTP, bytes read per answer (after decompression)
    max_response_bytes: int = 8 * 1_048_576
    # VABUS_MAX_EVENTS_PER_MESSAGE: elements of one message past this -> one too_large
    max_events_per_message: int = 100_000


@dataclass(frozen=True, slots=True)
class PostgresConfig:
    dsn: Secret = Secret("")  # POSTGRES_DSN (alias POSTGRES_CONNECTION_STRING)
    table: str = "aggregated_events"  # POSTGRES_TABLE
    dead_letter_table: str = "dead_letters"
    pool_min_size: int = 1  # POSTGRES_POOL_MIN
    pool_max_size: int = 4  # POSTGRES_POOL_MAX


@dataclass(frozen=True, slots=True)
class AggregationConfig:
    interval_s: float = 60.0  # AGGREGATION_INTERVAL
    grace_s: float = 0.0  # AGGREGATION_GRACE
    max_future_s: float = 3600.0  # AGGREGATION_MAX_FUTURE
    # AGGREGATION_MAX_WATERMARK_LEAD: an event further ahead of the clock is aggregated
    # but does not move its partition's event time (one bad clock cannot make the
    # on-time events late); 0 <= lead <= max_future_s
    max_watermark_lead_s: float = 60.0
    # AGGREGATION_IDLE_TIMEOUT: quiet time after which open windows are flushed.
    # Default (None) means interval + grace: with the 1 s tick a silent stream's windows
    # come out within interval + grace + 10 s of its last message.
    idle_timeout_s: float | None = None
    max_open_windows: int = 1_000_000  # AGGREGATION_MAX_OPEN_WINDOWS (cardinality budget)
    # AGGREGATION_GROUP_BY: tag keys that split a name into series (contract §12.3);
    # empty: tags are ignored like any other extra field
    group_by: tuple[str, ...] = ()
    # AGGREGATION_MAX_SERIES_PER_NAME: tag sets of one name in one window; events of
    # further tag sets go to the name's overflow series (never dead-lettered)
    max_series_per_name: int = 1000
    # AGGREGATION_ALLOWED_LATENESS: an emitted window stays correctable until its
    # partition's watermark passes window_end + this; 0: late events are dead letters
    allowed_lateness_s: float = 0.0
    # AGGREGATION_ROLLUPS: longer windows merged from the finished ones below them
    # (contract §12.6), strictly increasing, each a multiple of the one before; () none
    rollups_s: tuple[float, ...] = ()
    # AGGREGATION_HOP: windows of interval_s start at every multiple of it (hopping
    # windows, state per hop-sized pane: docs/hopping.md); None: interval_s (tumbling)
    hop_s: float | None = None

    @property
    def pane_s(self) -> float:
        """The length of a pane, the unit of state: the hop (the interval when tumbling)."""
        return self.interval_s if self.hop_s is None else self.hop_s

    @property
    def effective_idle_timeout_s(self) -> float:
        if self.idle_timeout_s is not None:
            return self.idle_timeout_s
        return self.interval_s + self.grace_s


@dataclass(frozen=True, slots=True)
class HttpServerConfig:
    host: str = "0.0.0.0"  # HTTP_HOST  # noqa: S104 - a container serves every interface
    port: int = 8080  # HTTP_PORT
    # HTTP_AUTH_TOKEN: when set, /, /status and /metrics need "Authorization: Bearer
    # <token>"; /healthz and /readyz stay open for probes
    auth_token: Secret = Secret("")


@dataclass(frozen=True, slots=True)
class LogConfig:
    level: str = "INFO"  # LOG_LEVEL
    format: Literal["json", "text"] = "text"  # LOG_FORMAT


@dataclass(frozen=True, slots=True)
class RuntimeConfig:
    shutdown_timeout_s: float = 30.0  # SHUTDOWN_TIMEOUT
    metrics_interval_s: float = 10.0  # METRICS_INTERVAL
    checkpoint_interval_s: float = 1.0  # CHECKPOINT_INTERVAL
    state_dir: str = "./state"  # STATE_DIR: local checkpoints when PostgreSQL is not an output
    queue_size: int = 64  # HUB_QUEUE_SIZE: batches buffered between stages
    sink_batch_size: int = 5000  # SINK_BATCH_SIZE: aggregates per sink write
    retry_backoff: BackoffKind = "exponential"  # RETRY_BACKOFF: output retry policy
    retry_initial_s: float = 0.2  # RETRY_INITIAL: first retry delay
    retry_max_s: float = 30.0  # RETRY_MAX: longest retry delay
    # READINESS_STALL_TIMEOUT: /readyz fails for a partition with unread data that has
    # delivered nothing for this long
    readiness_stall_s: float = 60.0
    # READINESS_OUTPUT_FAILING_TIMEOUT: /readyz fails for an output whose writes have
    # been failing for this long (0: at the first failure)
    readiness_output_failing_s: float = 0.0
    # WORKERS (or `run --workers N`): worker processes under one supervisor (Kafka bus
    # only); 1 runs the service in-process
    workers: int = 1
    # VABUS_SOURCE_QUEUE: with several sources, batches buffered per source between its
    # intake task and the hub (a full one holds up that source only)
    source_queue_size: int = 16


@dataclass(frozen=True, slots=True)
class Config:
    bus: BusConfig = field(default_factory=BusConfig)
    outputs: tuple[Literal["kafka", "postgres"], ...] = ("kafka",)  # STORAGE_TYPE
    kafka: KafkaConfig = field(default_factory=KafkaConfig)
    postgres: PostgresConfig = field(default_factory=PostgresConfig)
    aggregation: AggregationConfig = field(default_factory=AggregationConfig)
    http: HttpServerConfig = field(default_factory=HttpServerConfig)
    log: LogConfig = field(default_factory=LogConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    routes: Routes = field(default_factory=Routes)  # ROUTES_FILE (docs/routes.md)
    archive: ArchiveConfig = field(default_factory=ArchiveConfig)  # ARCHIVE_URL
    # VABUS_URL's sources after the first (contract §12.8); ``bus`` is source 1
    more_sources: tuple[BusConfig, ...] = ()

    @property
    def sources(self) -> tuple[BusConfig, ...]:
        """Every source of VABUS_URL, source 1 (``bus``) first."""
        return (self.bus, *self.more_sources)

    def redacted(self) -> dict[str, Any]:
        """A JSON-able view for ``/status`` and start-up logs.

        Secrets read ``"***"`` when set and ``""`` when not; the PostgreSQL DSN keeps
        user, host and database but its password is masked.
        """
        view: dict[str, Any] = plain(self)
        view["postgres"]["dsn"] = mask_password(self.postgres.dsn.value)
        return view
