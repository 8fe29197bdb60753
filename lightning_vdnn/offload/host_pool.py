"""Host memory for offloaded tensors: a reusable pool of (pinned) byte buffers, and the copy engine.

Pinning memory is slow (it maps pages and talks to the driver) and fragments the host, so buffers are kept
and reused across steps instead of allocated per tensor. Sizes are rounded to four classes per power of two
(at most 25% slack), so the same network asks for the same classes every step and the steady state
allocates nothing.

Why not torch's caching host allocator (``torch.empty(..., pin_memory=True)``), which also keeps pinned blocks
for reuse: ``benchmarks/pinned_pool.py`` replays a step's saved activations through both. On an H200 they copy
equally fast (``gpt_1b``: 505 against 501 ms a step; VGG-16 at batch 256: 647 against 649 ms), but torch rounds
every block up to a power of two, so for sizes that are not powers of two it holds more (VGG-16: 21.8 GiB against
the pool's 19.0 GiB; ``gpt_1b``'s sizes are powers of two and both hold 12.8 GiB). The pool stays for that
(``benchmarks/README.md``).
"""

from __future__ import annotations

import threading
import warnings
from collections import defaultdict
from typing import Optional

import torch

from lightning_vdnn.units import host_clock

_MIN_CLASS = 4096


def size_class(nbytes: int) -> int:
    """Round ``nbytes`` up to one of four classes per power of two (at least 4 KiB)."""
    if nbytes <= _MIN_CLASS:
        return _MIN_CLASS
    step = 1 << max(nbytes.bit_length() - 3, 0)
    return (nbytes + step - 1) // step * step


def concrete_device(device: "torch.device | str") -> torch.device:
    """``device`` with its index: ``cuda`` is the current CUDA device. Tensors name their device with an index
    (``cuda:0``), and the hooks compare a saved tensor's device with the one they copy from."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


def wait_for(event) -> None:
    """``event.synchronize()``, where the work is not done already. A worker thread's wait: ``synchronize`` gives up
    the GIL, and the worker then waits to win it back from the thread driving the GPU (up to
    ``sys.getswitchinterval()`` while that thread runs Python); ``query`` keeps it."""
    if not event.query():
        event.synchronize()


class HostEvent:
    """Stand-in for ``torch.cuda.Event`` when the device is the host: work is already done when recorded."""

    def __init__(self) -> None:
        self.time = host_clock()

    def record(self, stream: object = None) -> None:
        self.time = host_clock()

    def query(self) -> bool:
        return True

    def synchronize(self) -> None:
        pass

    def elapsed_time(self, end: "HostEvent") -> float:
        return (end.time - self.time) * 1e3


class CopyEngine:
    """Side streams and events for device<->host copies; on a CPU device, the same calls run inline.

    One stream per direction, so offload of layer i and prefetch of layer j use both PCIe directions at once.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.is_cuda = device.type == "cuda"
        self.d2h = torch.cuda.Stream(device) if self.is_cuda else None
        self.h2d = torch.cuda.Stream(device) if self.is_cuda else None

    def event(self, host_waits: bool = False):
        """A timing event; ``host_waits``: one a host thread will ``synchronize()`` on, made to sleep there
        (``cudaEventBlockingSync``) instead of spinning, which with one CUDA context CUDA does by default: a spinning
        thread takes a core from the host update's threads, and an OpenMP region ends with its slowest thread."""
        if not self.is_cuda:
            return HostEvent()
        return torch.cuda.Event(enable_timing=True, blocking=host_waits)

    def record(self, stream=None, host_waits: bool = False):
        """An event marking everything queued so far on ``stream`` (default: the current stream); ``host_waits``:
        see :meth:`event`."""
        evt = self.event(host_waits)
        if self.is_cuda:
            evt.record(stream if stream is not None else torch.cuda.current_stream(self.device))
        return evt

    def current_stream(self):
        return torch.cuda.current_stream(self.device) if self.is_cuda else None

    def stream(self, stream):
        return torch.cuda.stream(stream) if self.is_cuda else _nullcontext()


class _nullcontext:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


