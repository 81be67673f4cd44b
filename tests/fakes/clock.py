"""A manual clock for unit tests that also remembers every sleep asked of it."""

from __future__ import annotations

from service.core.clock import ManualClock


class RecordingClock(ManualClock):
    """A :class:`ManualClock` that records each sleep's length in ``sleeps``."""

    def __init__(self) -> None:
        super().__init__()
        self.sleeps: list[float] = []

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        await super().sleep(seconds)
