"""``load_config``: every variable read once, at the edge, into the frozen sections."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import fields, replace
from typing import Any, Final, cast

from service.config.archive_url import read_archive
from service.config.masking import Secret
from service.config.parsers import (
    BEARER_FORM,
    DEMO_FORM,
    FILE_FORM,
    HTTP_FORM,
    KAFKA_FORM,
    LOG_FORMATS,
    LOG_LEVELS,
    MECHANISM_FORM,
    MECHANISMS,
    PROTOCOLS,
    TOPIC_FORM,
    choice,
    existing_file,
    non_empty,
    parse_auth_token,
    parse_dsn,
    parse_identifier,
    parse_outputs,
    parse_rollups,
    parse_servers,
    parse_tag_keys,
    parse_topic,
    pick,
)
from service.config.reader import Reader
from service.config.routes_file import read_routes
from service.config.sections import (
    AggregationConfig,
    BusConfig,
    ClusterSecurity,
    Config,
    HttpServerConfig,
    KafkaConfig,
    KafkaSecurity,
    LogConfig,
    PostgresConfig,
    RuntimeConfig,
)
from service.config.source_urls import SOURCES_FORM, parse_bus_urls
from service.core.errors import ConfigError
from service.core.retry import BACKOFF_KINDS

__all__ = ["load_config"]

_MIN_RESPONSE_BYTES = 1024  # an envelope with a cursor and one event must fit


def load_config(
    environ: Mapping[str, str] | None = None,
    *,
    dotenv: str | None = ".env",
    require_bus: bool = False,
) -> Config:
    """Parse the whole configuration once, or raise :class:`ConfigError` listing every
    problem (one line each: ``NAME='value': expected <form>``, secrets as ``'***'``).

    Values come from ``environ`` (default: ``os.environ``) and then from the ``dotenv``
    file (relative to the working directory, skipped when absent or ``None``); the
    environment wins. An empty value counts as unset. ``${VAR}`` is not expanded, so
    passwords may contain ``$``. Nothing here connects anywhere.

    ``require_bus`` (``run``, ``check``): VABUS_URL must be set. Without it a service
    would quietly aggregate the synthetic ``demo://`` stream into real outputs.
    """
    reader = Reader(environ, dotenv)
    config = read_config(reader)
    if require_bus and reader.raw("VABUS_URL") is None:
        reader.fail("VABUS_URL", f"{HTTP_FORM} or {KAFKA_FORM}", "it is not set")
    problems = reader.problems()
    if problems:
        raise ConfigError(problems)
    return config


def read_config(r: Reader) -> Config:
    sources = read_sources(r)
    config = Config(
        bus=sources[0],
        more_sources=sources[1:],
        outputs=r.custom(
            "STORAGE_TYPE",
            Config().outputs,
            parse_outputs,
            "kafka, postgres or kafka,postgres",
        ),
        kafka=read_kafka(r),
        postgres=read_postgres(r),
        aggregation=read_aggregation(r),
        http=read_http(r),
        log=read_log(r),
        runtime=read_runtime(r),
        archive=read_archive(r),
    )
    secured = [with_bus_security(r, bus, config.kafka) for bus in config.sources]
    config = replace(config, bus=secured[0], more_sources=tuple(secured[1:]))
    check_consistency(r, config)
    return replace(config, routes=read_routes(r, config))


def read_security(r: Reader, prefix: str) -> ClusterSecurity:
    """One cluster's SASL/SSL settings: ``{prefix}SECURITY_PROTOCOL`` and the rest."""
    d = ClusterSecurity()
    return ClusterSecurity(
        security_protocol=r.custom(
            f"{prefix}SECURITY_PROTOCOL",
            d.security_protocol,
            lambda v: pick(v.upper(), PROTOCOLS),
            "one of PLAINTEXT, SSL, SASL_PLAINTEXT, SASL_SSL",
        ),
        sasl_mechanism=r.custom(
            f"{prefix}SASL_MECHANISM",
            d.sasl_mechanism,
            lambda v: pick(v.upper(), MECHANISMS),
            MECHANISM_FORM,
        ),
        sasl_username=r.custom(f"{prefix}SASL_USERNAME", d.sasl_username, str, "a user name"),
        sasl_password=Secret(r.custom(f"{prefix}SASL_PASSWORD", "", str, "a password")),
        ssl_cafile=r.custom(f"{prefix}SSL_CAFILE", None, existing_file, FILE_FORM),
        ssl_certfile=r.custom(f"{prefix}SSL_CERTFILE", None, existing_file, FILE_FORM),
        ssl_keyfile=r.custom(f"{prefix}SSL_KEYFILE", None, existing_file, FILE_FORM),
    )


