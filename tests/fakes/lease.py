"""MemoryLease: an in-process :class:`~service.lease.base.Lease` for unit tests.

A :class:`MemoryLeaseServer` stands for the database: it records the holder of each
namespace. :meth:`MemoryLeaseServer.cut` ends the holder's session, as a server restart
or a dead connection would; :meth:`MemoryLease.stop` releases the lease, as the death
of its process would.
"""

from __future__ import annotations

import asyncio
from typing import Any

from service.lease.base import LeaseRole

__all__ = ["MemoryLease", "MemoryLeaseServer"]


class MemoryLeaseServer:
    def __init__(self) -> None:
        self.holders: dict[str, MemoryLease] = {}
        self._changed = asyncio.Condition()

    def lease(self, namespace: str) -> MemoryLease:
        return MemoryLease(self, namespace)

    async def cut(self, namespace: str, reason: str = "its session ended") -> None:
        """End the session of ``namespace``'s holder: it learns that it lost the lease."""
        holder = self.holders.get(namespace)
        if holder is not None:
            holder._lost_because = reason
            holder._lost.set()
            await self.release(holder)

    async def take(self, lease: MemoryLease) -> None:
        async with self._changed:
            await self._changed.wait_for(lambda: lease.namespace not in self.holders)
            self.holders[lease.namespace] = lease

    async def release(self, lease: MemoryLease) -> None:
        async with self._changed:
            if self.holders.get(lease.namespace) is lease:
                del self.holders[lease.namespace]
                self._changed.notify_all()


class MemoryLease:
    kind = "memory"

    def __init__(self, server: MemoryLeaseServer, namespace: str) -> None:
        self.namespace = namespace
        self._server = server
        self._lost = asyncio.Event()
        self._lost_because = ""
        self.acquisitions = 0

    @property
    def role(self) -> LeaseRole:
        return "leader" if self._server.holders.get(self.namespace) is self else "standby"

    def describe(self) -> dict[str, Any]:
        return {"role": self.role, "kind": self.kind, "namespace": self.namespace}

    async def acquire(self) -> None:
        self._lost.clear()
        await self._server.take(self)
        self.acquisitions += 1

    async def wait_lost(self) -> str:
        await self._lost.wait()
        return self._lost_because

    async def stop(self) -> None:
        await self._server.release(self)
