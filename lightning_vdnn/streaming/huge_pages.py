"""Host buffers on 2 MiB pages, where Linux offers transparent huge pages (``VDNNConfig.host_huge_pages``).

Layer streaming's host update reads and writes every byte of the blocks' host state once a step, and the copy
engines read and write the blocks' weights and gradients. On 4 KiB pages that is one TLB entry per 4 KiB of a
state many GiB large; in a virtual machine, as the lent GPU boxes are, each miss walks two levels of page tables.
A range advised ``MADV_HUGEPAGE`` before its first touch is faulted in 2 MiB pages, the only way to get them in
THP's ``madvise`` mode (the usual default, and the lent box's). torch's CPU allocator does the same for every
allocation of the process when ``THP_MEM_ALLOC_ENABLE`` is set; this does it for layer streaming's buffers only.
Where the kernel has no THP, or the advice fails, the buffer is an ordinary one: nothing else changes.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import sys
from pathlib import Path
from typing import Optional

import torch
from torch import Tensor

HUGE_PAGE = 2**21
_MADV_HUGEPAGE = 14  # <sys/mman.h>, Linux
_THP = Path("/sys/kernel/mm/transparent_hugepage/enabled")


@functools.cache
def thp_mode() -> str:
    """The kernel's THP mode, ``"always"``, ``"madvise"`` or ``"never"`` (also where it has none)."""
    try:
        text = _THP.read_text()
    except OSError:
        return "never"
    return next((w[1:-1] for w in text.split() if w.startswith("[")), "never")


@functools.cache
def _madvise() -> Optional[ctypes._CFuncPtr]:
    if not sys.platform.startswith("linux") or thp_mode() == "never":
        return None
    fn = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True).madvise
    fn.argtypes, fn.restype = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int), ctypes.c_int
    return fn


def empty(numel: int, dtype: torch.dtype, huge: bool = True) -> Tensor:
    """An uninitialised 1-D host tensor; with ``huge``, if it is at least one huge page long and THP is on, it
    starts on a 2 MiB boundary and its range is advised ``MADV_HUGEPAGE`` before any of it is touched (so the first
    writes fault it in as huge pages). It costs one huge page of address space more, never touched."""
    nbytes = numel * dtype.itemsize
    advise = _madvise() if huge and nbytes >= HUGE_PAGE else None
    if advise is None:
        return torch.empty(numel, dtype=dtype)
    raw = torch.empty(nbytes + HUGE_PAGE, dtype=torch.uint8)
    start = (-raw.data_ptr()) % HUGE_PAGE
    region = raw[start:start + nbytes]
    advise(region.data_ptr(), nbytes, _MADV_HUGEPAGE)  # a refusal (EINVAL, ENOMEM) leaves ordinary pages
    return region.view(dtype)


def zeros(numel: int, dtype: torch.dtype, huge: bool = True) -> Tensor:
    """:func:`empty`, zeroed (torch's threads fault the pages in)."""
    return empty(numel, dtype, huge).zero_()


def mapping(t: Tensor) -> tuple[bool, int]:
    """What the kernel says of ``t``'s address range (``/proc/self/smaps``, Linux): whether all of it is advised
    ``MADV_HUGEPAGE`` (the ``hg`` flag), and how many of its mappings' bytes sit in huge pages now. ``(False, 0)``
    where it cannot tell. For tests and diagnostics: it reads the whole map."""
    try:
        text = Path("/proc/self/smaps").read_text()
    except OSError:
        return False, 0
    lo, hi = t.data_ptr(), t.data_ptr() + t.nbytes
    advised, huge, inside = None, 0, False
    for line in text.splitlines():
        head = line.split()
        if head and head[0].count("-") == 1 and all(c in "0123456789abcdef-" for c in head[0]):
            a, b = (int(x, 16) for x in head[0].split("-"))
            inside = a < hi and b > lo
        elif inside and head[:1] == ["AnonHugePages:"]:
            huge += int(head[1]) * 1024
        elif inside and head[:1] == ["VmFlags:"]:
            advised = (advised is not False) and "hg" in head[1:]
    return bool(advised), huge
