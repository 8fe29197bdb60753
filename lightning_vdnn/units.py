"""Byte units, defined once for every module: their display, and the memory sizes and budgets a user writes; and
the host clock our own timings read."""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from typing import Optional, Union

KiB, MiB, GiB = 2**10, 2**20, 2**30
#: The host's clock for our own timings, bound at import: code that patches ``time.perf_counter`` to time itself
#: (Lightning's ``ThroughputMonitor`` tests feed it a fixed list of times) sees its own calls only, not ours.
host_clock = time.perf_counter
#: The budget of a CPU run without one: the host is the device, nothing needs to fit.
UNBOUNDED = 2**62


def format_bytes(n: int) -> str:
    """``1.50 GiB``, ``12.0 MiB``, ``512.0 KiB``, ``100 B``."""
    for unit, size in (("GiB", GiB), ("MiB", MiB), ("KiB", KiB)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}" if unit == "GiB" else f"{n / size:.1f} {unit}"
    return f"{n} B"


_UNITS = {
    "b": 1,
    "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
}
_SIZE_RE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*$")
_PERCENT_RE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*%\s*$")

MemorySpec = Union[int, str, None]


@dataclass(frozen=True)
class MemoryBudget:
    """A device-memory budget: an absolute byte count or a fraction of the device's capacity."""

    nbytes: Optional[int] = None
    fraction: Optional[float] = None

    def resolve(self, capacity: int) -> int:
        """Bytes this budget allows on a device of ``capacity`` bytes."""
        return self.nbytes if self.nbytes is not None else int(capacity * (self.fraction or 0.0))


def parse_memory_budget(value: MemorySpec) -> Optional[MemoryBudget]:
    """Parse ``8GiB``, ``"512 MB"``, ``"60%"``, a positive int of bytes, or ``None`` (device capacity).

    Raises:
        ValueError: for anything else, naming the value and the accepted forms.
    """
    if value is None:
        return None
    accepted = "a positive number of bytes, a size like '8GiB' or '512MB', a percentage like '60%', or None"
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ValueError(f"memory_budget={value!r} is not understood; use {accepted}.")
    if isinstance(value, (int, float)):
        if value <= 0:
            raise ValueError(f"memory_budget={value!r} must be positive; use {accepted}.")
        return MemoryBudget(nbytes=int(value))
    if m := _PERCENT_RE.match(value):
        pct = float(m.group(1))
        if not 0 < pct <= 100:
            raise ValueError(f"memory_budget={value!r} must be a percentage in (0%, 100%] of device memory.")
        return MemoryBudget(fraction=pct / 100)
    m = _SIZE_RE.match(value)
    if m and m.group(2).lower() in _UNITS | {"": 1}:
        nbytes = int(float(m.group(1)) * _UNITS.get(m.group(2).lower(), 1))
        if nbytes > 0:
            return MemoryBudget(nbytes=nbytes)
    raise ValueError(f"memory_budget={value!r} is not understood; use {accepted}.")
