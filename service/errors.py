"""One small error tree. ``retriable`` tells retry loops whether trying again can help.

A :class:`TransientError` is retried where it happens (:func:`service.retry.retry`).
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
