"""Configuration: parsed once from the environment (and ``.env``) into frozen sections.

Each component receives only its own section. Secrets are wrapped in :class:`Secret`
so they never show up in reprs, logs or ``/status``.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields, is_dataclass, replace
from pathlib import Path
from typing import Any, Literal, TypeVar
from urllib.parse import parse_qsl, urlsplit, urlunsplit

from environs import Env, EnvValidationError, validate

from service.errors import ConfigError
from service.retry import BACKOFF_KINDS, BackoffKind

__all__ = [
    "AggregationConfig",
    "BusConfig",
    "Config",
    "HttpServerConfig",
    "KafkaConfig",
    "LogConfig",
    "PostgresConfig",
    "RuntimeConfig",
    "Secret",
    "load_config",
]


@dataclass(frozen=True, slots=True)
class Secret:
    """A string that does not print itself."""

    value: str

    def __repr__(self) -> str:
        return "Secret('***')" if self.value else "Secret('')"

    __str__ = __repr__

    def __bool__(self) -> bool:
        return bool(self.value)


@dataclass(frozen=True, slots=True)
class KafkaConfig:
    """Kafka client settings shared by the Kafka bus and the Kafka sink."""

    bootstrap_servers: tuple[str, ...] = ("localhost:9092",)
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] | None = None
    sasl_username: str | None = None
    sasl_password: Secret = Secret("")
    ssl_cafile: str | None = None
    ssl_certfile: str | None = None
    ssl_keyfile: str | None = None
    topic: str = "aggregated-events"  # KAFKA_TOPIC
    dlq_topic: str = "aggregated-events.dlq"  # KAFKA_DLQ_TOPIC (default <topic>.dlq)
    linger_ms: int = 20  # KAFKA_LINGER_MS
    max_request_size: int = 1_048_576  # KAFKA_MAX_REQUEST_SIZE, bytes


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
    # demo://?rate=<events/s>&names=<n>
    demo_rate: float = 1000.0
    demo_names: int = 50
    max_message_bytes: int = 1_048_576  # VABUS_MAX_MESSAGE_BYTES: larger -> too_large


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
    # AGGREGATION_IDLE_TIMEOUT: quiet time after which open windows are flushed.
    # Default (None) means interval + grace, which keeps the contract bound of
    # interval + grace + 10 s with the 1 s tick.
    idle_timeout_s: float | None = None
    max_open_windows: int = 1_000_000  # AGGREGATION_MAX_OPEN_WINDOWS (cardinality budget)

    @property
    def effective_idle_timeout_s(self) -> float:
        if self.idle_timeout_s is not None:
            return self.idle_timeout_s
        return self.interval_s + self.grace_s


@dataclass(frozen=True, slots=True)
class HttpServerConfig:
    host: str = "0.0.0.0"  # HTTP_HOST  # noqa: S104 - a container serves every interface
    port: int = 8080  # HTTP_PORT


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

    def redacted(self) -> dict[str, Any]:
        """A JSON-able view for ``/status`` and start-up logs.

        Secrets read ``"***"`` when set and ``""`` when not; the PostgreSQL DSN keeps
        user, host and database but its password is masked.
        """
        view: dict[str, Any] = _plain(self)
        view["postgres"]["dsn"] = _mask_password(self.postgres.dsn.value)
        return view


def _plain(value: Any) -> Any:
    """Dataclasses to dicts, tuples to lists, secrets to a mask (never their value)."""
    if isinstance(value, Secret):
        return "***" if value else ""
    if is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in fields(value)}
    if isinstance(value, tuple | list):
        return [_plain(item) for item in value]
    return value


# --------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------

_T = TypeVar("_T")

_SecurityProtocol = Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"]
_SaslMechanism = Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"]
_Output = Literal["kafka", "postgres"]
_LogFormat = Literal["json", "text"]

_PROTOCOLS: dict[str, _SecurityProtocol] = {
    "PLAINTEXT": "PLAINTEXT",
    "SSL": "SSL",
    "SASL_PLAINTEXT": "SASL_PLAINTEXT",
    "SASL_SSL": "SASL_SSL",
}
_MECHANISMS: dict[str, _SaslMechanism] = {
    "PLAIN": "PLAIN",
    "SCRAM-SHA-256": "SCRAM-SHA-256",
    "SCRAM-SHA-512": "SCRAM-SHA-512",
}
_OUTPUTS: dict[str, _Output] = {"kafka": "kafka", "postgres": "postgres"}
_LOG_FORMATS: dict[str, _LogFormat] = {"json": "json", "text": "text"}
_LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")

# Variables whose value is never shown; URL-like ones show it with the password masked.
_SECRET_VARIABLES = frozenset({"VABUS_TOKEN", "KAFKA_SASL_PASSWORD"})
_URL_VARIABLES = frozenset({"VABUS_URL", "POSTGRES_DSN", "POSTGRES_CONNECTION_STRING"})

_HOST_PORT = re.compile(r"(?P<host>\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9._-]+):(?P<port>[0-9]{1,5})")
_TOPIC = re.compile(r"[A-Za-z0-9._-]{1,249}")
_PASSWORD_PARAM = re.compile(r"((?:^|&)[^=&]*password[^=&]*=)[^&]*", re.IGNORECASE)
_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,62}")

_HTTP_FORM = "http(s)://host[:port][/base] without credentials, query or fragment"
_KAFKA_FORM = "kafka://host:port[,host:port]/<topic>[?group=<id>&metrics_topic=<topic>]"
_DEMO_FORM = "demo://[?rate=<events/s>&names=<n>]"
_MECHANISM_FORM = "one of PLAIN, SCRAM-SHA-256, SCRAM-SHA-512"
_FILE_FORM = "the path of an existing file"
_TOPIC_FORM = "a Kafka topic name (1-249 of A-Z a-z 0-9 . _ -)"


class _Invalid(ValueError):
    """A value broke its rule. ``expected`` replaces the variable's general form when a
    more precise one is known; ``detail`` says what exactly is wrong (never a secret)."""

    def __init__(self, detail: str = "", expected: str | None = None) -> None:
        super().__init__(detail)
        self.detail = detail
        self.expected = expected


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
    reader = _Reader(environ, dotenv)
    config = _read_config(reader)
    if require_bus and reader.raw("VABUS_URL") is None:
        reader.fail("VABUS_URL", f"{_HTTP_FORM} or {_KAFKA_FORM}", "it is not set")
    problems = reader.problems()
    if problems:
        raise ConfigError(problems)
    return config


def _read_config(r: _Reader) -> Config:
    config = Config(
        bus=_read_bus(r),
        outputs=r.custom(
            "STORAGE_TYPE",
            Config().outputs,
            _parse_outputs,
            "kafka, postgres or kafka,postgres",
        ),
        kafka=_read_kafka(r),
        postgres=_read_postgres(r),
        aggregation=_read_aggregation(r),
        http=_read_http(r),
        log=_read_log(r),
        runtime=_read_runtime(r),
    )
    _check_consistency(r, config)
    return config


def _read_http(r: _Reader) -> HttpServerConfig:
    d = HttpServerConfig()
    return HttpServerConfig(
        host=r.custom("HTTP_HOST", d.host, _non_empty, "a host name or address"),
        port=r.integer("HTTP_PORT", d.port, low=0, high=65535),
    )


def _read_log(r: _Reader) -> LogConfig:
    d = LogConfig()
    return LogConfig(
        level=r.custom(
            "LOG_LEVEL",
            d.level,
            lambda v: _choice(v.upper(), _LOG_LEVELS),
            "one of DEBUG, INFO, WARNING, ERROR, CRITICAL (any case)",
        ),
        format=r.custom(
            "LOG_FORMAT", d.format, lambda v: _pick(v.lower(), _LOG_FORMATS), "json or text"
        ),
    )


def _read_bus(r: _Reader) -> BusConfig:
    defaults = BusConfig()
    from_url = r.custom(
        "VABUS_URL", defaults, _parse_bus_url, f"{_HTTP_FORM}, {_KAFKA_FORM} or {_DEMO_FORM}"
    )
    return replace(
        from_url,
        token=Secret(r.custom("VABUS_TOKEN", "", str, "a bearer token")),
        http_batch_limit=r.integer("VABUS_BATCH_LIMIT", defaults.http_batch_limit, low=1),
        http_wait_s=r.seconds("VABUS_WAIT", defaults.http_wait_s, allow_zero=True),
        http_timeout_s=r.seconds("VABUS_TIMEOUT", defaults.http_timeout_s),
        kafka_session_timeout_ms=r.integer(
            "VABUS_KAFKA_SESSION_TIMEOUT_MS", defaults.kafka_session_timeout_ms, low=1
        ),
        max_message_bytes=r.integer("VABUS_MAX_MESSAGE_BYTES", defaults.max_message_bytes, low=1),
    )


def _read_kafka(r: _Reader) -> KafkaConfig:
    d = KafkaConfig()
    topic = r.custom("KAFKA_TOPIC", d.topic, _parse_topic, _TOPIC_FORM)
    return KafkaConfig(
        bootstrap_servers=r.custom(
            "KAFKA_BOOTSTRAP_SERVERS",
            d.bootstrap_servers,
            _parse_servers,
            "a comma-separated list of host:port",
        ),
        security_protocol=r.custom(
            "KAFKA_SECURITY_PROTOCOL",
            d.security_protocol,
            lambda v: _pick(v.upper(), _PROTOCOLS),
            "one of PLAINTEXT, SSL, SASL_PLAINTEXT, SASL_SSL",
        ),
        sasl_mechanism=r.custom(
            "KAFKA_SASL_MECHANISM",
            d.sasl_mechanism,
            lambda v: _pick(v.upper(), _MECHANISMS),
            _MECHANISM_FORM,
        ),
        sasl_username=r.custom("KAFKA_SASL_USERNAME", d.sasl_username, str, "a user name"),
        sasl_password=Secret(r.custom("KAFKA_SASL_PASSWORD", "", str, "a password")),
        ssl_cafile=r.custom("KAFKA_SSL_CAFILE", None, _existing_file, _FILE_FORM),
        ssl_certfile=r.custom("KAFKA_SSL_CERTFILE", None, _existing_file, _FILE_FORM),
        ssl_keyfile=r.custom("KAFKA_SSL_KEYFILE", None, _existing_file, _FILE_FORM),
        topic=topic,
        dlq_topic=r.custom("KAFKA_DLQ_TOPIC", f"{topic}.dlq", _parse_topic, _TOPIC_FORM),
        linger_ms=r.integer("KAFKA_LINGER_MS", d.linger_ms, low=0),
        max_request_size=r.integer("KAFKA_MAX_REQUEST_SIZE", d.max_request_size, low=1),
    )


def _read_postgres(r: _Reader) -> PostgresConfig:
    d = PostgresConfig()
    form = "postgresql://[user[:password]@][host][:port][/database][?param=value...]"
    dsn = r.custom("POSTGRES_DSN", "", _parse_dsn, form)
    alias = r.custom("POSTGRES_CONNECTION_STRING", "", _parse_dsn, form)
    if dsn and alias and dsn != alias:
        r.fail("POSTGRES_CONNECTION_STRING", "unset, or the same value as POSTGRES_DSN")
    return PostgresConfig(
        dsn=Secret(dsn or alias),
        table=r.custom(
            "POSTGRES_TABLE",
            d.table,
            _parse_identifier,
            "an SQL identifier (letter or _, then letters, digits, _; at most 63)",
        ),
        pool_min_size=r.integer("POSTGRES_POOL_MIN", d.pool_min_size, low=0),
        pool_max_size=r.integer("POSTGRES_POOL_MAX", d.pool_max_size, low=1),
    )


def _read_aggregation(r: _Reader) -> AggregationConfig:
    d = AggregationConfig()
    return AggregationConfig(
        interval_s=r.seconds("AGGREGATION_INTERVAL", d.interval_s),
        grace_s=r.seconds("AGGREGATION_GRACE", d.grace_s, allow_zero=True),
        max_future_s=r.seconds("AGGREGATION_MAX_FUTURE", d.max_future_s),
        idle_timeout_s=r.optional_seconds("AGGREGATION_IDLE_TIMEOUT"),
        max_open_windows=r.integer("AGGREGATION_MAX_OPEN_WINDOWS", d.max_open_windows, low=1),
    )


def _read_runtime(r: _Reader) -> RuntimeConfig:
    d = RuntimeConfig()
    return RuntimeConfig(
        shutdown_timeout_s=r.seconds("SHUTDOWN_TIMEOUT", d.shutdown_timeout_s),
        metrics_interval_s=r.seconds("METRICS_INTERVAL", d.metrics_interval_s),
        checkpoint_interval_s=r.seconds("CHECKPOINT_INTERVAL", d.checkpoint_interval_s),
        state_dir=r.custom("STATE_DIR", d.state_dir, _non_empty, "a directory path"),
        queue_size=r.integer("HUB_QUEUE_SIZE", d.queue_size, low=1),
        sink_batch_size=r.integer("SINK_BATCH_SIZE", d.sink_batch_size, low=1),
        retry_backoff=r.custom(
            "RETRY_BACKOFF",
            d.retry_backoff,
            lambda v: _pick(v.lower(), {k: k for k in BACKOFF_KINDS}),
            "exponential, linear, fixed or random",
        ),
        retry_initial_s=r.seconds("RETRY_INITIAL", d.retry_initial_s),
        retry_max_s=r.seconds("RETRY_MAX", d.retry_max_s),
    )


def _check_consistency(r: _Reader, config: Config) -> None:
    """Rules that involve more than one variable."""
    if "postgres" in config.outputs and not config.postgres.dsn:
        r.fail("POSTGRES_DSN", "a postgresql:// DSN, because STORAGE_TYPE includes postgres")
    kafka = config.kafka
    if kafka.security_protocol.startswith("SASL_"):
        needed = (
            ("KAFKA_SASL_MECHANISM", kafka.sasl_mechanism, _MECHANISM_FORM),
            ("KAFKA_SASL_USERNAME", kafka.sasl_username, "a user name"),
            ("KAFKA_SASL_PASSWORD", kafka.sasl_password.value, "a password"),
        )
        for name, value, form in needed:
            if not value:
                r.fail(name, f"{form}, because KAFKA_SECURITY_PROTOCOL={kafka.security_protocol}")
    if kafka.dlq_topic == kafka.topic:
        r.fail("KAFKA_DLQ_TOPIC", "a topic other than KAFKA_TOPIC")
    if config.postgres.table == config.postgres.dead_letter_table:
        r.fail("POSTGRES_TABLE", f"a table other than {config.postgres.dead_letter_table!r}")
    if config.postgres.pool_min_size > config.postgres.pool_max_size:
        r.fail("POSTGRES_POOL_MIN", "at most POSTGRES_POOL_MAX")
    bus = config.bus
    same_cluster = set(bus.kafka_bootstrap_servers) & set(kafka.bootstrap_servers)
    if bus.kind == "kafka" and same_cluster and bus.kafka_topic in (kafka.topic, kafka.dlq_topic):
        # Reading our own output would aggregate aggregates forever.
        r.fail("VABUS_URL", "an events topic other than KAFKA_TOPIC and KAFKA_DLQ_TOPIC")


class _SourceEnv(Env):
    """An environs ``Env`` that reads only the mapping it is given, then its ``.env``.

    environs always consults ``os.environ`` first; overriding that one lookup keeps an
    explicitly passed environment hermetic.
    """

    def __init__(self, source: Mapping[str, str]) -> None:
        super().__init__(eager=False)
        self._source = source

    def _get_value(self, env_key: str, default: Any) -> Any:
        for values in (self._source, self._environ):
            value = values.get(env_key)
            if value:  # empty counts as unset
                return value
        return default

    def raw(self, name: str) -> str | None:
        value = self._get_value(name, None)
        return value if isinstance(value, str) else None


class _Reader:
    """Reads variables without stopping at the first bad one.

    A bad value is replaced by its default so that reading goes on; every problem is
    kept and reported in the order the variables were read.
    """

    def __init__(self, environ: Mapping[str, str] | None, dotenv: str | None) -> None:
        self._env = _SourceEnv(dict(os.environ) if environ is None else environ)
        if dotenv is not None:
            self._env.read_env(dotenv, recurse=False)
        self._expected: dict[str, str] = {}
        self._failures: dict[str, str] = {}  # name -> problem line

    def integer(self, name: str, default: int, *, low: int, high: int | None = None) -> int:
        form = f"an integer >= {low}" if high is None else f"an integer {low}-{high}"
        self._expected[name] = form
        value = self._env.int(name, default, validate=validate.Range(min=low, max=high))
        return default if value is None else value

    def seconds(self, name: str, default: float, *, allow_zero: bool = False) -> float:
        value = self._seconds(name, allow_zero=allow_zero)
        return default if value is None else value

    def optional_seconds(self, name: str) -> float | None:
        return self._seconds(name, allow_zero=False)

    def _seconds(self, name: str, *, allow_zero: bool) -> float | None:
        self._expected[name] = f"a number of seconds {'>= 0' if allow_zero else '> 0'}"
        check = validate.Range(min=0, min_inclusive=allow_zero)
        return self._env.float(name, None, validate=check)

    def custom(self, name: str, default: _T, parse: Callable[[str], _T], form: str) -> _T:
        """Read ``name`` with ``parse``, which raises ``ValueError`` on a bad value."""
        self._expected[name] = form
        raw = self._env.raw(name)
        if raw is None:
            return default
        try:
            return parse(raw)
        except _Invalid as error:
            self.fail(name, error.expected or form, error.detail)
        except ValueError:
            self.fail(name, form)
        return default

    def fail(self, name: str, form: str, detail: str = "") -> None:
        """Record a problem with ``name``; only the first one per variable is kept."""
        if name in self._failures:
            return
        line = f"{name}={_shown(name, self._env.raw(name) or '')}: expected {form}"
        self._failures[name] = f"{line} ({detail})" if detail else line

    def raw(self, name: str) -> str | None:
        return self._env.raw(name)

    def problems(self) -> list[str]:
        try:
            self._env.seal()
        except EnvValidationError as error:
            for name in error.error_messages:
                self.fail(str(name), self._expected[str(name)])
        order = {name: index for index, name in enumerate(self._expected)}
        names = sorted(self._failures, key=lambda name: order.get(name, len(order)))
        return [self._failures[name] for name in names]


def _shown(name: str, raw: str) -> str:
    if name in _SECRET_VARIABLES and raw:
        return "'***'"
    if name in _URL_VARIABLES and (name != "VABUS_URL" or "@" in raw):
        return repr(_mask_password(raw))
    return repr(raw)


def _mask_password(url: str) -> str:
    """``url`` with any password (user info or ``*password*`` parameter) as ``***``.

    Text that does not parse as a URL is masked whole: it may be a key=value DSN.
    """
    if not url:
        return ""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "***"
    if not parts.scheme or not url.lower().startswith(f"{parts.scheme}://"):
        return "***"
    netloc = parts.netloc
    if parts.password is not None:
        userinfo, _, hostport = netloc.rpartition("@")
        netloc = f"{userinfo.split(':', 1)[0]}:***@{hostport}"
    masked = f"{parts.scheme}://{netloc}{parts.path}"
    if parts.query:
        masked += "?" + _PASSWORD_PARAM.sub(r"\1***", parts.query)
    return masked + (f"#{parts.fragment}" if parts.fragment else "")


# --------------------------------------------------------------------------------------
# Value parsers: pure functions of one string; they raise ValueError (or _Invalid).
# --------------------------------------------------------------------------------------


def _non_empty(value: str) -> str:
    if not value.strip():
        raise _Invalid()
    return value.strip()


def _choice(value: str, options: tuple[str, ...]) -> str:
    if value not in options:
        raise _Invalid()
    return value


def _pick(key: str, options: Mapping[str, _T]) -> _T:
    try:
        return options[key]
    except KeyError:
        raise _Invalid() from None


def _parse_outputs(value: str) -> tuple[_Output, ...]:
    """Any order, no duplicates; the order given is kept."""
    names = [part.strip().lower() for part in value.split(",")]
    if len(set(names)) != len(names):
        raise _Invalid("duplicate output")
    return tuple(_pick(name, _OUTPUTS) for name in names)


def _parse_servers(value: str) -> tuple[str, ...]:
    servers = tuple(part.strip() for part in value.split(","))
    for server in servers:
        match = _HOST_PORT.fullmatch(server)
        if match is None or not 1 <= int(match["port"]) <= 65535:
            raise _Invalid(f"bad server {server!r}" if server else "empty entry")
    return servers


def _existing_file(value: str) -> str:
    if not Path(value).is_file():
        raise _Invalid("no such file")
    return value


def _parse_topic(value: str) -> str:
    if not _TOPIC.fullmatch(value) or value in (".", ".."):
        raise _Invalid()
    return value


def _parse_identifier(value: str) -> str:
    if not _IDENTIFIER.fullmatch(value):
        raise _Invalid()
    return value


def _parse_dsn(value: str) -> str:
    if urlsplit(value).scheme not in ("postgresql", "postgres"):
        raise _Invalid()
    return value


def _parse_bus_url(url: str) -> BusConfig:
    parts = urlsplit(url.strip())  # a bad IPv6 literal raises ValueError
    parse = {"http": _http_bus, "https": _http_bus, "kafka": _kafka_bus, "demo": _demo_bus}
    if parts.scheme not in parse:
        raise _Invalid(f"unknown scheme {parts.scheme!r}" if parts.scheme else "no scheme")
    if parts.username is not None or parts.password is not None:
        raise _Invalid(
            "no credentials in the URL: use VABUS_TOKEN or KAFKA_SASL_*",
            expected=_HTTP_FORM if parts.scheme.startswith("http") else _KAFKA_FORM,
        )
    return parse[parts.scheme](url.strip())


def _http_bus(url: str) -> BusConfig:
    parts = urlsplit(url)
    try:
        port = parts.port
    except ValueError:
        raise _Invalid("bad port", expected=_HTTP_FORM) from None
    if not parts.hostname or port == 0 or parts.query or parts.fragment:
        raise _Invalid(expected=_HTTP_FORM)
    base = urlunsplit((parts.scheme, parts.netloc, parts.path.rstrip("/"), "", ""))
    return BusConfig(url=base, kind="http", http_base_url=base)


def _kafka_bus(url: str) -> BusConfig:
    parts = urlsplit(url)
    if not parts.netloc:
        raise _Invalid("no bootstrap servers", expected=_KAFKA_FORM)
    try:
        servers = _parse_servers(parts.netloc)
    except _Invalid as error:
        raise _Invalid(error.detail, expected=_KAFKA_FORM) from None
    params = _query(parts.query, allowed=("group", "metrics_topic"), form=_KAFKA_FORM)
    defaults = BusConfig()
    topic = parts.path.removeprefix("/") or defaults.kafka_topic
    for what, name in (("topic", topic), ("metrics_topic", params.get("metrics_topic"))):
        if name is not None and (not _TOPIC.fullmatch(name) or name in (".", "..")):
            raise _Invalid(f"bad {what} {name!r}", expected=_KAFKA_FORM)
    if params.get("group") == "":
        raise _Invalid("empty group", expected=_KAFKA_FORM)
    return BusConfig(
        url=url,
        kind="kafka",
        kafka_bootstrap_servers=servers,
        kafka_topic=topic,
        kafka_group=params.get("group", defaults.kafka_group),
        kafka_metrics_topic=params.get("metrics_topic", defaults.kafka_metrics_topic),
    )


def _demo_bus(url: str) -> BusConfig:
    parts = urlsplit(url)
    if parts.netloc or parts.path or parts.fragment:
        raise _Invalid(expected=_DEMO_FORM)
    params = _query(parts.query, allowed=("rate", "names"), form=_DEMO_FORM)
    defaults = BusConfig()
    try:
        rate = float(params.get("rate", defaults.demo_rate))
        names = int(params.get("names", defaults.demo_names))
    except ValueError:
        raise _Invalid("rate and names must be numbers", expected=_DEMO_FORM) from None
    if not 0 < rate < float("inf") or names < 1:
        raise _Invalid("rate must be > 0 and names >= 1", expected=_DEMO_FORM)
    return BusConfig(url=url, kind="demo", demo_rate=rate, demo_names=names)


def _query(query: str, *, allowed: tuple[str, ...], form: str) -> dict[str, str]:
    params: dict[str, str] = {}
    for key, value in parse_qsl(query, keep_blank_values=True):
        if key not in allowed:
            raise _Invalid(f"unknown parameter {key!r}", expected=form)
        if key in params:
            raise _Invalid(f"{key!r} given twice", expected=form)
        params[key] = value
    return params
