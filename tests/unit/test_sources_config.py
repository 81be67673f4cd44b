"""VABUS_URL with several sources: parsed in order, each problem naming its source."""

from __future__ import annotations

import pytest

from service.config import load_config
from service.config.sections import Config
from service.core.errors import ConfigError

K1 = "kafka://k:9092/events-a?group=ga"
K2 = "kafka://k:9092/events-b?group=gb"
H = "http://bus.example:8080/v1"


def load(**env: str) -> Config:
    return load_config(env, dotenv=None)


def problems(**env: str) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        load(**env)
    return caught.value.problems


def test_one_url_is_source_one_alone_as_before() -> None:
    config = load(VABUS_URL=K1)
    assert config.more_sources == ()
    assert config.sources == (config.bus,)
    assert config.bus.kafka_topic == "events-a"


def test_several_urls_are_sources_in_the_order_given_with_the_shared_settings() -> None:
    config = load(VABUS_URL=f"  {K1}\n{H}\t {K2} ", VABUS_TOKEN="t0ken", VABUS_WAIT="2")
    kinds = [
        (s.kind, s.kafka_topic if s.kind == "kafka" else s.http_base_url) for s in config.sources
    ]
    assert kinds == [("kafka", "events-a"), ("http", H), ("kafka", "events-b")]
    assert config.bus.url == K1
    for source in config.sources:
        assert source.token.value == "t0ken"
        assert source.http_wait_s == 2.0


def test_a_bad_url_is_reported_with_its_position_and_the_expected_form() -> None:
    (line,) = problems(VABUS_URL=f"{K1} {H} ftp://x")
    assert line.startswith("VABUS_URL=")
    assert "source 3 'ftp://x'" in line
    assert "unknown scheme 'ftp'" in line
    assert "separated by whitespace" in line


def test_demo_is_a_source_only_alone() -> None:
    (line,) = problems(VABUS_URL=f"{K1} demo://")
    assert "source 2 'demo://': demo:// is a source only alone" in line


def test_a_source_given_twice_is_refused() -> None:
    (line,) = problems(VABUS_URL=f"{H} {K1} {H}")
    assert "source 3 repeats source 1" in line


def test_kafka_sources_on_one_cluster_need_their_own_groups() -> None:
    (line,) = problems(VABUS_URL=f"{K1} kafka://k:9092/events-b?group=ga")
    assert "source 2 uses consumer group 'ga'" in line
    # another cluster may use the same group name
    load(VABUS_URL=f"{K1} kafka://other:9092/events-b?group=ga")


def test_two_sources_on_one_topic_are_refused() -> None:
    (line,) = problems(VABUS_URL=f"{K1} kafka://k:9092/events-a?group=gz")
    assert "source 2 reads topic 'events-a' as source 1 does" in line


def test_a_source_reading_our_own_output_is_refused() -> None:
    (line,) = problems(VABUS_URL=f"{H} kafka://localhost:9092/aggregated-events?group=x")
    assert line.startswith("VABUS_URL=") and "other than KAFKA_TOPIC" in line


def test_workers_need_every_source_to_be_kafka() -> None:
    assert load(VABUS_URL=f"{K1} {K2}", WORKERS="2").runtime.workers == 2
    (line,) = problems(VABUS_URL=f"{K1} {H}", WORKERS="2")
    assert line.startswith("WORKERS=") and repr(H) in line


def test_the_source_queue_is_bounded_and_has_a_default() -> None:
    assert load(VABUS_URL=f"{K1} {H}").runtime.source_queue_size == 16
    assert load(VABUS_SOURCE_QUEUE="3").runtime.source_queue_size == 3
    (line,) = problems(VABUS_SOURCE_QUEUE="0")
    assert line.startswith("VABUS_SOURCE_QUEUE=") and "integer >= 1" in line


def test_each_kafka_source_gets_the_bus_security_of_its_cluster() -> None:
    config = load(
        VABUS_URL=f"kafka://out:9092/a?group=g1 {H} kafka://in:9092/b?group=g2",
        KAFKA_BOOTSTRAP_SERVERS="out:9092",
        KAFKA_SECURITY_PROTOCOL="SSL",
    )
    first, _, third = config.sources
    assert first.kafka_security.inherited and first.kafka_security.security_protocol == "SSL"
    assert not third.kafka_security.inherited
    assert third.kafka_security.security_protocol == "PLAINTEXT"


@pytest.mark.parametrize(
    "url", ["https://user:p ss@bus.example", f"https://user:p http://x:y@z {K1}"]
)
def test_a_password_with_a_space_is_one_url_and_never_shown(url: str) -> None:
    (line,) = problems(VABUS_URL=url)
    assert line.startswith("VABUS_URL='https://user:***@")
    assert "'https://user:p'" not in line and "p ss" not in line and "x:y" not in line
