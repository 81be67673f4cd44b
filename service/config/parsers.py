"""Value parsers: pure functions of one string that raise :class:`Invalid` (a
``ValueError``) when it breaks its rule, and the bus URL forms."""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Literal, TypeVar
from urllib.parse import parse_qsl, urlsplit, urlunsplit

from service.config.sections import BusConfig

_T = TypeVar("_T")

SecurityProtocol = Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"]
SaslMechanism = Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"]
Output = Literal["kafka", "postgres"]
LogFormat = Literal["json", "text"]

PROTOCOLS: dict[str, SecurityProtocol] = {
    "PLAINTEXT": "PLAINTEXT",
    "SSL": "SSL",
    "SASL_PLAINTEXT": "SASL_PLAINTEXT",
    "SASL_SSL": "SASL_SSL",
}
MECHANISMS: dict[str, SaslMechanism] = {
    "PLAIN": "PLAIN",
    "SCRAM-SHA-256": "SCRAM-SHA-256",
    "SCRAM-SHA-512": "SCRAM-SHA-512",
}
OUTPUTS: dict[str, Output] = {"kafka": "kafka", "postgres": "postgres"}
LOG_FORMATS: dict[str, LogFormat] = {"json": "json", "text": "text"}
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


HOST_PORT = re.compile(r"(?P<host>\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9._-]+):(?P<port>[0-9]{1,5})")
TOPIC = re.compile(r"[A-Za-z0-9._-]{1,249}")
IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,62}")

HTTP_FORM = "http(s)://host[:port][/base] without credentials, query or fragment"
KAFKA_FORM = (
    "kafka://host:port[,host:port]/<topic>[?group=<id>&metrics_topic=<topic>&repartition=true]"
)
DEMO_FORM = "demo://[?rate=<events/s>&names=<n>]"
MECHANISM_FORM = "one of PLAIN, SCRAM-SHA-256, SCRAM-SHA-512"
FILE_FORM = "the path of an existing file"
TOPIC_FORM = "a Kafka topic name (1-249 of A-Z a-z 0-9 . _ -)"


class Invalid(ValueError):
    """A value broke its rule. ``expected`` replaces the variable's general form when a
    more precise one is known; ``detail`` says what exactly is wrong (never a secret)."""

    def __init__(self, detail: str = "", expected: str | None = None) -> None:
        super().__init__(detail)
        self.detail = detail
        self.expected = expected


def non_empty(value: str) -> str:
    if not value.strip():
        raise Invalid()
    return value.strip()


def choice(value: str, options: tuple[str, ...]) -> str:
    if value not in options:
        raise Invalid()
    return value


def pick(key: str, options: Mapping[str, _T]) -> _T:
    try:
        return options[key]
    except KeyError:
        raise Invalid() from None


def parse_outputs(value: str) -> tuple[Output, ...]:
    """Any order, no duplicates; the order given is kept."""
    names = [part.strip().lower() for part in value.split(",")]
    if len(set(names)) != len(names):
        raise Invalid("duplicate output")
    return tuple(pick(name, OUTPUTS) for name in names)


def parse_servers(value: str) -> tuple[str, ...]:
    servers = tuple(part.strip() for part in value.split(","))
    for server in servers:
        match = HOST_PORT.fullmatch(server)
        if match is None or not 1 <= int(match["port"]) <= 65535:
            raise Invalid(f"bad server {server!r}" if server else "empty entry")
    return servers


def existing_file(value: str) -> str:
    if not Path(value).is_file():
        raise Invalid("no such file")
    return value


def parse_topic(value: str) -> str:
    if not TOPIC.fullmatch(value) or value in (".", ".."):
        raise Invalid()
    return value


def parse_tag_keys(value: str) -> tuple[str, ...]:
    """``host, region`` -> ``("host", "region")``: distinct, printable, at most 200 long."""
    keys = tuple(k.strip() for k in value.split(",") if k.strip())
    for key in keys:
        if len(key) > 200 or not key.isprintable():
            raise Invalid(f"tag key {key[:40]!r} is not 1-200 printable characters")
    if len(set(keys)) != len(keys):
        raise Invalid("a tag key is listed twice")
    return keys


def parse_rollups(value: str) -> tuple[float, ...]:
    """``3600, 86400`` -> ``(3600.0, 86400.0)``: finite seconds above 0, strictly
    increasing, each a whole multiple of the one before (checked against the interval
    by the loader)."""
    lengths = tuple(float(v) for v in value.split(","))
    for i, length in enumerate(lengths):
        if not (math.isfinite(length) and length > 0):
            raise Invalid(detail=f"{length!r} is not a number of seconds > 0")
        if i and not _multiple(length, lengths[i - 1]):
            raise Invalid(detail=f"{length:g} is not a larger multiple of {lengths[i - 1]:g}")
    return lengths


def _multiple(length: float, base: float) -> bool:
    """``length`` is ``k * base`` for a whole ``k >= 2``."""
    k = round(length / base)
    return k >= 2 and k * base == length


