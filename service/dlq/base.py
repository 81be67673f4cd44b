"""What ``dlq replay`` needs of where the dead letters are (PostgreSQL ``dead_letters``
or the Kafka dead-letter topic): select them, mark them with their outcome, keep the
accepted events of a marked dead letter until they are counted (a run), and the latest
window end the outputs hold."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from service.dlq.revalidate import Event

__all__ = ["DeadLetterRow", "DeadLetterSource", "Marked", "PendingRun", "Redriven"]

Redriven = tuple[str, str, list[Event]]
"""A marked dead letter's accepted events, and its positions ``[start, end)`` that
name its archive files."""


@dataclass(frozen=True, slots=True)
class DeadLetterRow:
    key: Any  # the source's identity of the dead letter (a row id, a topic offset)
    raw: str
    reason: str
    detail: str
    start: str  # its archive positions: unique per dead letter, stable across runs
    end: str


Marked = tuple[DeadLetterRow, str, Mapping[str, int]]
"""A dead letter, its ``replay_outcome`` and its ledger counts (docs/dlq.md)."""


@dataclass(frozen=True, slots=True)
class PendingRun:
    """Marked dead letters whose events are still to archive and recompute."""

    ref: Any  # the source's handle, to mark it finished
    events: list[Redriven]


class DeadLetterSource(Protocol):
    async def pending(self) -> list[PendingRun]:
        """The runs an earlier invocation left unfinished."""

    async def select(self, reason: str, since: float | None) -> tuple[list[DeadLetterRow], int]:
        """The unmarked dead letters of ``reason`` received from ``since`` on, and how
        many of them were marked before."""

    async def mark(
        self,
        outcomes: Sequence[Marked],
        accepted: Sequence[Redriven],
    ) -> PendingRun | None:
        """Durably, for each dead letter at once: its outcome, its ledger counts and
        its accepted events until they are counted (the run; None without any)."""

    async def finished(self, run: PendingRun) -> None: ...

    async def through(self, since: float) -> float:
        """The latest window end the outputs hold (the service's event time has passed
        it); ``since``: the earliest event time of interest."""
