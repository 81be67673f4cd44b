"""Options shared by every aiokafka client the service creates (bus and sink)."""

from __future__ import annotations

import ssl
from typing import Any

from service.config import KafkaConfig

__all__ = ["client_options"]


def client_options(
    cfg: KafkaConfig, bootstrap_servers: tuple[str, ...] | None = None
) -> dict[str, Any]:
    """Keyword arguments for AIOKafkaProducer/Consumer/AdminClient: servers and security.

    SSL uses the system trust store unless ``ssl_cafile`` is given; SASL mechanisms are
    PLAIN and SCRAM-SHA-256/512, as aiokafka supports them.
    """
    opts: dict[str, Any] = {
        "bootstrap_servers": ",".join(bootstrap_servers or cfg.bootstrap_servers),
        "security_protocol": cfg.security_protocol,
    }
    if cfg.security_protocol in ("SSL", "SASL_SSL"):
        ctx = ssl.create_default_context(cafile=cfg.ssl_cafile)
        if cfg.ssl_certfile:
            ctx.load_cert_chain(cfg.ssl_certfile, cfg.ssl_keyfile)
        opts["ssl_context"] = ctx
    if cfg.security_protocol in ("SASL_PLAINTEXT", "SASL_SSL"):
        opts["sasl_mechanism"] = cfg.sasl_mechanism or "PLAIN"
        opts["sasl_plain_username"] = cfg.sasl_username
        opts["sasl_plain_password"] = cfg.sasl_password.value
    return opts
