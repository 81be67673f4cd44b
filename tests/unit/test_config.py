"""load_config: every variable, every rule, every problem at once, and no secret leaks."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from service.config import Config, load_config
from service.core.errors import ConfigError

# A DSN is needed whenever postgres is an output; reused where the value does not matter.
DSN = "postgresql://agg:pg-secret-1@db.example:5432/metrics"
SECRETS = ("tok-secret-1", "sasl-secret-1", "pg-secret-1")


def load(**env: str) -> Config:
    return load_config(env, dotenv=None)


def problems_of(**env: str) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        load(**env)
    return caught.value.problems


# --- defaults ---------------------------------------------------------------------------


def test_empty_environment_gives_the_dataclass_defaults() -> None:
    assert load() == Config()


def test_defaults_match_the_documented_values() -> None:
    config = load()
    assert config.bus.kind == "demo"
    assert config.outputs == ("kafka",)
    assert config.kafka.bootstrap_servers == ("localhost:9092",)
    assert config.kafka.dlq_topic == "aggregated-events.dlq"
    assert config.aggregation.idle_timeout_s is None
    assert (config.http.host, config.http.port) == ("0.0.0.0", 8080)
    assert config.runtime.shutdown_timeout_s == 30.0


def test_empty_value_counts_as_unset() -> None:
    assert load(HTTP_PORT="", KAFKA_TOPIC="", VABUS_URL="") == Config()


# --- each variable parses ---------------------------------------------------------------

PARSED: list[tuple[dict[str, str], Callable[[Config], Any], Any]] = [
    ({"VABUS_BATCH_LIMIT": "100"}, lambda c: c.bus.http_batch_limit, 100),
    ({"VABUS_WAIT": "0"}, lambda c: c.bus.http_wait_s, 0.0),
    ({"VABUS_WAIT": "2.5"}, lambda c: c.bus.http_wait_s, 2.5),
    ({"VABUS_TIMEOUT": "7"}, lambda c: c.bus.http_timeout_s, 7.0),
    ({"VABUS_KAFKA_SESSION_TIMEOUT_MS": "3000"}, lambda c: c.bus.kafka_session_timeout_ms, 3000),
    ({"VABUS_MAX_MESSAGE_BYTES": "2048"}, lambda c: c.bus.max_message_bytes, 2048),
    ({"VABUS_MAX_RESPONSE_BYTES": "1024"}, lambda c: c.bus.max_response_bytes, 1024),
    ({"VABUS_MAX_EVENTS_PER_MESSAGE": "1"}, lambda c: c.bus.max_events_per_message, 1),
    ({"VABUS_TOKEN": "abc"}, lambda c: c.bus.token.value, "abc"),
    (
        {"HTTP_AUTH_TOKEN": "0123456789abcdef"},
        lambda c: c.http.auth_token.value,
        "0123456789abcdef",
    ),
    ({"STORAGE_TYPE": "postgres", "POSTGRES_DSN": DSN}, lambda c: c.outputs, ("postgres",)),
    (
        {"STORAGE_TYPE": " Postgres , kafka", "POSTGRES_DSN": DSN},
        lambda c: c.outputs,
        ("postgres", "kafka"),
    ),
    (
        {"KAFKA_BOOTSTRAP_SERVERS": "k1:9092, k2:9093,[::1]:9094"},
        lambda c: c.kafka.bootstrap_servers,
        ("k1:9092", "k2:9093", "[::1]:9094"),
    ),
    ({"KAFKA_TOPIC": "aggs"}, lambda c: (c.kafka.topic, c.kafka.dlq_topic), ("aggs", "aggs.dlq")),
    ({"KAFKA_DLQ_TOPIC": "bad-ones"}, lambda c: c.kafka.dlq_topic, "bad-ones"),
    ({"KAFKA_SECURITY_PROTOCOL": "ssl"}, lambda c: c.kafka.security_protocol, "SSL"),
    ({"KAFKA_SASL_MECHANISM": "scram-sha-512"}, lambda c: c.kafka.sasl_mechanism, "SCRAM-SHA-512"),
    ({"KAFKA_SASL_USERNAME": "svc"}, lambda c: c.kafka.sasl_username, "svc"),
    ({"KAFKA_SASL_PASSWORD": "pw"}, lambda c: c.kafka.sasl_password.value, "pw"),
    ({"KAFKA_LINGER_MS": "0"}, lambda c: c.kafka.linger_ms, 0),
    ({"KAFKA_MAX_REQUEST_SIZE": "4194304"}, lambda c: c.kafka.max_request_size, 4_194_304),
    ({"POSTGRES_DSN": DSN}, lambda c: c.postgres.dsn.value, DSN),
    ({"POSTGRES_CONNECTION_STRING": DSN}, lambda c: c.postgres.dsn.value, DSN),
    ({"POSTGRES_DSN": DSN, "POSTGRES_CONNECTION_STRING": DSN}, lambda c: c.postgres.dsn.value, DSN),
    ({"POSTGRES_TABLE": "Agg_2"}, lambda c: c.postgres.table, "Agg_2"),
    ({"POSTGRES_POOL_MIN": "0"}, lambda c: c.postgres.pool_min_size, 0),
    ({"POSTGRES_POOL_MAX": "10"}, lambda c: c.postgres.pool_max_size, 10),
    ({"AGGREGATION_INTERVAL": "0.5"}, lambda c: c.aggregation.interval_s, 0.5),
    ({"AGGREGATION_GRACE": "0"}, lambda c: c.aggregation.grace_s, 0.0),
    ({"AGGREGATION_GRACE": "5"}, lambda c: c.aggregation.grace_s, 5.0),
    ({"AGGREGATION_MAX_FUTURE": "60"}, lambda c: c.aggregation.max_future_s, 60.0),
    ({}, lambda c: c.aggregation.max_watermark_lead_s, 60.0),
    ({"AGGREGATION_MAX_WATERMARK_LEAD": "0"}, lambda c: c.aggregation.max_watermark_lead_s, 0.0),
    (
        {"AGGREGATION_MAX_WATERMARK_LEAD": "3600"},
        lambda c: c.aggregation.max_watermark_lead_s,
        3600.0,
    ),
    # the default lead follows a smaller AGGREGATION_MAX_FUTURE
    ({"AGGREGATION_MAX_FUTURE": "30"}, lambda c: c.aggregation.max_watermark_lead_s, 30.0),
    (
        {"AGGREGATION_MAX_FUTURE": "30", "AGGREGATION_MAX_WATERMARK_LEAD": ""},
        lambda c: c.aggregation.max_watermark_lead_s,
        30.0,
    ),
    ({"AGGREGATION_IDLE_TIMEOUT": "12.5"}, lambda c: c.aggregation.idle_timeout_s, 12.5),
    ({"AGGREGATION_MAX_OPEN_WINDOWS": "10"}, lambda c: c.aggregation.max_open_windows, 10),
    ({"AGGREGATION_HOP": "10"}, lambda c: c.aggregation.hop_s, 10.0),
    ({"AGGREGATION_HOP": "0.5"}, lambda c: c.aggregation.pane_s, 0.5),
    ({"AGGREGATION_HOP": "60"}, lambda c: c.aggregation.hop_s, None),  # = interval: tumbling
    ({}, lambda c: c.aggregation.pane_s, 60.0),
    ({"HTTP_HOST": "127.0.0.1"}, lambda c: c.http.host, "127.0.0.1"),
    ({"HTTP_PORT": "0"}, lambda c: c.http.port, 0),
    ({"HTTP_PORT": "65535"}, lambda c: c.http.port, 65535),
    ({"METRICS_INTERVAL": "1"}, lambda c: c.runtime.metrics_interval_s, 1.0),
    ({"LOG_LEVEL": "debug"}, lambda c: c.log.level, "DEBUG"),
    ({"LOG_FORMAT": "JSON"}, lambda c: c.log.format, "json"),
    ({"SHUTDOWN_TIMEOUT": "5"}, lambda c: c.runtime.shutdown_timeout_s, 5.0),
    ({"CHECKPOINT_INTERVAL": "0.2"}, lambda c: c.runtime.checkpoint_interval_s, 0.2),
    ({"STATE_DIR": "/var/lib/agg"}, lambda c: c.runtime.state_dir, "/var/lib/agg"),
    ({"HUB_QUEUE_SIZE": "8"}, lambda c: c.runtime.queue_size, 8),
    ({"SINK_BATCH_SIZE": "100"}, lambda c: c.runtime.sink_batch_size, 100),
    ({"WORKERS": "1"}, lambda c: c.runtime.workers, 1),
    ({"WORKERS": "4", "VABUS_URL": "kafka://k:9092/in"}, lambda c: c.runtime.workers, 4),
]


@pytest.mark.parametrize(("env", "get", "expected"), PARSED, ids=lambda p: str(p)[:60])
def test_each_variable_is_parsed_into_its_field(
    env: dict[str, str], get: Callable[[Config], Any], expected: Any
) -> None:
    assert get(load(**env)) == expected


def test_ssl_files_are_accepted_when_they_exist(tmp_path: Path) -> None:
    ca = tmp_path / "ca.pem"
    ca.write_text("x")
    config = load(KAFKA_SSL_CAFILE=str(ca), KAFKA_SSL_CERTFILE=str(ca), KAFKA_SSL_KEYFILE=str(ca))
    assert (config.kafka.ssl_cafile, config.kafka.ssl_certfile) == (str(ca), str(ca))
    assert config.kafka.ssl_keyfile == str(ca)


def test_sasl_protocol_with_mechanism_user_and_password_is_accepted() -> None:
    config = load(
        KAFKA_SECURITY_PROTOCOL="SASL_PLAINTEXT",
        KAFKA_SASL_MECHANISM="PLAIN",
        KAFKA_SASL_USERNAME="svc",
        KAFKA_SASL_PASSWORD="pw",
    )
    assert config.kafka.security_protocol == "SASL_PLAINTEXT"


# --- the three URL forms ----------------------------------------------------------------


def test_http_url_keeps_its_base_path_without_trailing_slash() -> None:
    bus = load(VABUS_URL="https://bus.example:8443/vabus/").bus
    assert (bus.kind, bus.http_base_url, bus.url) == (
        "http",
        "https://bus.example:8443/vabus",
        "https://bus.example:8443/vabus",
    )


def test_http_url_without_port_or_path_is_accepted() -> None:
    assert load(VABUS_URL="http://emulator").bus.http_base_url == "http://emulator"


def test_kafka_url_gives_servers_topic_group_and_metrics_topic() -> None:
    bus = load(VABUS_URL="kafka://k1:9092,k2:9092/events?group=g1&metrics_topic=m1").bus
    assert bus.kind == "kafka"
    assert bus.kafka_bootstrap_servers == ("k1:9092", "k2:9092")
    assert (bus.kafka_topic, bus.kafka_group, bus.kafka_metrics_topic) == ("events", "g1", "m1")


def test_kafka_url_without_query_uses_default_group_and_metrics_topic() -> None:
    bus = load(VABUS_URL="kafka://127.0.0.1:9092/events").bus
    assert (bus.kafka_group, bus.kafka_metrics_topic) == ("vabus-aggregator", "vabus-metrics")


def test_demo_url_gives_rate_and_names() -> None:
    bus = load(VABUS_URL="demo://?rate=250.5&names=7").bus
    assert (bus.kind, bus.demo_rate, bus.demo_names) == ("demo", 250.5, 7)


@pytest.mark.parametrize(
    "url",
    [
        "ftp://host/x",
        "bus.example:8080",
        "http://",
        "http://host:99999",
        "http://host:0",
        "http://host/base?x=1",
        "https://user:pw@host",
        "kafka:///events",
        "kafka://k1/events",
        "kafka://k1:9092/a/b",
        "kafka://k1:9092/events?grop=g",
        "kafka://k1:9092/events?group=",
        "kafka://k1:9092/events?group=a&group=b",
        "kafka://k1:9092/bad topic",
        "demo://?rate=0",
        "demo://?rate=fast",
        "demo://?names=0",
        "demo://?color=red",
        "demo://somehost",
    ],
)
def test_bad_bus_url_is_reported(url: str) -> None:
    [problem] = problems_of(VABUS_URL=url)
    assert problem.startswith("VABUS_URL=")
    assert "expected " in problem


def test_kafka_bus_reading_the_output_topic_of_the_same_cluster_is_refused() -> None:
    [problem] = problems_of(
        VABUS_URL="kafka://k1:9092/aggs", KAFKA_BOOTSTRAP_SERVERS="k1:9092", KAFKA_TOPIC="aggs"
    )
    assert problem.startswith("VABUS_URL=")


# --- each invalid variable is reported by name, with its value --------------------------

INVALID: list[tuple[str, str]] = [
    ("VABUS_BATCH_LIMIT", "0"),
    ("VABUS_BATCH_LIMIT", "ten"),
    ("VABUS_WAIT", "-1"),
    ("VABUS_TIMEOUT", "0"),
    ("VABUS_KAFKA_SESSION_TIMEOUT_MS", "1.5"),
    ("VABUS_MAX_MESSAGE_BYTES", "-5"),
    ("VABUS_MAX_RESPONSE_BYTES", "1023"),
    ("VABUS_MAX_RESPONSE_BYTES", "16MiB"),
    ("VABUS_MAX_EVENTS_PER_MESSAGE", "0"),
    ("STORAGE_TYPE", "s3"),
    ("STORAGE_TYPE", "kafka,kafka"),
    ("STORAGE_TYPE", "kafka,"),
    ("KAFKA_BOOTSTRAP_SERVERS", "localhost"),
    ("KAFKA_BOOTSTRAP_SERVERS", "a:1,,b:2"),
    ("KAFKA_BOOTSTRAP_SERVERS", "a:70000"),
    ("KAFKA_TOPIC", "has space"),
    ("KAFKA_TOPIC", ".."),
    ("KAFKA_DLQ_TOPIC", "a/b"),
    ("KAFKA_DLQ_TOPIC", "aggregated-events"),
    ("KAFKA_SECURITY_PROTOCOL", "TLS"),
    ("KAFKA_SASL_MECHANISM", "GSSAPI"),
    ("KAFKA_SSL_CAFILE", "/nonexistent/ca.pem"),
    ("KAFKA_SSL_CERTFILE", "/nonexistent/cert.pem"),
    ("KAFKA_SSL_KEYFILE", "/nonexistent/key.pem"),
    ("KAFKA_LINGER_MS", "-1"),
    ("KAFKA_MAX_REQUEST_SIZE", "0"),
    ("POSTGRES_DSN", "mysql://db/x"),
    ("POSTGRES_CONNECTION_STRING", "mysql://db/x"),
    ("POSTGRES_TABLE", "agg; drop table x"),
    ("POSTGRES_TABLE", "1abc"),
    ("POSTGRES_TABLE", "dead_letters"),
    ("POSTGRES_POOL_MIN", "-1"),
    ("POSTGRES_POOL_MIN", "9"),
    ("POSTGRES_POOL_MAX", "0"),
    ("AGGREGATION_INTERVAL", "0"),
    ("AGGREGATION_INTERVAL", "1m"),
    ("AGGREGATION_INTERVAL", "nan"),
    ("AGGREGATION_GRACE", "-0.1"),
    ("AGGREGATION_MAX_FUTURE", "0"),
    ("AGGREGATION_MAX_WATERMARK_LEAD", "-1"),
    ("AGGREGATION_MAX_WATERMARK_LEAD", "1m"),
    ("AGGREGATION_MAX_WATERMARK_LEAD", "3601"),
    ("AGGREGATION_IDLE_TIMEOUT", "0"),
    ("AGGREGATION_MAX_OPEN_WINDOWS", "0"),
    ("AGGREGATION_HOP", "0"),
    ("AGGREGATION_HOP", "7"),  # does not divide the 60 s interval
    ("AGGREGATION_HOP", "120"),
    ("AGGREGATION_HOP", "-10"),
    ("HTTP_HOST", "   "),
    ("HTTP_PORT", "65536"),
    ("HTTP_PORT", "-1"),
    ("METRICS_INTERVAL", "0"),
    ("LOG_LEVEL", "verbose"),
    ("LOG_FORMAT", "xml"),
    ("SHUTDOWN_TIMEOUT", "-3"),
    ("CHECKPOINT_INTERVAL", "inf"),
    ("STATE_DIR", " "),
    ("HUB_QUEUE_SIZE", "0"),
    ("SINK_BATCH_SIZE", "many"),
    ("WORKERS", "0"),
    ("WORKERS", "two"),
    ("WORKERS", "1.5"),
]


@pytest.mark.parametrize(("name", "value"), INVALID)
def test_invalid_variable_is_reported_with_its_name_value_and_expected_form(
    name: str, value: str
) -> None:
    [problem] = problems_of(**{name: value})
    assert problem.startswith(f"{name}={value!r}: expected ")


def test_hop_that_does_not_divide_the_interval_names_it() -> None:
    [problem] = problems_of(AGGREGATION_INTERVAL="20", AGGREGATION_HOP="3")
    assert problem == (
        "AGGREGATION_HOP='3': expected a number of seconds > 0 that divides "
        "AGGREGATION_INTERVAL (20)"
    )


def test_hop_with_allowed_lateness_is_accepted() -> None:
    # corrections of hopping windows (docs/hopping.md, service.aggregation.hop_corrections)
    cfg = load(AGGREGATION_HOP="10", AGGREGATION_ALLOWED_LATENESS="30").aggregation
    assert (cfg.hop_s, cfg.allowed_lateness_s) == (10.0, 30.0)


def test_postgres_output_without_dsn_is_reported() -> None:
    [problem] = problems_of(STORAGE_TYPE="kafka,postgres")
    assert problem.startswith("POSTGRES_DSN='': expected ")
    assert "STORAGE_TYPE" in problem


def test_sasl_protocol_without_credentials_reports_each_missing_variable() -> None:
    problems = problems_of(KAFKA_SECURITY_PROTOCOL="SASL_SSL")
    assert [p.split("=", 1)[0] for p in problems] == [
        "KAFKA_SASL_MECHANISM",
        "KAFKA_SASL_USERNAME",
        "KAFKA_SASL_PASSWORD",
    ]


def test_dsn_and_its_alias_that_differ_are_reported() -> None:
    other = DSN.replace("metrics", "other")
    [problem] = problems_of(POSTGRES_DSN=DSN, POSTGRES_CONNECTION_STRING=other)
    assert problem.startswith("POSTGRES_CONNECTION_STRING=")


def test_workers_default_to_one() -> None:
    assert load().runtime.workers == 1


@pytest.mark.parametrize("url", ["http://bus:8081", "https://bus/v1", "demo://?rate=10&names=2"])
def test_several_workers_without_a_kafka_bus_are_reported_naming_workers_and_the_url(
    url: str,
) -> None:
    [problem] = problems_of(WORKERS="2", VABUS_URL=url)
    assert problem.startswith("WORKERS='2': expected 1, because VABUS_URL=")
    assert url.split("?")[0] in problem


def test_several_workers_with_a_bad_bus_url_report_only_the_url() -> None:
    [problem] = problems_of(WORKERS="2", VABUS_URL="ftp://bus")
    assert problem.startswith("VABUS_URL=")


def test_all_problems_are_reported_together_in_reading_order() -> None:
    with pytest.raises(ConfigError) as caught:
        load(HTTP_PORT="x", AGGREGATION_INTERVAL="0", VABUS_URL="ftp://x", LOG_FORMAT="xml")
    names = [p.split("=", 1)[0] for p in caught.value.problems]
    assert names == ["VABUS_URL", "AGGREGATION_INTERVAL", "HTTP_PORT", "LOG_FORMAT"]
    assert all(f"  - {p}" in str(caught.value) for p in caught.value.problems)


def test_config_error_is_a_value_error_that_is_not_retriable() -> None:
    with pytest.raises(ValueError) as caught:
        load(HTTP_PORT="x")
    assert isinstance(caught.value, ConfigError)
    assert not caught.value.retriable


# --- secrets ----------------------------------------------------------------------------

SECRET_ENV = {
    "VABUS_TOKEN": "tok-secret-1",
    "KAFKA_SASL_PASSWORD": "sasl-secret-1",
    "KAFKA_SECURITY_PROTOCOL": "SASL_SSL",
    "KAFKA_SASL_MECHANISM": "PLAIN",
    "KAFKA_SASL_USERNAME": "svc",
    "POSTGRES_DSN": DSN,
    "STORAGE_TYPE": "kafka,postgres",
}


def assert_no_secret(text: str) -> None:
    for secret in SECRETS:
        assert secret not in text


def test_secrets_are_absent_from_repr_and_str() -> None:
    config = load(**SECRET_ENV)
    assert_no_secret(repr(config))
    assert_no_secret(str(config))


def test_redacted_is_json_and_masks_secrets_and_the_dsn_password() -> None:
    view = load(**SECRET_ENV).redacted()
    text = json.dumps(view)
    assert_no_secret(text)
    assert view["bus"]["token"] == "***"
    assert view["kafka"]["sasl_password"] == "***"
    assert view["postgres"]["dsn"] == "postgresql://agg:***@db.example:5432/metrics"
    assert view["kafka"]["bootstrap_servers"] == ["localhost:9092"]


def test_redacted_masks_a_password_given_as_a_dsn_parameter() -> None:
    dsn = "postgresql:///metrics?host=/tmp/pg&password=pg-secret-1"
    view = load(POSTGRES_DSN=dsn).redacted()
    assert view["postgres"]["dsn"] == "postgresql:///metrics?host=/tmp/pg&password=***"


def test_unset_secrets_are_shown_empty_in_redacted() -> None:
    view = load().redacted()
    assert (view["bus"]["token"], view["postgres"]["dsn"]) == ("", "")


def test_problems_never_show_a_secret_value() -> None:
    env = {
        **SECRET_ENV,
        "VABUS_URL": "https://user:tok-secret-1@bus.example",
        "POSTGRES_CONNECTION_STRING": "postgresql://agg:pg-secret-1@elsewhere/x",
    }
    with pytest.raises(ConfigError) as caught:
        load(**env)
    assert len(caught.value.problems) == 2
    assert_no_secret(str(caught.value))
    assert_no_secret(repr(caught.value))


def test_bad_dsn_in_keyword_form_is_shown_fully_masked() -> None:
    [problem] = problems_of(POSTGRES_DSN="host=db password=pg-secret-1")
    assert problem.startswith("POSTGRES_DSN='***': expected postgresql://")


def test_secret_variable_is_masked_even_when_its_value_is_the_problem() -> None:
    [problem] = problems_of(
        KAFKA_SECURITY_PROTOCOL="SASL_SSL",
        KAFKA_SASL_MECHANISM="PLAIN",
        KAFKA_SASL_PASSWORD="sasl-secret-1",
    )
    assert problem.startswith("KAFKA_SASL_USERNAME=''")
    assert_no_secret(problem)


@pytest.mark.parametrize("token", ["short-token", "has a space in it!", "nön-ascii-tøken-value"])
def test_a_bad_http_auth_token_is_reported_without_its_value(token: str) -> None:
    [problem] = problems_of(HTTP_AUTH_TOKEN=token)
    assert problem.startswith("HTTP_AUTH_TOKEN='***': expected at least 16 printable ASCII")
    assert token not in problem


def test_the_http_auth_token_is_masked_in_redacted_and_repr() -> None:
    token = "http-auth-secret-1234"
    config = load(HTTP_AUTH_TOKEN=token)
    assert config.redacted()["http"]["auth_token"] == "***"
    assert token not in repr(config) and token not in json.dumps(config.redacted())


# --- sources: os.environ, .env, explicit environ ----------------------------------------


def test_dotenv_in_working_directory_is_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / ".env").write_text("HTTP_PORT=9000\n# a comment\nKAFKA_TOPIC='from-file'\n")
    monkeypatch.chdir(tmp_path)
    config = load_config({})
    assert (config.http.port, config.kafka.topic) == (9000, "from-file")


def test_explicit_environ_wins_over_dotenv(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / ".env").write_text("HTTP_PORT=9000\nKAFKA_TOPIC=from-file\n")
    monkeypatch.chdir(tmp_path)
    config = load_config({"HTTP_PORT": "9100"})
    assert (config.http.port, config.kafka.topic) == (9100, "from-file")


def test_bad_value_in_dotenv_is_reported_like_any_other(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / ".env").write_text("HTTP_PORT=port\n")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError) as caught:
        load_config({})
    assert caught.value.problems == ["HTTP_PORT='port': expected an integer 0-65535"]


def test_missing_dotenv_is_fine_and_none_skips_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    assert load_config({}) == Config()
    (tmp_path / ".env").write_text("HTTP_PORT=9000\n")
    assert load_config({}, dotenv=None) == Config()


def test_explicit_environ_ignores_the_process_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HTTP_PORT", "9200")
    assert load_config({}, dotenv=None).http.port == 8080


def test_without_explicit_environ_the_process_environment_is_read(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("HTTP_PORT", "9200")
    assert load_config(dotenv=None).http.port == 9200


def test_dollar_signs_are_taken_literally() -> None:
    assert load(KAFKA_SASL_PASSWORD="a${HOME}b").kafka.sasl_password.value == "a${HOME}b"


def test_dollar_signs_in_dotenv_are_taken_literally(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / ".env").write_text("KAFKA_SASL_PASSWORD=a${HOME}b$c\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", "/home/x")
    assert load_config({}).kafka.sasl_password.value == "a${HOME}b$c"


# --- .env.example stays in step with the loader -----------------------------------------

EXAMPLE = Path(__file__).resolve().parents[2] / ".env.example"


class RecordingEnviron(dict[str, str]):
    """An environment that remembers which variables were asked for."""

    def __init__(self) -> None:
        super().__init__()
        self.asked: set[str] = set()

    def get(self, key: str, default: Any = None) -> Any:
        self.asked.add(key)
        return super().get(key, default)


def example_variables() -> set[str]:
    lines = EXAMPLE.read_text().splitlines()
    return {line.split("=", 1)[0] for line in lines if line and not line.startswith("#")}


def test_env_example_parses_to_the_defaults() -> None:
    assert load_config({}, dotenv=str(EXAMPLE)) == Config()


def test_env_example_lists_exactly_the_variables_the_loader_reads() -> None:
    environ = RecordingEnviron()
    load_config(environ, dotenv=None)
    assert example_variables() == environ.asked


def test_a_required_bus_url_that_is_unset_is_a_problem_naming_it() -> None:
    with pytest.raises(ConfigError) as caught:
        load_config({}, dotenv=None, require_bus=True)
    [problem] = caught.value.problems
    assert problem.startswith("VABUS_URL=''") and "not set" in problem
    explicit = load_config({"VABUS_URL": "demo://?rate=5"}, dotenv=None, require_bus=True)
    assert explicit.bus.kind == "demo"  # the generator only when asked for


# --- rollups (contract §12.6) -------------------------------------------------------------


def test_rollups_default_to_none_and_read_a_comma_list() -> None:
    assert load().aggregation.rollups_s == ()
    cfg = load(AGGREGATION_INTERVAL="60", AGGREGATION_ROLLUPS="3600, 86400").aggregation
    assert cfg.rollups_s == (3600.0, 86400.0)


@pytest.mark.parametrize(
    ("value", "detail"),
    [
        ("90", "not a larger multiple of AGGREGATION_INTERVAL=60"),
        ("60", "not a larger multiple of AGGREGATION_INTERVAL=60"),
        ("3600,5400", "5400 is not a larger multiple of 3600"),
        ("3600,3600", "3600 is not a larger multiple of 3600"),
        ("86400,3600", "3600 is not a larger multiple of 86400"),
        ("-3600", "is not a number of seconds > 0"),
        ("hourly", ""),
        ("3600,", ""),
    ],
)
def test_rollups_that_are_not_increasing_multiples_exit_naming_the_variable(
    value: str, detail: str
) -> None:
    [problem] = problems_of(AGGREGATION_INTERVAL="60", AGGREGATION_ROLLUPS=value)
    assert problem.startswith(f"AGGREGATION_ROLLUPS={value!r}: expected a comma-separated list")
    assert detail in problem


def test_rollups_with_hops_are_an_error() -> None:
    [problem] = problems_of(
        AGGREGATION_INTERVAL="60", AGGREGATION_ROLLUPS="3600", AGGREGATION_HOP="10"
    )
    assert problem.startswith("AGGREGATION_HOP='10': expected AGGREGATION_INTERVAL (60)")
    cfg = load(AGGREGATION_INTERVAL="60", AGGREGATION_ROLLUPS="3600", AGGREGATION_HOP="60")
    assert cfg.aggregation.rollups_s == (3600.0,)
