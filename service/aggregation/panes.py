"""Packed panes of hopping windows: the panes no event can reach any more, held flat.

With ``AGGREGATION_HOP`` a series with events in every pane holds ``interval / hop``
accumulators where tumbling windows hold one (exact min/max/first/last over a sliding
window need a partial per pane). Once the close boundary passes a pane's end it takes
no event (every later one is late: hopping.py), yet it serves its windows until the
last one is out. take_panes then *packs* it: per key a slot of the partition's
:class:`KeyTable` (which holds each key once for all packed panes) and the event
count, in arrays of the smallest integer type that fits, and the rest of the
accumulator as doubles in one ``array("d")`` — instead of a dict entry, a key tuple, a
name and a list of boxed floats per key and pane. A pane that still takes events stays
a dict (the hot loop never sees a packed pane); its new keys take the table's equal
key (:meth:`KeyTable.canonical`), so a series' name is held once, not once per pane.

Exactness: a packed accumulator unpacks to an equal list (a count is an ``int`` below
2**32, every other element a ``float``). Layouts that are not all floats — a wide
``avg``/``stddev`` (a 4th element), a DDSketch percentile store, a restored integer —
stay as they are in the pane's ``extra`` dict (count 0 marks the key's place, so the
keys keep their order: a window's rows come out in the order they did unpacked).

Flat layout per key after the count: ``count`` nothing; ``sum``/``avg``/``stddev``/
``first``/``last`` two doubles; ``min``/``max`` one; a percentile the count's values.
"""

from __future__ import annotations

from array import array
from collections.abc import Iterable, Iterator
from typing import Final

from service.aggregation.functions import Acc
from service.aggregation.kept import copy_acc
from service.aggregation.percentiles import PERCENTILES

__all__ = ["KeyTable", "PackedPane", "PackedPanes"]

Key = tuple[str, str]  # partition.WindowKey: (series, agg_func)

_TAIL: Final[dict[str, int]] = {  # doubles after the count; percentiles: the count's
    "count": 0,
    "sum": 2,
    "avg": 2,
    "stddev": 2,
    "first": 2,
    "last": 2,
    "min": 1,
    "max": 1,
}
_U32: Final = "I" if array("I").itemsize >= 4 else "L"  # at least 32 bits
_MAX_COUNT: Final = 2**32 - 1  # the largest count an ``array("I")`` holds
_FREED: Final = ("", "")  # the key of a free slot
_IN_EXTRA: Final = 0  # a count that no accumulator has: the key's state is in ``extra``


class KeyTable:
    """The keys of one partition's packed panes, each once, as slots: a pane holds a
    slot per key, the table the key and how many packed panes use it (a slot whose last
    pane is freed is reused)."""

    __slots__ = ("_free", "_index", "_refs", "keys")

    def __init__(self) -> None:
        self._index: dict[Key, int] = {}
        self.keys: list[Key] = []
        self._refs = array(_U32)
        self._free: list[int] = []

    def slot(self, key: Key) -> int:
        """The key's slot, counted as used once more."""
        slot = self._index.get(key)
        if slot is None:
            if self._free:
                slot = self._free.pop()
                self.keys[slot] = key
            else:
                slot = len(self.keys)
                self.keys.append(key)
                self._refs.append(0)
            self._index[key] = slot
        self._refs[slot] += 1
        return slot

    def slots(self, keys: Iterable[Key]) -> list[int]:
        """:meth:`slot` of each key (the common case, a key held already, inlined)."""
        index, refs, slot = self._index, self._refs, self.slot
        out: list[int] = []
        for key in keys:
            at = index.get(key)
            if at is None:
                out.append(slot(key))
            else:
                refs[at] += 1
                out.append(at)
        return out

    def canonical(self, key: Key) -> Key:
        """The table's own ``key`` when it holds an equal one, else ``key``: a pane that
        still takes events stores that one, so a series' name is held once, not per pane."""
        slot = self._index.get(key)
        return key if slot is None else self.keys[slot]

    def release(self, slots: array[int]) -> None:
        """A packed pane holding ``slots`` is freed."""
        refs = self._refs
        for slot in slots:
            refs[slot] -= 1
            if not refs[slot]:
                del self._index[self.keys[slot]]
                self.keys[slot] = _FREED  # the key (and its name) need not stay alive
                self._free.append(slot)

    def __len__(self) -> int:
        return len(self._index)