def parse_identifier(value: str) -> str:
    if not IDENTIFIER.fullmatch(value):
        raise Invalid()
    return value


def parse_dsn(value: str) -> str:
    parts = urlsplit(value)
    if parts.scheme not in ("postgresql", "postgres"):
        raise Invalid()
    if value.count("@") > 1 or ("@" in value and "@" not in parts.netloc):
        # A raw '@ # / ?' in the password: the driver would cut the URL elsewhere, use
        # a piece of the password as host or port, and quote it in its errors.
        raise Invalid("write '@', '#', '/' and '?' in the password as %40, %23, %2F and %3F")
    return value


def parse_bus_url(url: str) -> BusConfig:
    parts = urlsplit(url.strip())  # a bad IPv6 literal raises ValueError
    parse = {"http": http_bus, "https": http_bus, "kafka": kafka_bus, "demo": demo_bus}
    if parts.scheme not in parse:
        raise Invalid(f"unknown scheme {parts.scheme!r}" if parts.scheme else "no scheme")
    if parts.username is not None or parts.password is not None:
        raise Invalid(
            "no credentials in the URL: use VABUS_TOKEN or KAFKA_SASL_*",
            expected=HTTP_FORM if parts.scheme.startswith("http") else KAFKA_FORM,
        )
    return parse[parts.scheme](url.strip())


def http_bus(url: str) -> BusConfig:
    parts = urlsplit(url)
    try:
        port = parts.port
    except ValueError:
        raise Invalid("bad port", expected=HTTP_FORM) from None
    if not parts.hostname or port == 0 or parts.query or parts.fragment:
        raise Invalid(expected=HTTP_FORM)
    base = urlunsplit((parts.scheme, parts.netloc, parts.path.rstrip("/"), "", ""))
    return BusConfig(url=base, kind="http", http_base_url=base)


def kafka_bus(url: str) -> BusConfig:
    parts = urlsplit(url)
    if not parts.netloc:
        raise Invalid("no bootstrap servers", expected=KAFKA_FORM)
    try:
        servers = parse_servers(parts.netloc)
    except Invalid as error:
        raise Invalid(error.detail, expected=KAFKA_FORM) from None
    params = query(parts.query, allowed=("group", "metrics_topic", "repartition"), form=KAFKA_FORM)
    defaults = BusConfig()
    topic = parts.path.removeprefix("/") or defaults.kafka_topic
    for what, name in (("topic", topic), ("metrics_topic", params.get("metrics_topic"))):
        if name is not None and (not TOPIC.fullmatch(name) or name in (".", "..")):
            raise Invalid(f"bad {what} {name!r}", expected=KAFKA_FORM)
    if params.get("group") == "":
        raise Invalid("empty group", expected=KAFKA_FORM)
    repartition = params.get("repartition", "false").lower()
    if repartition not in ("true", "false"):
        raise Invalid(f"repartition must be true or false, not {repartition!r}", KAFKA_FORM)
    return BusConfig(
        url=url,
        kind="kafka",
        kafka_bootstrap_servers=servers,
        kafka_topic=topic,
        kafka_group=params.get("group", defaults.kafka_group),
        kafka_metrics_topic=params.get("metrics_topic", defaults.kafka_metrics_topic),
        kafka_repartition=repartition == "true",
    )


def demo_bus(url: str) -> BusConfig:
    parts = urlsplit(url)
    if parts.netloc or parts.path or parts.fragment:
        raise Invalid(expected=DEMO_FORM)
    params = query(parts.query, allowed=("rate", "names"), form=DEMO_FORM)
    defaults = BusConfig()
    try:
        rate = float(params.get("rate", defaults.demo_rate))
        names = int(params.get("names", defaults.demo_names))
    except ValueError:
        raise Invalid("rate and names must be numbers", expected=DEMO_FORM) from None
    if not 0 < rate < float("inf") or names < 1:
        raise Invalid("rate must be > 0 and names >= 1", expected=DEMO_FORM)
    return BusConfig(url=url, kind="demo", demo_rate=rate, demo_names=names)


def query(query: str, *, allowed: tuple[str, ...], form: str) -> dict[str, str]:
    params: dict[str, str] = {}
    for key, value in parse_qsl(query, keep_blank_values=True):
        if key not in allowed:
            raise Invalid(f"unknown parameter {key!r}", expected=form)
        if key in params:
            raise Invalid(f"{key!r} given twice", expected=form)
        params[key] = value
    return params


BEARER_FORM = "at least 16 printable ASCII characters without spaces (e.g. openssl rand -hex 32)"
_AUTH_TOKEN = re.compile(r"[\x21-\x7e]{16,}")


def parse_auth_token(value: str) -> str:
    """HTTP_AUTH_TOKEN: sent in a header, so visible ASCII only; long enough to guess."""
    if not _AUTH_TOKEN.fullmatch(value):
        raise Invalid()
    return value
