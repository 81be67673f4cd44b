"""Configuration: parsed once from the environment (and ``.env``) into frozen sections.

``sections`` holds the types, ``loader`` reads them (``reader`` collects every problem,
``parsers`` checks single values, ``masking`` keeps secrets out of sight). Each
component receives only its own section.
"""

from service.config.loader import load_config
from service.config.masking import Secret
from service.config.sections import (
    AggregationConfig,
    BusConfig,
    Config,
    HttpServerConfig,
    KafkaConfig,
    KafkaSecurity,
    LogConfig,
    PostgresConfig,
    RuntimeConfig,
)

__all__ = [
    "AggregationConfig",
    "BusConfig",
    "Config",
    "HttpServerConfig",
    "KafkaConfig",
    "KafkaSecurity",
    "LogConfig",
    "PostgresConfig",
    "RuntimeConfig",
    "Secret",
    "load_config",
]