def security_of(settings: ClusterSecurity) -> dict[str, Any]:
    """The :class:`ClusterSecurity` fields of ``settings``, as keyword arguments."""
    return {f.name: getattr(settings, f.name) for f in fields(ClusterSecurity)}


def check_sasl(r: Reader, prefix: str, security: ClusterSecurity) -> None:
    """A SASL protocol needs ``{prefix}SASL_MECHANISM``, ``_USERNAME`` and ``_PASSWORD``."""
    if not security.security_protocol.startswith("SASL_"):
        return
    needed = (
        (f"{prefix}SASL_MECHANISM", security.sasl_mechanism, MECHANISM_FORM),
        (f"{prefix}SASL_USERNAME", security.sasl_username, "a user name"),
        (f"{prefix}SASL_PASSWORD", security.sasl_password.value, "a password"),
    )
    for name, value, form in needed:
        if not value:
            r.fail(name, f"{form}, because {prefix}SECURITY_PROTOCOL={security.security_protocol}")


def with_bus_security(r: Reader, bus: BusConfig, kafka: KafkaConfig) -> BusConfig:
    """The bus cluster's SASL/SSL settings: VABUS_KAFKA_* only. For compatibility, when
    none of them is set and the bus's brokers are exactly KAFKA_BOOTSTRAP_SERVERS (one
    cluster), the KAFKA_* settings; never for other brokers, so the output cluster's
    password is never sent to the bus's."""
    own = read_security(r, "VABUS_KAFKA_")
    any_set = any(r.raw(f"VABUS_KAFKA_{f.name.upper()}") for f in fields(ClusterSecurity))
    one_cluster = set(bus.kafka_bootstrap_servers) == set(kafka.bootstrap_servers)
    if bus.kind == "kafka" and not any_set and one_cluster:
        return replace(bus, kafka_security=KafkaSecurity(**security_of(kafka), inherited=True))
    check_sasl(r, "VABUS_KAFKA_", own)
    return replace(bus, kafka_security=KafkaSecurity(**security_of(own)))


def read_http(r: Reader) -> HttpServerConfig:
    d = HttpServerConfig()
    return HttpServerConfig(
        host=r.custom("HTTP_HOST", d.host, non_empty, "a host name or address"),
        port=r.integer("HTTP_PORT", d.port, low=0, high=65535),
        auth_token=Secret(r.custom("HTTP_AUTH_TOKEN", "", parse_auth_token, BEARER_FORM)),
    )


def read_log(r: Reader) -> LogConfig:
    d = LogConfig()
    return LogConfig(
        level=r.custom(
            "LOG_LEVEL",
            d.level,
            lambda v: choice(v.upper(), LOG_LEVELS),
            "one of DEBUG, INFO, WARNING, ERROR, CRITICAL (any case)",
        ),
        format=r.custom(
            "LOG_FORMAT", d.format, lambda v: pick(v.lower(), LOG_FORMATS), "json or text"
        ),
    )


def read_bus(r: Reader) -> BusConfig:
    """VABUS_URL holding one source (the common case; :func:`read_sources` for any)."""
    return read_sources(r)[0]


