"""The memory a piece of code holds, as ``tracemalloc`` sees it: the driver that
bench.hopmem, bench.kept_memory and bench.rollup_memory share.

``with Heap() as heap:`` starts tracing (after a collection, so that garbage of what
came before is not freed inside and counted negative); ``heap.sample()`` after each
step records the bytes allocated and not freed since the start (``peak``, ``mean``);
``heap.held()`` is the same after a collection, for the state left at the end.
``Heap(trace=False)`` measures nothing (0 bytes), for a timing pass of the same code.
"""

from __future__ import annotations

import gc
import tracemalloc
from types import TracebackType

__all__ = ["Heap"]


class Heap:
    def __init__(self, *, trace: bool = True, collect: bool = False) -> None:
        """``collect``: each sample after a full collection too, which also empties
        CPython's free lists (objects freed but kept for reuse, which tracemalloc
        counts as allocated)."""
        self.trace = trace
        self.collect = collect
        self.samples: list[int] = []
        self._base = 0

    def __enter__(self) -> Heap:
        gc.collect()
        if self.trace:
            tracemalloc.start()
        self._base = tracemalloc.get_traced_memory()[0]
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self.trace:
            tracemalloc.stop()

    def sample(self) -> int:
        if self.collect:
            gc.collect()
        held = tracemalloc.get_traced_memory()[0] - self._base
        self.samples.append(held)
        return held

    def held(self) -> int:
        gc.collect()
        return tracemalloc.get_traced_memory()[0] - self._base

    @property
    def peak(self) -> int:
        return max(self.samples)

    @property
    def mean(self) -> int:
        return sum(self.samples) // len(self.samples)
