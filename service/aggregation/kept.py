"""Emitted windows kept for corrections (``AGGREGATION_ALLOWED_LATENESS``, contract §12.4).

When a window is emitted and the allowed lateness is above 0, each partition keeps its
own share of it (its accumulators: emission and corrections merge the shares of several
partitions into copies, never into a kept one) with the revision last emitted, until its
watermark passes the window's end plus the lateness
(:func:`~service.aggregation.windows.is_expired`). A late event within that time is
added to the share and the window is emitted again (:mod:`service.aggregation.corrections`).

Kept windows travel in the partition's checkpoint (``kept`` and ``kept_from``, written
only while the lateness is above 0), so ``kill -9`` and hand-offs carry them. Windows
starting before ``kept_from`` were emitted without being kept (by a release before
1.3, or with lateness 0): late events for them are dead-lettered, never emitted as a
revision that lacks the events emitted before. A release before 1.3 ignores both
fields: it only loses the corrections.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from service.aggregation.functions import FUNCTIONS, Acc, valid
from service.aggregation.windows import is_expired

__all__ = ["Kept", "KeptWindows", "copy_acc", "decode", "encode", "expire", "restored_from"]

Key = tuple[str, str]  # partition.WindowKey: (series, agg_func)


@dataclass(slots=True)
class Kept:
    """A partition's share of one emitted window key: its accumulator and the revision
    last emitted for the key (merged over the partitions of this instance)."""

    acc: Acc
    revision: int


KeptWindows = dict[float, dict[Key, Kept]]


def copy_acc(acc: Acc) -> Acc:
    """A copy of an accumulator to merge other shares into, leaving the kept one as it
    is (a percentile's store is a list or a sketch: copied too)."""
    return copy.deepcopy(acc)


def expire(kept: KeptWindows, watermark: float, interval: float, lateness: float) -> int:
    """Free the windows whose correction time has passed; returns how many keys."""
    gone = [s for s in kept if is_expired(s, interval, watermark, lateness)]
    return sum(len(kept.pop(s)) for s in gone)


def encode(kept: KeptWindows, kept_from: float) -> dict[str, Any]:
    """The checkpoint fields (the state stays JSON: accumulators as they are)."""
    return {
        "kept_from": None if kept_from == -math.inf else kept_from,
        "kept": [
            [start, name, func, k.acc, k.revision]
            for start, keyed in kept.items()
            for (name, func), k in keyed.items()
        ],
    }


def restored_from(closed_until: float, ahead_closed: Iterable[float]) -> float:
    """``kept_from`` for a state stored without kept windows: every window it had
    emitted (up to its boundary, and those the quiet rule emitted above it) is final."""
    above = max(ahead_closed, default=-math.inf)
    return max(closed_until, math.nextafter(above, math.inf))


def decode(
    body: Mapping[str, Any], final_from: float
) -> tuple[KeptWindows, float, list[str]] | None:
    """The kept windows and ``kept_from`` of a checkpoint body, and why entries were
    dropped; None when the body has none (see :func:`restored_from`). A share that
    cannot be used makes its window final (and those before it; every window up to
    ``final_from`` when its start is unknown): its events were emitted, only the
    corrections are lost, and a late event must not start a revision 1 over again."""
    if "kept_from" not in body:
        return None
    raw_from = body["kept_from"]
    if raw_from is not None and (type(raw_from) not in (int, float) or math.isnan(raw_from)):
        raise ValueError(f"kept_from {raw_from!r} is not a time")
    kept_from = -math.inf if raw_from is None else float(raw_from)
    entries = body.get("kept", [])
    if type(entries) is not list:
        raise TypeError(f"kept is a {type(entries).__name__}")
    kept: KeptWindows = {}
    dropped: list[str] = []
    for entry in entries:
        why = _invalid(entry)
        if why is None:
            start, name, func, acc, revision = entry
            kept.setdefault(float(start), {})[(name, func)] = Kept(acc, revision)
            continue
        dropped.append(why)
        at: Any = entry[0] if type(entry) is list and entry else None
        if type(at) in (int, float) and math.isfinite(at):
            kept_from = max(kept_from, math.nextafter(float(at), math.inf))
        else:
            kept_from = max(kept_from, final_from)
    for start in [s for s in kept if s < kept_from]:
        del kept[start]
    return kept, kept_from, dropped


def _invalid(entry: Any) -> str | None:
    if type(entry) is not list or len(entry) != 5:
        return f"kept window {str(entry)[:100]} is not [start, name, func, state, revision]"
    start, name, func, acc, revision = entry
    if type(start) not in (int, float) or not math.isfinite(start):
        return f"kept window start {start!r} is not a time"
    if type(name) is not str or type(func) is not str or func not in FUNCTIONS:
        return f"kept window name {name!r} or function {func!r} is not valid"
    if type(revision) is not int or revision < 0:
        return f"kept window revision {revision!r} is not a revision"
    if not valid(func, acc):
        return f"kept window state of {name!r}/{func} is not a valid accumulator"
    return None