def read_sources(r: Reader) -> tuple[BusConfig, ...]:
    """VABUS_URL's sources (one, or several separated by whitespace), each with the
    VABUS_* settings that apply to every source."""
    defaults = BusConfig()
    raw = r.raw("VABUS_URL")
    several = raw is not None and len(raw.split()) > 1
    form = SOURCES_FORM if several else f"{HTTP_FORM}, {KAFKA_FORM} or {DEMO_FORM}"
    one: tuple[BusConfig, ...] = (defaults,)
    from_url = r.custom("VABUS_URL", one, parse_bus_urls, form)
    # read once, applied to every source
    settings = BusConfig(
        token=Secret(r.custom("VABUS_TOKEN", "", str, "a bearer token")),
        http_batch_limit=r.integer("VABUS_BATCH_LIMIT", defaults.http_batch_limit, low=1),
        http_wait_s=r.seconds("VABUS_WAIT", defaults.http_wait_s, allow_zero=True),
        http_timeout_s=r.seconds("VABUS_TIMEOUT", defaults.http_timeout_s),
        kafka_session_timeout_ms=r.integer(
            "VABUS_KAFKA_SESSION_TIMEOUT_MS", defaults.kafka_session_timeout_ms, low=1
        ),
        max_message_bytes=r.integer("VABUS_MAX_MESSAGE_BYTES", defaults.max_message_bytes, low=1),
        max_response_bytes=r.integer(
            "VABUS_MAX_RESPONSE_BYTES", defaults.max_response_bytes, low=_MIN_RESPONSE_BYTES
        ),
        max_events_per_message=r.integer(
            "VABUS_MAX_EVENTS_PER_MESSAGE", defaults.max_events_per_message, low=1
        ),
    )
    return tuple(
        replace(
            source,
            token=settings.token,
            http_batch_limit=settings.http_batch_limit,
            http_wait_s=settings.http_wait_s,
            http_timeout_s=settings.http_timeout_s,
            kafka_session_timeout_ms=settings.kafka_session_timeout_ms,
            max_message_bytes=settings.max_message_bytes,
            max_response_bytes=settings.max_response_bytes,
            max_events_per_message=settings.max_events_per_message,
        )
        for source in from_url
    )


def read_kafka(r: Reader) -> KafkaConfig:
    d = KafkaConfig()
    topic = r.custom("KAFKA_TOPIC", d.topic, parse_topic, TOPIC_FORM)
    servers = r.custom(
        "KAFKA_BOOTSTRAP_SERVERS",
        d.bootstrap_servers,
        parse_servers,
        "a comma-separated list of host:port",
    )
    security = read_security(r, "KAFKA_")
    return KafkaConfig(
        bootstrap_servers=servers,
        **security_of(security),
        topic=topic,
        dlq_topic=r.custom("KAFKA_DLQ_TOPIC", f"{topic}.dlq", parse_topic, TOPIC_FORM),
        linger_ms=r.integer("KAFKA_LINGER_MS", d.linger_ms, low=0),
        max_request_size=r.integer("KAFKA_MAX_REQUEST_SIZE", d.max_request_size, low=1),
    )


def read_postgres(r: Reader) -> PostgresConfig:
    d = PostgresConfig()
    form = "postgresql://[user[:password]@][host][:port][/database][?param=value...]"
    dsn = r.custom("POSTGRES_DSN", "", parse_dsn, form)
    alias = r.custom("POSTGRES_CONNECTION_STRING", "", parse_dsn, form)
    if dsn and alias and dsn != alias:
        r.fail("POSTGRES_CONNECTION_STRING", "unset, or the same value as POSTGRES_DSN")
    return PostgresConfig(
        dsn=Secret(dsn or alias),
        table=r.custom(
            "POSTGRES_TABLE",
            d.table,
            parse_identifier,
            "an SQL identifier (letter or _, then letters, digits, _; at most 63)",
        ),
        pool_min_size=r.integer("POSTGRES_POOL_MIN", d.pool_min_size, low=0),
        pool_max_size=r.integer("POSTGRES_POOL_MAX", d.pool_max_size, low=1),
    )


