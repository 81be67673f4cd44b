"""The bus cluster's own SASL/SSL settings (VABUS_KAFKA_*): which settings each Kafka
client gets, as the wiring builds it (nothing connects), and that the output cluster's
password never reaches the bus's brokers."""

from __future__ import annotations

import json
from typing import Any, cast

import pytest

from service.bus.kafka import KafkaBus
from service.config import load_config
from service.config.masking import shown
from service.core.clock import SystemClock
from service.core.errors import ConfigError
from service.metrics.collector import MetricsCollector
from service.repartition.router import RepartitionedBus
from service.wiring import build_bus, build_outputs

OUTPUT_SASL = {
    "KAFKA_BOOTSTRAP_SERVERS": "out1:9093,out2:9093",
    "KAFKA_SECURITY_PROTOCOL": "SASL_PLAINTEXT",
    "KAFKA_SASL_MECHANISM": "SCRAM-SHA-512",
    "KAFKA_SASL_USERNAME": "writer",
    "KAFKA_SASL_PASSWORD": "output-secret",
}
OTHER_BUS = "kafka://bus1:9092,bus2:9092/events?group=g"


def bus_clients(env: dict[str, str]) -> list[dict[str, Any]]:
    """The options of every client that talks to the bus cluster: the bus (its consumer
    and metrics producer share them), the repartition router and the Kafka checkpoint
    store."""
    config = load_config({"STORAGE_TYPE": "kafka", **env}, dotenv=None)
    metrics = MetricsCollector()
    bus = cast(KafkaBus, build_bus(config, metrics, SystemClock()))
    routed_config = load_config(
        {"STORAGE_TYPE": "kafka", **env, "VABUS_URL": env["VABUS_URL"] + "&repartition=true"},
        dotenv=None,
    )
    routed = cast(RepartitionedBus, build_bus(routed_config, metrics, SystemClock()))
    store = build_outputs(config, metrics, SystemClock()).store
    return [
        bus._options,
        routed._router._options,
        routed._windowing._options,
        store._options,  # type: ignore[attr-defined]
    ]


def test_a_bus_on_other_brokers_never_gets_the_output_clusters_credentials() -> None:
    for opts in bus_clients({**OUTPUT_SASL, "VABUS_URL": OTHER_BUS}):
        assert opts["bootstrap_servers"] == "bus1:9092,bus2:9092"
        assert opts["security_protocol"] == "PLAINTEXT"
        assert "output-secret" not in repr(opts)
        assert "sasl_plain_username" not in opts


def test_a_bus_on_other_brokers_uses_its_own_sasl_and_ssl_settings(tmp_path: Any) -> None:
    ca = tmp_path / "bus-ca.pem"
    ca.write_text("not read: no connection is made")
    env = {
        **OUTPUT_SASL,
        "VABUS_URL": OTHER_BUS,
        "VABUS_KAFKA_SECURITY_PROTOCOL": "sasl_ssl",
        "VABUS_KAFKA_SASL_MECHANISM": "plain",
        "VABUS_KAFKA_SASL_USERNAME": "reader",
        "VABUS_KAFKA_SASL_PASSWORD": "bus-secret",
    }
    for opts in bus_clients(env):
        assert opts["security_protocol"] == "SASL_SSL"
        assert "ssl_context" in opts
        assert (opts["sasl_mechanism"], opts["sasl_plain_username"]) == ("PLAIN", "reader")
        assert opts["sasl_plain_password"] == "bus-secret"


def test_the_output_sink_keeps_the_output_clusters_settings() -> None:
    env = {
        **OUTPUT_SASL,
        "VABUS_URL": OTHER_BUS,
        "VABUS_KAFKA_SECURITY_PROTOCOL": "SASL_PLAINTEXT",
        "VABUS_KAFKA_SASL_MECHANISM": "PLAIN",
        "VABUS_KAFKA_SASL_USERNAME": "reader",
        "VABUS_KAFKA_SASL_PASSWORD": "bus-secret",
    }
    config = load_config({"STORAGE_TYPE": "kafka", **env}, dotenv=None)
    assert config.kafka.sasl_username == "writer"
    assert config.kafka.sasl_password.value == "output-secret"
    assert config.bus.kafka_security.sasl_password.value == "bus-secret"


def test_one_cluster_for_bus_and_output_keeps_the_kafka_settings_when_none_are_given() -> None:
    """Backward compatible: the same brokers (in any order) are one cluster."""
    env = {**OUTPUT_SASL, "VABUS_URL": "kafka://out2:9093,out1:9093/events?group=g"}
    for opts in bus_clients(env):
        assert opts["security_protocol"] == "SASL_PLAINTEXT"
        assert (opts["sasl_plain_username"], opts["sasl_plain_password"]) == (
            "writer",
            "output-secret",
        )
    config = load_config({"STORAGE_TYPE": "kafka", **env}, dotenv=None)
    assert config.bus.kafka_security.inherited


def test_one_cluster_with_bus_settings_given_uses_only_those() -> None:
    env = {
        **OUTPUT_SASL,
        "VABUS_URL": "kafka://out1:9093,out2:9093/events?group=g",
        "VABUS_KAFKA_SECURITY_PROTOCOL": "SSL",
    }
    for opts in bus_clients(env):
        assert opts["security_protocol"] == "SSL"
        assert "output-secret" not in repr(opts)


def test_sasl_on_the_bus_needs_its_mechanism_user_and_password() -> None:
    with pytest.raises(ConfigError) as failure:
        load_config(
            {"VABUS_URL": OTHER_BUS, "VABUS_KAFKA_SECURITY_PROTOCOL": "SASL_SSL"}, dotenv=None
        )
    problems = "\n".join(failure.value.problems)
    for name in (
        "VABUS_KAFKA_SASL_MECHANISM",
        "VABUS_KAFKA_SASL_USERNAME",
        "VABUS_KAFKA_SASL_PASSWORD",
    ):
        assert f"{name}" in problems and "VABUS_KAFKA_SECURITY_PROTOCOL=SASL_SSL" in problems


def test_a_bad_bus_security_protocol_is_named_with_its_value_and_form() -> None:
    with pytest.raises(ConfigError) as failure:
        load_config({"VABUS_URL": OTHER_BUS, "VABUS_KAFKA_SECURITY_PROTOCOL": "TLS"}, dotenv=None)
    (problem,) = failure.value.problems
    assert "VABUS_KAFKA_SECURITY_PROTOCOL='TLS'" in problem
    assert "SASL_SSL" in problem


def test_the_bus_password_is_masked_in_status_and_problems() -> None:
    env = {
        "VABUS_URL": OTHER_BUS,
        "VABUS_KAFKA_SECURITY_PROTOCOL": "SASL_PLAINTEXT",
        "VABUS_KAFKA_SASL_MECHANISM": "PLAIN",
        "VABUS_KAFKA_SASL_USERNAME": "reader",
        "VABUS_KAFKA_SASL_PASSWORD": "bus-#/?secret",
    }
    view = load_config(env, dotenv=None).redacted()
    assert view["bus"]["kafka_security"]["sasl_password"] == "***"
    assert "bus-#/?secret" not in json.dumps(view)
    assert shown("VABUS_KAFKA_SASL_PASSWORD", "bus-#/?secret") == "'***'"
