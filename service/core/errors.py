"""One small error tree. ``retriable`` tells retry loops whether trying again can help.

A :class:`TransientError` is retried where it happens (:func:`service.core.retry.retry`).
A :class:`PermanentError` is not: at start-up it fails the start, and while restoring
checkpoints it stops the intake (a partition is never read without its state). From an
output the sender passes it to the hub, which runs the sender again on the same items
with backoff, so the output holds (nothing is dropped) and resumes once an operator has
fixed the cause.
"""

from __future__ import annotations

__all__ = [
    "ConfigError",
    "PermanentError",
    "ServiceError",
    "TransientError",
    "describe_error",
    "is_retriable",
]


class ServiceError(Exception):
    """The root; not retriable unless a subclass (or an instance) says so."""

    retriable: bool = False


class TransientError(ServiceError):
    """A dependency is unreachable or overloaded; retrying later can succeed."""

    retriable = True


class PermanentError(ServiceError):
    """A dependency refuses the operation itself (missing table or privilege, wrong
    credentials, a record too large, a checkpoint of an unknown format): the same call
    fails until an operator changes something."""


class ConfigError(ServiceError, ValueError):
    """Invalid configuration. ``problems`` holds one human line per bad variable."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("invalid configuration:\n" + "\n".join(f"  - {p}" for p in problems))
        self.problems = problems


def is_retriable(exc: BaseException) -> bool:
    """What the exception says of itself: ``retriable`` of the service's error tree and of
    aiokafka's ``KafkaError``; False for exceptions that say nothing."""
    return bool(getattr(exc, "retriable", False))


def describe_error(exc: BaseException) -> str:
    """``Type: message`` for log lines; the service's own errors and messages that already
    start with their type name are shown as they are."""
    text = str(exc)
    kind = type(exc).__name__
    if not text:
        return kind
    if isinstance(exc, ServiceError) or text.startswith(kind):
        return text
    return f"{kind}: {text}"
