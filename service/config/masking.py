"""Secrets and masking: values that never print themselves, and the masked forms
that problems, logs and ``/status`` show instead."""

from __future__ import annotations

import re
from dataclasses import dataclass, fields, is_dataclass
from typing import Any
from urllib.parse import urlsplit

__all__ = ["SECRET_VARIABLES", "URL_VARIABLES", "Secret", "mask_password", "plain", "shown"]

# Variables whose value is never shown; URL-like ones show it with the password masked.
SECRET_VARIABLES = frozenset({"VABUS_TOKEN", "KAFKA_SASL_PASSWORD", "VABUS_KAFKA_SASL_PASSWORD"})
URL_VARIABLES = frozenset({"VABUS_URL", "POSTGRES_DSN", "POSTGRES_CONNECTION_STRING"})
_PASSWORD_PARAM = re.compile(r"((?:^|&)[^=&]*password[^=&]*=)[^&]*", re.IGNORECASE)


@dataclass(frozen=True, slots=True)
class Secret:
    """A string that does not print itself."""

    value: str

    def __repr__(self) -> str:
        return "Secret('***')" if self.value else "Secret('')"

    __str__ = __repr__

    def __bool__(self) -> bool:
        return bool(self.value)


def plain(value: Any) -> Any:
    """Dataclasses to dicts, tuples to lists, secrets to a mask (never their value)."""
    if isinstance(value, Secret):
        return "***" if value else ""
    if is_dataclass(value) and not isinstance(value, type):
        return {f.name: plain(getattr(value, f.name)) for f in fields(value)}
    if isinstance(value, tuple | list):
        return [plain(item) for item in value]
    return value


def shown(name: str, raw: str) -> str:
    if name in SECRET_VARIABLES and raw:
        return "'***'"
    if name in URL_VARIABLES and (name != "VABUS_URL" or "@" in raw):
        return repr(mask_password(raw))
    return repr(raw)


def mask_password(url: str) -> str:
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
