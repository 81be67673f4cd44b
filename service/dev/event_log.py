"""The emulator's retained event log: pre-serialised events at absolute offsets."""

from __future__ import annotations

__all__ = ["EventLog"]


class EventLog:
    """Pre-serialised events at absolute offsets; keeps the last ``max_events``.

    Offsets only grow. Trimming the list happens in chunks so appends stay amortised O(1);
    :attr:`oldest` is the retention bound readers see.
    """

    def __init__(self, max_events: int) -> None:
        if max_events < 1:
            raise ValueError(f"max_events must be >= 1, got {max_events}")
        self.max_events = max_events
        self._items: list[bytes] = []
        self._base = 0  # absolute offset of _items[0]

    @property
    def end(self) -> int:
        """Offset the next appended event gets."""
        return self._base + len(self._items)

    @property
    def oldest(self) -> int:
        return max(self._base, self.end - self.max_events)

    def __len__(self) -> int:
        return self.end - self.oldest

    def extend(self, items: list[bytes]) -> None:
        self._items.extend(items)
        excess = len(self._items) - self.max_events
        if excess > self.max_events // 8:
            del self._items[:excess]
            self._base += excess

    def read(self, start: int, limit: int) -> list[bytes]:
        """Up to ``limit`` events from offset ``start`` (clamped to what is retained)."""
        begin = max(start, self.oldest) - self._base
        return self._items[begin : begin + limit]