class HostBufferPool:
    """Byte buffers in host memory, handed out by size class and returned for reuse.

    A returned buffer carries the event of the last copy that reads it; the next writer waits for that event on
    its own stream, so a buffer is never overwritten while a prefetch still reads it.
    """

    def __init__(self, pin_memory: bool = True) -> None:
        self.pin_memory = pin_memory and torch.cuda.is_available()
        self._free: dict[int, list[tuple[torch.Tensor, object]]] = defaultdict(list)
        self._lock = threading.RLock()
        self.reserved_bytes = 0
        self.in_use_bytes = 0
        self.peak_in_use_bytes = 0
        self.allocations = 0
        self._warned = False

    def acquire(self, nbytes: int) -> tuple[torch.Tensor, Optional[object]]:
        """A uint8 host buffer of at least ``nbytes`` and the event to wait for before writing it (or None)."""
        cls = size_class(nbytes)
        with self._lock:
            free = self._free.get(cls)
            if free:
                buf, evt = free.pop()
            else:
                buf, evt = self._allocate(cls), None
            self.in_use_bytes += cls
            self.peak_in_use_bytes = max(self.peak_in_use_bytes, self.in_use_bytes)
        return buf, evt

    def would_allocate(self, nbytes: int) -> bool:
        """Whether :meth:`acquire` of ``nbytes`` would have to allocate (and, pinned, block the host)."""
        with self._lock:
            return not self._free.get(size_class(nbytes))

    def release(self, buf: torch.Tensor, last_reader: Optional[object] = None) -> None:
        with self._lock:
            self._free[buf.numel()].append((buf, last_reader))
            self.in_use_bytes -= buf.numel()

    def clear(self) -> None:
        """Give every idle buffer back to the OS (used at teardown)."""
        with self._lock:
            for bufs in self._free.values():
                for buf, evt in bufs:
                    if evt is not None:
                        evt.synchronize()
                    self.reserved_bytes -= buf.numel()
            self._free.clear()

    def _allocate(self, nbytes: int) -> torch.Tensor:
        self.allocations += 1
        self.reserved_bytes += nbytes
        if self.pin_memory:
            try:
                return torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
            except RuntimeError as err:  # out of pinnable memory: keep training, slower
                self.pin_memory = False
                if not self._warned:
                    self._warned = True
                    warnings.warn(
                        f"lightning_vdnn: pinning {nbytes / 2**20:.0f} MiB of host memory failed ({err}); "
                        "falling back to pageable memory, so copies are slower and synchronous. Free host memory "
                        "or raise the locked-memory limit (ulimit -l) to get pinned buffers back.",
                        stacklevel=3,
                    )
        return torch.empty(nbytes, dtype=torch.uint8)


def copy_to_host(engine: CopyEngine, pool: HostBufferPool, storage: torch.UntypedStorage, lo: int, nbytes: int,
                 timeline: Optional[object] = None) -> tuple[torch.Tensor, torch.Tensor, object, object]:
    """Queue the copy of ``nbytes`` of ``storage`` from byte ``lo`` into a buffer of ``pool``, on the device->host
    stream after the work queued so far and after the buffer's last reader: (the host buffer, the device bytes it
    copies, the copy's start and done events). ``timeline``: a watched pass's on a GPU, told when pinning new host
    memory blocked the CPU (not the layer's time)."""
    before = engine.record() if timeline is not None and pool.would_allocate(nbytes) else None
    host, last_reader = pool.acquire(nbytes)
    if before is not None:
        timeline.stalled(before, engine.record())
    src = torch.empty(0, dtype=torch.uint8, device=engine.device).set_(storage, lo, (nbytes,), (1,))
    produced = engine.record()
    with engine.stream(engine.d2h):
        if engine.is_cuda:
            engine.d2h.wait_event(produced)
            if last_reader is not None:
                engine.d2h.wait_event(last_reader)
        start = engine.record(engine.d2h)
        host[:nbytes].copy_(src, non_blocking=True)
        done = engine.record(engine.d2h)
    return host, src, start, done


def completed(pairs: list[tuple[object, object]]) -> list[tuple[object, object]]:
    """``pairs`` of events once both events of each have completed (``elapsed_time`` needs that)."""
    for start, end in pairs:
        start.synchronize()
        end.synchronize()
    return pairs


def elapsed_ms(pairs: list[tuple[object, object]]) -> float:
    """Total milliseconds between the events of each pair."""
    return sum(start.elapsed_time(end) for start, end in completed(pairs))
