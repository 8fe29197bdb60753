"""Page-locked host chunks that layer streaming carves its per-block buffers from, and gives back one at a time.

A chunk is ordinary host memory (torch's CPU allocator, which maps allocations this large straight from the
OS) page-locked with ``cudaHostRegister`` (``torch.cuda.cudart()``, public torch). Like
``torch.empty(pin_memory=True)`` it is page-locked memory the copy engines read directly
(``tests/test_gpu_host_release.py`` compares their copy speeds). The difference is the way back: torch's caching host allocator keeps a freed pinned block for reuse (only
``torch.accelerator.empty_host_cache``, absent before torch 2.12, returns it), so memory pinned that way
stays taken until the process ends. A registered chunk is unregistered and dropped by :meth:`PinnedArena.free`,
and goes back to the OS as soon as the last view of it is gone: the end of streaming replaces the views of
one chunk with ordinary tensors, frees it, and moves to the next (``streaming/host_release.py``), so it never
holds more than about one chunk twice.
"""

from __future__ import annotations

import warnings
import weakref
from typing import Iterable, Optional

import torch
from torch import Tensor


def lock(chunk: Tensor) -> None:
    """Page-lock ``chunk``'s memory for the current CUDA context (and, with unified addressing, every device)."""
    err = int(torch.cuda.cudart().cudaHostRegister(chunk.data_ptr(), chunk.nbytes, 0))  # 0: cudaHostRegisterDefault
    if err:
        raise RuntimeError(f"cudaHostRegister of {chunk.nbytes} bytes failed with cudaError {err}")


def unlock(chunk: Tensor) -> None:
    """Undo :func:`lock` (the memory stays valid, pageable, until its last view is gone)."""
    err = int(torch.cuda.cudart().cudaHostUnregister(chunk.data_ptr()))
    if err:
        warnings.warn(f"lightning_vdnn: cudaHostUnregister failed with cudaError {err}; that chunk's "
                      f"{chunk.nbytes} bytes stay page-locked until the process ends.", stacklevel=2)


def _unlock_all(chunks: list[Optional[Tensor]]) -> None:
    """An arena dropped without :meth:`PinnedArena.free`: unlock what it still holds (else the pages stay
    locked by the driver after torch frees them)."""
    for chunk in chunks:
        if chunk is not None:
            try:
                unlock(chunk)
            except Exception:  # interpreter exit: CUDA may be gone already, and the OS takes the memory back
                pass
    chunks.clear()


