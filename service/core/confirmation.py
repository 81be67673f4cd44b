"""Confirmation: the explicit signal between whoever waits for a checkpoint and the sender
that makes it durable.

A checkpoint may outlive the wish for it: the bus waits for the checkpoint of revoked
partitions only so long (by then their new owner may have saved newer state), the
shutdown only until its deadline. The waiter then says so with :meth:`abandon`, and the
sender skips a checkpoint whose saving has not started. Waiting never changes the
outcome by itself: a waiter that times out or is cancelled only stops waiting, so giving
up is always a call that can be read in the code.
"""

from __future__ import annotations

import asyncio

__all__ = ["Confirmation"]


class Confirmation:
    """One checkpoint's outcome: confirmed, failed, or abandoned by its waiter first.

    The sender calls :meth:`confirm` once the checkpoint is durable (and its positions
    committed) or :meth:`fail`; the waiter calls :meth:`wait` and, when it gives up,
    :meth:`abandon`. The first outcome counts; later calls change nothing.
    """

    __slots__ = ("_abandoned", "_failure", "_settled")

    def __init__(self) -> None:
        self._settled = asyncio.Event()
        self._failure: BaseException | None = None
        self._abandoned = False

    @property
    def abandoned(self) -> bool:
        """The waiter gave up before the checkpoint was settled: do not save it."""
        return self._abandoned

    @property
    def settled(self) -> bool:
        """Confirmed or failed."""
        return self._settled.is_set()

    @property
    def confirmed(self) -> bool:
        return self._settled.is_set() and self._failure is None

    @property
    def failure(self) -> BaseException | None:
        """Why it failed, once it did."""
        return self._failure

    def abandon(self) -> None:
        """The waiter gives up; has no effect once the checkpoint is settled."""
        if not self._settled.is_set():
            self._abandoned = True

    def confirm(self) -> None:
        self._settled.set()

    def fail(self, exc: BaseException) -> None:
        if not self._settled.is_set():
            self._failure = exc
            self._settled.set()

    async def until_settled(self) -> None:
        """Wait until it is confirmed or failed, whichever; never raises the failure."""
        await self._settled.wait()

    async def wait(self) -> None:
        """Wait until it is confirmed; raises its failure. Cancelling the wait (or a
        timeout around it) leaves the checkpoint alone: call :meth:`abandon` for that."""
        await self._settled.wait()
        if self._failure is not None:
            raise self._failure
