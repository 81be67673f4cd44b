"""What every aiokafka client of the service shares (bus and sink): the connection and
security options, and creating the topics the service owns."""

from __future__ import annotations

import logging
import ssl
from collections.abc import Iterable, Mapping
from typing import Any, Protocol

from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaError, TopicAlreadyExistsError, for_code

from service.config import BusConfig, KafkaConfig, Secret

__all__ = [
    "bus_client_options",
    "client_options",
    "create_topics",
    "group_member_options",
]

log = logging.getLogger(__name__)


class _Security(Protocol):
    """A cluster's security settings: KafkaConfig (the output cluster's, KAFKA_*) and
    KafkaSecurity (the bus cluster's, VABUS_KAFKA_*) both have them."""

    @property
    def security_protocol(self) -> str: ...
    @property
    def sasl_mechanism(self) -> str | None: ...
    @property
    def sasl_username(self) -> str | None: ...
    @property
    def sasl_password(self) -> Secret: ...
    @property
    def ssl_cafile(self) -> str | None: ...
    @property
    def ssl_certfile(self) -> str | None: ...
    @property
    def ssl_keyfile(self) -> str | None: ...


def client_options(
    cfg: KafkaConfig, bootstrap_servers: tuple[str, ...] | None = None
) -> dict[str, Any]:
    """Keyword arguments for AIOKafkaProducer/Consumer/AdminClient of the output
    cluster: servers and security (KAFKA_*).

    SSL uses the system trust store unless ``ssl_cafile`` is given; SASL mechanisms are
    PLAIN and SCRAM-SHA-256/512, as aiokafka supports them.
    """
    return _options(cfg, bootstrap_servers or cfg.bootstrap_servers)


def bus_client_options(bus: BusConfig, kafka: KafkaConfig) -> dict[str, Any]:
    """:func:`client_options` for a client of the bus cluster (the bus, its metrics
    producer, the repartition topic, the Kafka checkpoint store): the bus's brokers
    (KAFKA_BOOTSTRAP_SERVERS when the URL names none) with the bus's own security
    (``bus.kafka_security``), never the output cluster's credentials."""
    return _options(bus.kafka_security, bus.kafka_bootstrap_servers or kafka.bootstrap_servers)


def _options(sec: _Security, servers: tuple[str, ...]) -> dict[str, Any]:
    opts: dict[str, Any] = {
        "bootstrap_servers": ",".join(servers),
        "security_protocol": sec.security_protocol,
    }
    if sec.security_protocol in ("SSL", "SASL_SSL"):
        ctx = ssl.create_default_context(cafile=sec.ssl_cafile)
        if sec.ssl_certfile:
            ctx.load_cert_chain(sec.ssl_certfile, sec.ssl_keyfile)
        opts["ssl_context"] = ctx
    if sec.security_protocol in ("SASL_PLAINTEXT", "SASL_SSL"):
        opts["sasl_mechanism"] = sec.sasl_mechanism or "PLAIN"
        opts["sasl_plain_username"] = sec.sasl_username
        opts["sasl_plain_password"] = sec.sasl_password.value
    return opts


async def create_topics(
    options: Mapping[str, Any],
    topics: Iterable[str],
    partitions: int,
    configs: Mapping[str, str] | None = None,
) -> dict[str, KafkaError]:
    """Create the ``topics`` that do not exist, ``partitions`` each, replication 1
    (operators who want more replicas create the topics themselves), with the topic
    ``configs`` given; an existing topic is left as it is. Returns the topics the broker
    refused to create, with why; a broker that cannot be reached raises
    :class:`KafkaError`."""
    admin = AIOKafkaAdminClient(**options)
    await admin.start()
    try:
        extra = dict(configs or {})
        response = await admin.create_topics(
            [NewTopic(t, partitions, 1, topic_configs=extra) for t in dict.fromkeys(topics)]
        )
    finally:
        await admin.close()
    refused: dict[str, KafkaError] = {}
    for topic, code, message, *_ in response.topic_errors:
        if code == 0:
            log.info("kafka: created topic %s", topic)
        elif (error := for_code(code)) is not TopicAlreadyExistsError:
            refused[topic] = error(f"cannot create topic {topic!r}: {message}")
    return refused


def group_member_options(group: str, session_timeout_ms: int) -> dict[str, Any]:
    """Consumer options of a member of ``group`` that positions and commits itself."""
    return {
        "group_id": group,
        "enable_auto_commit": False,
        "auto_offset_reset": "earliest",
        "session_timeout_ms": session_timeout_ms,
        "heartbeat_interval_ms": max(100, session_timeout_ms // 3),
    }
