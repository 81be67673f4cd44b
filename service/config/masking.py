"""Secrets and masking: values that never print themselves, and the masked forms
that problems, logs and ``/status`` show instead."""

from __future__ import annotations

import re
from dataclasses import dataclass, fields, is_dataclass
from typing import Any

__all__ = ["SECRET_VARIABLES", "URL_VARIABLES", "Secret", "mask_password", "plain", "shown"]

# Variables whose value is never shown; URL-like ones show it with the password masked.
SECRET_VARIABLES = frozenset(
    {"VABUS_TOKEN", "KAFKA_SASL_PASSWORD", "VABUS_KAFKA_SASL_PASSWORD", "HTTP_AUTH_TOKEN"}
)
URL_VARIABLES = frozenset({"VABUS_URL", "POSTGRES_DSN", "POSTGRES_CONNECTION_STRING"})
_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*")
_NOT_IN_USER = re.compile(r"[/?#@]")
# A *password* parameter's value: up to the next "&name=" (libpq ends it there), else the end.
_PASSWORD_PARAM = re.compile(
    r"[?&][^=&?]*password[^=&]*=(.*?)(?=&[A-Za-z_][A-Za-z0-9_.-]*=|\Z)",
    re.IGNORECASE | re.DOTALL,
)


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
    """``url`` with any password (user info or ``*password*`` parameter) as ``***``,
    whatever characters it holds: a raw ``@ / ? # : %`` or space cannot end it early.

    The user-info password runs from the first ``:`` after a clean user name (no ``/ ?
    # @``) to the *last* ``@``; a parameter's value runs to the next ``&name=`` (where
    libpq would end it too) or the end. Where those rules overlap (an ``@`` inside a
    parameter's password) the masked spans are merged: a DSN is never shown with part of
    a password, at worst with a little more masked than needed. Text that is not
    ``scheme://...`` is masked whole: it may be a key=value DSN.
    """
    if not url:
        return ""
    scheme, sep, rest = url.partition("://")
    if not sep or not _SCHEME.fullmatch(scheme):
        return "***"
    base = len(scheme) + len(sep)
    spans: list[tuple[int, int]] = []
    user, colon, _ = rest.partition(":")
    at = rest.rfind("@")
    if colon and at > len(user) and not _NOT_IN_USER.search(user):
        spans.append((base + len(user) + 1, base + at))
    spans.extend((base + m.start(1), base + m.end(1)) for m in _PASSWORD_PARAM.finditer(rest))
    masked = url
    for start, end in reversed(_merged(spans)):
        masked = masked[:start] + "***" + masked[end:]
    return masked


def _merged(spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for start, end in sorted(spans):
        if out and start <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], end))
        else:
            out.append((start, end))
    return out
