"""One small error tree. ``retriable`` tells retry loops whether trying again can help."""

from __future__ import annotations

__all__ = [
    "ConfigError",
    "PermanentSinkError",
    "ServiceError",
    "TransientError",
]


class ServiceError(Exception):
    retriable: bool = False


class TransientError(ServiceError):
    """A dependency is unreachable or overloaded; retrying later can succeed."""

    retriable = True


class PermanentSinkError(ServiceError):
    """A sink refuses the data itself (schema, permission); retrying cannot help."""


class ConfigError(ServiceError, ValueError):
    """Invalid configuration. ``problems`` holds one human line per bad variable."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("invalid configuration:\n" + "\n".join(f"  - {p}" for p in problems))
        self.problems = problems