def read_aggregation(r: Reader) -> AggregationConfig:
    d = AggregationConfig()
    cfg = AggregationConfig(
        interval_s=r.seconds("AGGREGATION_INTERVAL", d.interval_s),
        grace_s=r.seconds("AGGREGATION_GRACE", d.grace_s, allow_zero=True),
        max_future_s=r.seconds("AGGREGATION_MAX_FUTURE", d.max_future_s),
        max_watermark_lead_s=r.seconds(
            "AGGREGATION_MAX_WATERMARK_LEAD", d.max_watermark_lead_s, allow_zero=True
        ),
        idle_timeout_s=r.optional_seconds("AGGREGATION_IDLE_TIMEOUT"),
        max_open_windows=r.integer("AGGREGATION_MAX_OPEN_WINDOWS", d.max_open_windows, low=1),
        group_by=r.custom(
            "AGGREGATION_GROUP_BY",
            d.group_by,
            parse_tag_keys,
            "a comma-separated list of distinct tag keys (1-200 printable characters each)",
        ),
        max_series_per_name=r.integer(
            "AGGREGATION_MAX_SERIES_PER_NAME", d.max_series_per_name, low=1
        ),
        allowed_lateness_s=r.seconds(
            "AGGREGATION_ALLOWED_LATENESS", d.allowed_lateness_s, allow_zero=True
        ),
        hop_s=_hop(r),
        rollups_s=r.custom("AGGREGATION_ROLLUPS", d.rollups_s, parse_rollups, _ROLLUPS_FORM),
    )
    if cfg.hop_s is not None:
        cfg = _check_hop(r, cfg)
    _check_rollups(r, cfg)
    if cfg.max_watermark_lead_s > cfg.max_future_s:
        # unset, the default follows a smaller AGGREGATION_MAX_FUTURE; set, it is a mistake:
        # a larger lead could never apply (no accepted event is further ahead)
        if not r.raw("AGGREGATION_MAX_WATERMARK_LEAD"):
            return replace(cfg, max_watermark_lead_s=cfg.max_future_s)
        r.fail(
            "AGGREGATION_MAX_WATERMARK_LEAD",
            f"a number of seconds from 0 to AGGREGATION_MAX_FUTURE ({cfg.max_future_s:g})",
        )
    return cfg


def _hop(r: Reader) -> float | None:
    """AGGREGATION_HOP as set (None: unset, tumbling windows)."""
    return r.optional_seconds("AGGREGATION_HOP")


def _check_hop(r: Reader, cfg: AggregationConfig) -> AggregationConfig:
    """AGGREGATION_HOP must divide the interval (contract §12.7); equal to it, the
    windows are tumbling and nothing changes (hop_s None)."""
    hop, interval = cast(float, cfg.hop_s), cfg.interval_s
    n = interval / hop
    form = f"a number of seconds > 0 that divides AGGREGATION_INTERVAL ({interval:g})"
    if n < 1.0 or abs(n - round(n)) > 1e-9 * n:
        r.fail("AGGREGATION_HOP", form)
        return replace(cfg, hop_s=None)
    if round(n) == 1:
        return replace(cfg, hop_s=None)
    return cfg


_ROLLUPS_FORM: Final = (
    "a comma-separated list of window lengths in seconds, strictly increasing, each a "
    "multiple of AGGREGATION_INTERVAL and of the one before it"
)


def _check_rollups(r: Reader, cfg: AggregationConfig) -> None:
    """Rollups are merged from whole base windows: each length a larger multiple of
    the interval (the parser checked them against each other), and tumbling base
    windows only (contract §12.7: rollups with hops are an error)."""
    if not cfg.rollups_s:
        return
    first = cfg.rollups_s[0]
    k = round(first / cfg.interval_s)
    if k < 2 or k * cfg.interval_s != first:
        r.fail(
            "AGGREGATION_ROLLUPS",
            _ROLLUPS_FORM,
            f"{first:g} is not a larger multiple of AGGREGATION_INTERVAL={cfg.interval_s:g}",
        )
    hop = r.raw("AGGREGATION_HOP")
    if hop is not None and _number(hop) != cfg.interval_s:
        r.fail(
            "AGGREGATION_HOP",
            f"AGGREGATION_INTERVAL ({cfg.interval_s:g}) or unset: rollups "
            "(AGGREGATION_ROLLUPS) need tumbling base windows",
        )


