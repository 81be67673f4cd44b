"""Backoff policies, kept apart from the operations they pace."""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Literal

__all__ = ["Backoff", "BackoffKind"]

BackoffKind = Literal["exponential", "linear", "fixed", "random"]


@dataclass(frozen=True, slots=True)
class Backoff:
    """Delay before retry ``attempt`` (1-based).

    exponential: initial * factor**(attempt-1), with full jitter when ``jitter``;
    linear: initial * attempt; fixed: initial; random: uniform(initial, maximum).
    Every delay is capped at ``maximum`` seconds.
    """

    kind: BackoffKind = "exponential"
    initial_s: float = 0.1
    maximum_s: float = 30.0
    factor: float = 2.0
    jitter: bool = True

    def delay(self, attempt: int, rng: random.Random | None = None) -> float:
        r = rng or random
        n = max(1, attempt)
        if self.kind == "fixed":
            d = self.initial_s
        elif self.kind == "linear":
            d = self.initial_s * n
        elif self.kind == "random":
            return r.uniform(self.initial_s, self.maximum_s)
        else:
            d = self.initial_s * self.factor ** min(n - 1, 64)
        d = min(d, self.maximum_s)
        if self.jitter and self.kind == "exponential":
            # "equal jitter": never less than half the step, so retries still spread out
            d = d / 2 + r.uniform(0, d / 2)
        return d