class PackedPane:
    """One packed pane: per key its slot and event count, the rest of its accumulator
    flat in ``data``, the unusual ones as they are (``extra``); ``events``: the events
    in it (the ledger's ``open``)."""

    __slots__ = ("counts", "data", "events", "extra", "slots")

    def __init__(
        self, slots: list[int], counts: list[int], data: list[float], extra: dict[Key, Acc] | None
    ) -> None:
        # built from lists, so that each array is allocated once, at its size
        self.slots = _small(slots)
        self.counts = _small(counts)
        self.data = array("d", data)
        self.extra = extra
        self.events = sum(counts) + sum(acc[0] for acc in extra.values()) if extra else sum(counts)


def _small(ints: list[int]) -> array[int]:
    """Non-negative ints below 2**32 in the smallest array that holds them (most panes
    have fewer than 256 keys and events per key: a byte each)."""
    top = max(ints, default=0)
    return array("B" if top < 2**8 else "H" if top < 2**16 else _U32, ints)


def _tail(func: str, acc: Acc) -> list[float] | None:
    """What follows the count in ``acc``, as doubles; None when that would not be exact
    (the count is checked by the caller)."""
    tail = _TAIL.get(func)
    if tail is None:
        values = acc[1] if func in PERCENTILES and len(acc) == 2 else None
        if type(values) is not list or len(values) != acc[0]:
            return None  # a sketch: kept as it is
        return values if all(type(v) is float for v in values) else None
    if len(acc) != tail + 1:
        return None  # a wide layout
    if tail == 2:
        return acc[1:] if type(acc[1]) is float and type(acc[2]) is float else None
    return acc[1:] if tail == 0 or type(acc[1]) is float else None


class PackedPanes:
    """A partition's packed panes by start, and the table of their keys (``table``: one
    shared with another store, so that a pane moves between them as it is)."""

    __slots__ = ("panes", "table")

    def __init__(self, table: KeyTable | None = None) -> None:
        self.table = KeyTable() if table is None else table
        self.panes: dict[float, PackedPane] = {}

    def pack(self, start: float, keyed: dict[Key, Acc]) -> None:
        """Pack the pane starting at ``start`` (which no event can reach any more)."""
        slots = self.table.slots(keyed)
        counts: list[int] = []
        data: list[float] = []
        extra: dict[Key, Acc] | None = None
        for key, acc in keyed.items():
            n = acc[0]
            tail = _tail(key[1], acc) if type(n) is int and 0 < n <= _MAX_COUNT else None
            if tail is None:
                if extra is None:
                    extra = {}
                extra[key] = acc
                counts.append(_IN_EXTRA)
            else:
                counts.append(n)
                data.extend(tail)
        self.panes[start] = PackedPane(slots, counts, data, extra)

    def entries(self, start: float) -> Iterator[tuple[Key, Acc]]:
        """The pane's keys and accumulators, in the order they were packed: each a new
        list the caller owns (merged into, checkpointed), equal to the one packed."""
        pane = self.panes[start]
        keys, data, extra = self.table.keys, pane.data, pane.extra
        at = 0
        for slot, n in zip(pane.slots, pane.counts, strict=True):
            key = keys[slot]
            if n == _IN_EXTRA:
                yield key, copy_acc(extra[key])  # type: ignore[index]  # marked: in extra
                continue
            tail = _TAIL.get(key[1])
            if tail is None:  # a percentile: its values
                yield key, [n, data[at : at + n].tolist()]
                at += n
            elif tail == 2:
                yield key, [n, data[at], data[at + 1]]
                at += 2
            elif tail == 1:
                yield key, [n, data[at]]
                at += 1
            else:
                yield key, [n]

    def free(self, start: float) -> tuple[int, int]:
        """Free a pane whose last window is out: (keys, events) it held."""
        pane = self.panes.pop(start)
        self.table.release(pane.slots)
        return len(pane.slots), pane.events

    def unpack(self, start: float) -> dict[Key, Acc]:
        """Take the pane out as the dict it was packed from (to add a correction to it:
        :mod:`service.aggregation.hop_corrections` packs it again)."""
        keyed = dict(self.entries(start))
        self.free(start)
        return keyed

    def keys(self) -> int:
        return sum(len(p.slots) for p in self.panes.values())

    def events(self) -> int:
        return sum(p.events for p in self.panes.values())