def _number(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


def read_runtime(r: Reader) -> RuntimeConfig:
    d = RuntimeConfig()
    return RuntimeConfig(
        shutdown_timeout_s=r.seconds("SHUTDOWN_TIMEOUT", d.shutdown_timeout_s),
        metrics_interval_s=r.seconds("METRICS_INTERVAL", d.metrics_interval_s),
        checkpoint_interval_s=r.seconds("CHECKPOINT_INTERVAL", d.checkpoint_interval_s),
        state_dir=r.custom("STATE_DIR", d.state_dir, non_empty, "a directory path"),
        queue_size=r.integer("HUB_QUEUE_SIZE", d.queue_size, low=1),
        sink_batch_size=r.integer("SINK_BATCH_SIZE", d.sink_batch_size, low=1),
        retry_backoff=r.custom(
            "RETRY_BACKOFF",
            d.retry_backoff,
            lambda v: pick(v.lower(), {k: k for k in BACKOFF_KINDS}),
            "exponential, linear, fixed or random",
        ),
        retry_initial_s=r.seconds("RETRY_INITIAL", d.retry_initial_s),
        retry_max_s=r.seconds("RETRY_MAX", d.retry_max_s),
        readiness_stall_s=r.seconds("READINESS_STALL_TIMEOUT", d.readiness_stall_s),
        readiness_output_failing_s=r.seconds(
            "READINESS_OUTPUT_FAILING_TIMEOUT", d.readiness_output_failing_s, allow_zero=True
        ),
        workers=r.integer("WORKERS", d.workers, low=1),
        source_queue_size=r.integer("VABUS_SOURCE_QUEUE", d.source_queue_size, low=1),
    )


def check_consistency(r: Reader, config: Config) -> None:
    """Rules that involve more than one variable."""
    if "postgres" in config.outputs and not config.postgres.dsn:
        r.fail("POSTGRES_DSN", "a postgresql:// DSN, because STORAGE_TYPE includes postgres")
    kafka = config.kafka
    check_sasl(r, "KAFKA_", kafka)
    if kafka.dlq_topic == kafka.topic:
        r.fail("KAFKA_DLQ_TOPIC", "a topic other than KAFKA_TOPIC")
    if config.postgres.table == config.postgres.dead_letter_table:
        r.fail("POSTGRES_TABLE", f"a table other than {config.postgres.dead_letter_table!r}")
    if config.postgres.pool_min_size > config.postgres.pool_max_size:
        r.fail("POSTGRES_POOL_MIN", "at most POSTGRES_POOL_MAX")
    for bus in config.sources:
        same_cluster = set(bus.kafka_bootstrap_servers) & set(kafka.bootstrap_servers)
        if (
            bus.kind == "kafka"
            and same_cluster
            and bus.kafka_topic in (kafka.topic, kafka.dlq_topic)
        ):
            # Reading our own output would aggregate aggregates forever.
            r.fail("VABUS_URL", "an events topic other than KAFKA_TOPIC and KAFKA_DLQ_TOPIC")
    others = [b for b in config.sources if b.kind != "kafka"]
    if config.runtime.workers > 1 and others and not r.failed("VABUS_URL"):
        # Only a consumer group shares one input among processes; two HTTP or demo
        # readers would each aggregate (and store) the whole stream.
        r.fail(
            "WORKERS",
            f"1, because VABUS_URL={others[0].url!r} is not a kafka:// bus "
            "(only a Kafka consumer group shares one input among workers)",
        )
