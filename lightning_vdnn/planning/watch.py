"""The steps a choice from a memory budget measures: the device's peak, and each watched step's wall time.

``planning/resident_blocks.py`` (resident blocks) and ``planning/saving_blocks.py`` (saving blocks) measure the first step, which profiles, and
:data:`VERIFY_STEPS` after each change they make, each from its first batch to the next step's.
"""

from __future__ import annotations

import time
from typing import Callable, Optional

import torch

#: Watched steps after a switch before the choice is trusted (as ``AutoPlanner`` verifies a plan).
VERIFY_STEPS = 3


class PeakMeter:
    """The device's peak allocated memory since :meth:`reset`: CUDA's allocator statistics, None on a CPU
    device (there, the host is the device). Tests and other allocators plug in their own."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def reset(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)

    def read(self) -> Optional[int]:
        return torch.cuda.max_memory_allocated(self.device) if self.device.type == "cuda" else None


class WatchedSteps:
    """The steps a choice from a budget measures, the first (profiling) one and :data:`VERIFY_STEPS` after each
    change, each from its first batch to the next step's (``AutoResidency``, ``saving.AutoSaving``).

    Args:
        meter: the device's peak memory.
        clock: seconds, for the watched steps' wall time (tests plug in their own).
    """

    def __init__(self, meter: PeakMeter, clock: Callable[[], float] = time.perf_counter) -> None:
        self.meter, self.clock = meter, clock
        self._window: Optional[int] = None  # the optimizer step whose peak is being measured
        self._left = 1  # watched steps still to come: the profiling step first
        self._started = 0.0
        #: wall time of the watched step that ended last, in seconds
        self.seconds: Optional[float] = None

    def ended(self, step: int) -> bool:
        """At the start of a batch, ``step`` optimizer steps done: whether a watched step has just ended (its
        peak is then ``meter.read()``)."""
        if self._window is None or step <= self._window:  # nothing watched, or its step still running
            return False
        self._sync()
        self._window, self.seconds = None, self.clock() - self._started
        return True

    @property
    def verified(self) -> bool:
        """Whether every step watched since the last change has ended."""
        return self._left <= 0 and self._window is None

    def after_change(self) -> None:
        self._left = VERIFY_STEPS

    def extend(self) -> None:
        """Watch one more step."""
        self._left += 1

    def start(self, step: int) -> bool:
        """Measure the step about to run if it is one to watch; whether it is."""
        if self._window is not None or self._left <= 0:
            return False
        self._left -= 1
        self._window = step
        self.meter.reset()
        self._sync()
        self._started = self.clock()
        return True

    def _sync(self) -> None:
        """The device's queued work done, so that the wall time is the step's, not how far ahead the host ran."""
        device = getattr(self.meter, "device", None)
        if device is not None and device.type == "cuda":
            torch.cuda.synchronize(device)
