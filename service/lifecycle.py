"""The shared shape of every resource: idempotent ``start``/``stop`` and ``async with``."""

from __future__ import annotations

from types import TracebackType
from typing import Self

__all__ = ["AsyncResource"]


class AsyncResource:
    """Mix-in: ``async with resource:`` starts it and stops it on the way out.

    Subclasses implement ``start`` and ``stop`` (both idempotent; ``stop`` flushes first).
    """

    async def start(self) -> None:
        raise NotImplementedError

    async def stop(self) -> None:
        raise NotImplementedError

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()
