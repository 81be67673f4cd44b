"""client_options: the aiokafka keyword arguments for each security protocol and SASL
mechanism, accepted by the real aiokafka constructors; create_topics on a fake admin."""

from __future__ import annotations

import ssl
from typing import Any

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import TopicAuthorizationFailedError

import service.kafka.options
from service.config import KafkaConfig, Secret
from service.kafka.options import client_options, create_topics

SERVERS = ("k1:9093", "k2:9093")


def cfg(protocol: Any, mechanism: Any = None) -> KafkaConfig:
    sasl = protocol.startswith("SASL_")
    return KafkaConfig(
        bootstrap_servers=SERVERS,
        security_protocol=protocol,
        sasl_mechanism=mechanism,
        sasl_username="svc" if sasl else None,
        sasl_password=Secret("pw" if sasl else ""),
    )


async def accepted_by_aiokafka(opts: dict[str, Any]) -> None:
    # The constructors validate protocol, mechanism and SSL context (nothing connects).
    producer = AIOKafkaProducer(**opts)
    consumer = AIOKafkaConsumer(**opts)
    admin = AIOKafkaAdminClient(**opts)
    for client in (producer, consumer):
        await client.stop()
    await admin.close()


async def test_plaintext_has_only_the_servers_and_the_protocol() -> None:
    opts = client_options(cfg("PLAINTEXT"))
    assert opts == {"bootstrap_servers": "k1:9093,k2:9093", "security_protocol": "PLAINTEXT"}
    await accepted_by_aiokafka(opts)


@pytest.mark.parametrize("mechanism", ["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"])
async def test_sasl_plaintext_passes_the_mechanism_and_credentials(mechanism: str) -> None:
    opts = client_options(cfg("SASL_PLAINTEXT", mechanism))
    assert opts == {
        "bootstrap_servers": "k1:9093,k2:9093",
        "security_protocol": "SASL_PLAINTEXT",
        "sasl_mechanism": mechanism,
        "sasl_plain_username": "svc",
        "sasl_plain_password": "pw",
    }
    await accepted_by_aiokafka(opts)


async def test_ssl_verifies_the_server_with_the_system_trust_store() -> None:
    opts = client_options(cfg("SSL"))
    ctx = opts.pop("ssl_context")
    assert isinstance(ctx, ssl.SSLContext)
    assert ctx.verify_mode == ssl.CERT_REQUIRED and ctx.check_hostname
    assert opts == {"bootstrap_servers": "k1:9093,k2:9093", "security_protocol": "SSL"}
    await accepted_by_aiokafka({**opts, "ssl_context": ctx})


@pytest.mark.parametrize("mechanism", ["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"])
async def test_sasl_ssl_has_both_the_context_and_the_credentials(mechanism: str) -> None:
    opts = client_options(cfg("SASL_SSL", mechanism))
    assert isinstance(opts["ssl_context"], ssl.SSLContext)
    assert (opts["sasl_mechanism"], opts["sasl_plain_username"], opts["sasl_plain_password"]) == (
        mechanism,
        "svc",
        "pw",
    )
    await accepted_by_aiokafka(opts)


def test_other_bootstrap_servers_keep_the_given_security() -> None:
    # (the bus's clients take their own settings: tests/unit/test_bus_security.py)
    opts = client_options(cfg("SASL_PLAINTEXT", "PLAIN"), ("bus:9092",))
    assert opts["bootstrap_servers"] == "bus:9092" and opts["sasl_mechanism"] == "PLAIN"


class FakeAdmin:
    """Answers create_topics as a broker would: 0 created, 36 exists, 29 not allowed."""

    codes = {"new": 0, "old": 36, "denied": 29}
    instances: list[FakeAdmin] = []

    def __init__(self, **options: Any) -> None:
        self.options = options
        self.asked: list[NewTopic] = []
        self.closed = False
        FakeAdmin.instances.append(self)

    async def start(self) -> None: ...

    async def close(self) -> None:
        self.closed = True

    async def create_topics(self, topics: list[NewTopic]) -> Any:
        self.asked = topics
        errors = [(t.name, self.codes[t.name], f"{t.name}!") for t in topics]
        return type("Response", (), {"topic_errors": errors})()


async def test_create_topics_returns_only_what_the_broker_refused(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(service.kafka.options, "AIOKafkaAdminClient", FakeAdmin)
    monkeypatch.setattr(FakeAdmin, "instances", [])
    refused = await create_topics({"request_timeout_ms": 5}, ["new", "old", "denied", "new"], 3)

    assert list(refused) == ["denied"]
    assert isinstance(refused["denied"], TopicAuthorizationFailedError)
    assert "cannot create topic 'denied': denied!" in str(refused["denied"])
    [admin] = FakeAdmin.instances
    assert [(t.name, t.num_partitions, t.replication_factor) for t in admin.asked] == [
        ("new", 3, 1),
        ("old", 3, 1),
        ("denied", 3, 1),
    ]
    assert admin.options == {"request_timeout_ms": 5} and admin.closed
