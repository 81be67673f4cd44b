"""The contract of a lease: at most one holder per namespace, lost when the holder dies.

An HTTP bus has one stream and no consumer group: two instances reading it would each
get every event (a server that honours cursors) or half of them (a queue-like one). A
lease makes all but one of them *standbys*. The holder (the *leader*) reads; a standby
keeps trying to take the lease over and, once it has it, continues from the last
checkpoint. A lease is only as good as the death detection of whatever keeps it: see
the implementation for the bound it gives.
"""

from __future__ import annotations

from typing import Any, Literal, Protocol

__all__ = ["Lease", "LeaseRole"]

LeaseRole = Literal["standby", "leader"]


class Lease(Protocol):
    """One instance's claim on ``namespace`` (a checkpoint namespace).

    Driven by one task: :meth:`acquire`, then :meth:`wait_lost`, then :meth:`acquire`
    again, and so on; :meth:`stop` may come at any point and gives the lease up.
    """

    kind: str  # how the lease is kept, for logs and /status: "postgres advisory lock"
    namespace: str

    @property
    def role(self) -> LeaseRole: ...

    def describe(self) -> dict[str, Any]:
        """A JSON-able view for ``/status``: the role, and what is known of the holder."""

    async def acquire(self) -> None:
        """Return once this instance holds the lease, polling while another holds it.
        Transient failures are retried for ever; a permanent one (a refused login) is
        raised. Cancellable."""

    async def wait_lost(self) -> str:
        """While held: return, with the reason, once the lease is lost (the role is then
        ``standby`` again). Never returns while the lease is still held."""

    async def stop(self) -> None:
        """Give the lease up (a standby may take over at once). Idempotent."""
