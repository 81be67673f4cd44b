"""The contract every output implements; the DataSender only talks to this."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from service.core.events import Aggregate, DeadLetter

__all__ = ["Sink"]


class Sink(Protocol):
    """A durable output for aggregates and dead letters.

    ``write`` returns only when everything passed to it is durable (acknowledged by
    the broker / committed by the database). It must be idempotent: writing the same
    aggregate twice leaves one stored result. Failures raise
    :class:`~service.core.errors.TransientError` (retry later) or
    :class:`~service.core.errors.PermanentError` (retrying cannot help).
    """

    name: str  # "kafka", "postgres", "memory"

    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    async def write(
        self, aggregates: Sequence[Aggregate], dead_letters: Sequence[DeadLetter]
    ) -> None: ...

    async def check(self) -> None:
        """Raise :class:`~service.core.errors.TransientError` if the output is unreachable."""
