"""Capped exponential backoff with full jitter, shared by every reconnecting component."""

from __future__ import annotations

import random


class Backoff:
    """``next_delay()`` returns a random delay in [0, min(cap, base * 2**attempt)]."""

    def __init__(self, base: float = 0.5, cap: float = 30.0, rng: random.Random | None = None):
        self._base = base
        self._cap = cap
        self._attempt = 0
        self._rng = rng or random.Random()  # noqa: S311 - jitter, not cryptography

    def next_delay(self) -> float:
        ceiling = min(self._cap, self._base * 2**self._attempt)
        self._attempt = min(self._attempt + 1, 32)
        # Never below a tenth of the base: a zero delay would hammer a dead peer.
        return max(self._base / 10, self._rng.uniform(0, ceiling))

    def reset(self) -> None:
        self._attempt = 0
