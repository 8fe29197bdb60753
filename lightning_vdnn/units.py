"""Byte units and their display, defined once for every module."""

from __future__ import annotations

KiB, MiB, GiB = 2**10, 2**20, 2**30
#: The budget of a CPU run without one: the host is the device, nothing needs to fit.
UNBOUNDED = 2**62


def format_bytes(n: int) -> str:
    """``1.50 GiB``, ``12.0 MiB``, ``512.0 KiB``, ``100 B``."""
    for unit, size in (("GiB", GiB), ("MiB", MiB), ("KiB", KiB)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}" if unit == "GiB" else f"{n / size:.1f} {unit}"
    return f"{n} B"