class PinnedArena:
    """Page-locked host buffers carved out of chunks whose sizes are powers of two.

    torch's pinned allocator rounds every request up to a power of two: a gpt_1b block's 201 MB of weights would
    take 256 MB, and so would its gradients, a quarter more host memory than streaming needs (at 96 blocks, what a
    128 GiB host lacks). Chunks of at least :attr:`CHUNK` bytes lose only their tails, and a buffer goes into the
    first chunk with room for it. Given the ``total`` bytes that will be asked for, a new chunk is the largest
    power of two the requests still to come fill (the rest in ever smaller ones): a 4096-wide block's 805 MB of
    weights would otherwise leave a fifth of each 1 GiB chunk empty; no chunk is larger than :attr:`MAX_CHUNK`,
    the most the end of streaming holds twice. Without ``pin`` (a CPU device, ``pin_memory=False``) each buffer
    is its own pageable tensor and there are no chunks. If page-locking fails, the arena warns once and goes on
    pageable.
    """

    CHUNK = 2**30
    #: chunks no larger: the end of streaming copies one chunk's tensors out before it frees that chunk
    MAX_CHUNK = 2**33
    ALIGN = 4096  # every buffer starts on a page: any dtype's view is aligned, and copies run at full speed

    def __init__(self, pin: bool, total: Optional[int] = None) -> None:
        self.pin = pin
        self._plan = _Chunks(self.CHUNK, self.ALIGN, total, self.MAX_CHUNK)
        self._chunks: list[Optional[Tensor]] = []  # None once freed
        self._finalizer = weakref.finalize(self, _unlock_all, self._chunks)

    def empty(self, numel: int, dtype: torch.dtype) -> Tensor:
        """An uninitialised 1-D host buffer of ``numel`` elements, page-locked when the arena pins."""
        nbytes = numel * dtype.itemsize
        if not self.pin:
            return torch.empty(numel, dtype=dtype)
        k, start = self._plan.place(nbytes)
        if k == len(self._chunks):
            chunk = self._new_chunk(self._plan.sizes[k])
            if chunk is None:  # page-locking failed (warned): pageable from here on
                self.pin = False
                return torch.empty(numel, dtype=dtype)
            self._chunks.append(chunk)
        return self._chunks[k][start:start + nbytes].view(dtype)

    def _new_chunk(self, nbytes: int) -> Optional[Tensor]:
        """``nbytes`` of page-aligned host memory, page-locked; None (with a warning) if locking fails."""
        raw = torch.empty(nbytes + self.ALIGN, dtype=torch.uint8)
        chunk = raw[(-raw.data_ptr()) % self.ALIGN:][:nbytes]
        chunk.zero_()  # faults the pages in on all cores (registering alone would fault them in on one)
        try:
            lock(chunk)
        except RuntimeError as err:
            warnings.warn(f"lightning_vdnn: page-locking host memory for layer streaming failed ({err}); using "
                          "pageable memory, so weight copies are slower and synchronous.", stacklevel=3)
            return None
        return chunk

    # -- the way back: one chunk at a time (``streaming/host_release.py``) ----------------------------------------
    def chunk_of(self, t: Optional[Tensor]) -> Optional[int]:
        """The index of the live chunk ``t``'s memory lies in, or None (pageable, freed, or not this arena's)."""
        if t is None:
            return None
        ptr = t.data_ptr()
        return next((k for k, c in enumerate(self._chunks)
                     if c is not None and c.data_ptr() <= ptr < c.data_ptr() + c.nbytes), None)

    def live(self) -> list[int]:
        """Indices of the chunks not freed yet."""
        return [k for k, c in enumerate(self._chunks) if c is not None]

    def free(self, k: int) -> None:
        """Unlock chunk ``k`` and let go of it: its memory returns to the OS once no view of it is left. Nothing
        may still be copying from or to it (the caller synchronized)."""
        chunk, self._chunks[k] = self._chunks[k], None
        if chunk is not None:
            unlock(chunk)

    def close(self) -> None:
        """:meth:`free` every chunk."""
        for k in self.live():
            self.free(k)

    @classmethod
    def footprint(cls, requests: Iterable[int], total: Optional[int] = None) -> int:
        """Bytes the chunks for ``requests`` (byte counts, in order) pin: what :meth:`empty` would take."""
        plan = _Chunks(cls.CHUNK, cls.ALIGN, total, cls.MAX_CHUNK)
        for nbytes in requests:
            plan.place(nbytes)
        return sum(plan.sizes)


class _Chunks:
    """Where :class:`PinnedArena`'s buffers go: chunk sizes and fill levels, no memory."""

    def __init__(self, chunk: int, align: int, total: Optional[int], largest: Optional[int] = None) -> None:
        self.chunk, self.align, self.left, self.largest = chunk, align, total, largest
        self.sizes: list[int] = []
        self.used: list[int] = []

    def place(self, nbytes: int) -> tuple[int, int]:
        """(chunk index, byte offset) of the next buffer of ``nbytes``; index ``len(sizes) - 1`` is new if it was
        just added."""
        k = next((i for i, (size, used) in enumerate(zip(self.sizes, self.used)) if used + nbytes <= size), None)
        if k is None:
            fits = 1 << max(nbytes - 1, 0).bit_length()  # the smallest power of two this buffer fits
            size = max(self.chunk, fits)
            if self.left is not None and self.left > size:
                size = 1 << (self.left.bit_length() - 1)  # the largest power of two the requests to come fill
                if self.largest is not None:
                    size = max(min(size, self.largest), fits)
            k = len(self.sizes)
            self.sizes.append(size)
            self.used.append(0)
        start = self.used[k]
        self.used[k] = -(-(start + nbytes) // self.align) * self.align
        if self.left is not None:
            self.left -= nbytes
        return k, start
