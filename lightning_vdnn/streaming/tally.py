"""A running total that one thread adds to while another takes it.

The host update's worker adds its times and the training thread takes them at each step. ``self.x += f()``
reads ``x`` before calling ``f``, so a take during a kernel that released the GIL was overwritten when the
worker stored the old total plus its time: the reported time grew over the run instead of being the step's.
"""

from __future__ import annotations

import threading


class Tally:
    """``add`` from any thread; ``take`` returns the total since the last ``take`` and starts again at zero."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._total = 0.0

    def add(self, amount: float) -> None:
        with self._lock:
            self._total += amount

    def take(self) -> float:
        with self._lock:
            total, self._total = self._total, 0.0
        return total
