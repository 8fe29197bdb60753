"""How a case is measured: synchronized wall-clock per step, peak device memory, peak host RSS, versions,
and on request one step under ``torch.profiler``.

Every case, raw loop or Lightning, uses these same functions, so that their numbers are comparable.
"""

from __future__ import annotations

import platform
import resource
import statistics
import time
from contextlib import contextmanager, nullcontext
from contextvars import ContextVar
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Callable, Iterator, Optional

import torch


@dataclass(frozen=True)
class ProfileRequest:
    """Profile step ``step`` (0-based, counting every step the clock times, warm-up included) with
    ``torch.profiler`` (``benchmarks/step_profile.py``), writing its Chrome trace to ``trace_path`` if given.

    Raises:
        ValueError: ``step`` is negative.
    """

    step: int
    trace_path: Optional[Path] = None

    def __post_init__(self) -> None:
        if not isinstance(self.step, int) or self.step < 0:
            raise ValueError(f"profile step {self.step!r}: give a step index, 0 or more.")


_PROFILE: ContextVar[Optional[ProfileRequest]] = ContextVar("benchmark_profile", default=None)


@contextmanager
def profiling(request: Optional[ProfileRequest]) -> Iterator[None]:
    """Every :class:`StepClock` made inside profiles ``request``'s step (None: none). The one switch the case
    runner sets, whichever loop (raw or Lightning) builds the clock deep inside."""
    token = _PROFILE.set(request)
    try:
        yield
    finally:
        _PROFILE.reset(token)


class StepClock:
    """Wall-clock time of each step, with the device synchronized at both ends so queued kernels count, and
    the step's loss (read after the clock stopped, so its copy to the host is not timed).

    The first ``start`` also resets the device's peak-memory counters: every case's peak then covers its
    training steps (warm-up included) and not its set-up, e.g. DeepSpeed holding the whole model on the GPU
    for a moment before partitioning it, which a user avoids with ``zero.Init``.

    With a :class:`ProfileRequest` (given, or set by :func:`profiling` around the clock's making) the step of
    that index runs under ``torch.profiler``, started after the opening sync and stopped after the closing
    one; its summary is ``profile``. Its time is still in ``times`` (under the profiler's overhead):
    :func:`summarize` leaves it out of the median when told its index.

    :meth:`mark` (a Lightning case marks the end of forward and of backward) records, per step, how long the
    host took to reach the mark and how long the device took to finish the work queued before it, both from
    the opening sync (``phases``). Where the device's time is about the host's, the device waited for the host
    to queue its work; where it is longer, the host ran ahead (no profiler overhead: one event per mark).
    """

    def __init__(self, device: torch.device, request: Optional[ProfileRequest] = None) -> None:
        self.device = device
        self.times: list[float] = []
        self.losses: list[float] = []
        self.planning: list[bool] = []  # per step, where the loop knows: a step the strategy's planner measured
        self.request = request if request is not None else _PROFILE.get()
        self.profile: Optional[dict] = None
        self.profiled_at: Optional[int] = None  # the index of the step that ran under the profiler
        self._profiler = None
        self._t0 = 0.0
        self._start_event = None
        self._marks: list[tuple[str, float, object]] = []
        #: per step, ``{mark: (host_ms, device_ms or None)}`` from the step's opening sync
        self.phases: list[dict[str, tuple[float, Optional[float]]]] = []
        #: per step on CUDA, what the caching allocator did (:data:`ALLOCATOR_COUNTS`; a step that asks the driver
        #: for memory, ``cudaMalloc``, or gives it back, ``cudaFree``, which waits for the device, stalls the host)
        #: and the bytes it holds after the step (``reserved_bytes``: what the step needs of a GPU, cache included)
        self.allocator: list[dict[str, int]] = []
        self._counts: dict[str, int] = {}

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def start(self) -> None:
        self._sync()
        if not self.times and self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        self._counts = allocator_counts(self.device)
        if self.request is not None and len(self.times) == self.request.step:
            from benchmarks.step_profile import StepProfiler

            self._profiler = StepProfiler(self.device, self.request.trace_path)
            self._profiler.start()
            self.profiled_at = len(self.times)
        self._marks = []
        self._t0 = time.perf_counter()
        if self.device.type == "cuda":
            self._start_event = torch.cuda.Event(enable_timing=True)
            self._start_event.record()

    def mark(self, name: str) -> None:
        """The host has queued the step's work up to ``name`` (e.g. ``"forward"``)."""
        event = None
        if self.device.type == "cuda":
            event = torch.cuda.Event(enable_timing=True)
            event.record()
        self._marks.append((name, time.perf_counter() - self._t0, event))

    def stop(self, loss: Optional[torch.Tensor] = None) -> None:
        with self._profiler.closing_sync() if self._profiler is not None else nullcontext():
            self._sync()
        self.times.append(time.perf_counter() - self._t0)
        self.phases.append({name: (host * 1e3, None if event is None else self._start_event.elapsed_time(event))
                            for name, host, event in self._marks})
        if self._counts:
            now = allocator_counts(self.device)
            self.allocator.append({**{k: now[k] - self._counts[k] for k in now},
                                   "reserved_bytes": torch.cuda.memory_reserved(self.device)})
        if self._profiler is not None:
            self.profile, self._profiler = self._profiler.stop(), None
        if loss is not None:
            self.losses.append(float(loss))


#: the caching allocator's counters a step's row reports (``torch.cuda.memory_stats``)
ALLOCATOR_COUNTS = ("num_device_alloc", "num_device_free", "num_alloc_retries", "num_sync_all_streams")


def allocator_counts(device: torch.device) -> dict[str, int]:
    """The caching allocator's :data:`ALLOCATOR_COUNTS` so far on ``device`` (empty off CUDA)."""
    if device.type != "cuda" or not torch.cuda.is_initialized():
        return {}
    stats = torch.cuda.memory_stats(device)
    return {k: int(stats.get(k, 0)) for k in ALLOCATOR_COUNTS}


def allocator_summary(per_step: list[dict[str, int]], warmup: int, profiled: Optional[int] = None) -> dict:
    """Over the timed steps (:func:`timed_steps`): each of :data:`ALLOCATOR_COUNTS` summed, and the bytes the
    allocator held after the last one (``reserved_bytes``)."""
    timed = timed_steps(per_step, warmup, profiled)
    if not timed:
        return {}
    return {**{k: sum(s[k] for s in timed) for k in ALLOCATOR_COUNTS}, "reserved_bytes": timed[-1]["reserved_bytes"]}


def cap_device_memory(device: torch.device, gib: Optional[float]) -> None:
    """Let this process's caching allocator hold at most ``gib`` GiB of ``device`` (None: no cap), as on a GPU
    that size: past it the allocator frees its cached blocks and retries (``num_alloc_retries``) before it fails.

    Raises:
        ValueError: ``gib`` is not positive or more than the device has.
    """
    if gib is None or device.type != "cuda":
        return
    total = torch.cuda.get_device_properties(device).total_memory
    if not 0 < gib * 2**30 <= total:
        raise ValueError(f"--device-gib {gib:g}: give a size above 0 and at most the device's "
                         f"{total / 2**30:.1f} GiB.")
    torch.cuda.set_per_process_memory_fraction(gib * 2**30 / total, device)


def timed_loop(step: Callable[[], Optional[torch.Tensor]], n: int, device: torch.device) -> StepClock:
    """Run ``step`` ``n`` times; the clock holds the time of each call and the loss each returned."""
    clock = StepClock(device)
    for _ in range(n):
        clock.start()
        clock.stop(step())
    return clock


def settled_warmup(planning: list[bool], warmup: int) -> int:
    """Steps to leave out of the median: ``warmup``, or more where the strategy's planner measured steps later
    (``planning``, one flag per step): those run slower than the plan they choose (``VDNNStrategy.planning``)."""
    last = max((i for i, p in enumerate(planning) if p), default=-1)
    return max(warmup, last + 1)


def timed_steps(per_step: list, warmup: int, profiled: Optional[int] = None) -> list:
    """The timed steps' entries of ``per_step``: those after ``warmup``, the profiled step (index ``profiled``)
    left out, as it counts neither as warm-up nor as timed."""
    return [x for i, x in enumerate(per_step) if i != profiled][warmup:]


def summarize(times: list[float], warmup: int, items_per_step: int, flops_per_step: float,
              profiled: Optional[int] = None) -> dict:
    """Median over the steps after warm-up, and the throughput and model TFLOP/s it implies. The step of
    index ``profiled`` (``step_profile.profiled_step``) ran under the profiler: it counts neither as warm-up nor
    as timed."""
    timed = timed_steps(times, warmup, profiled)
    if not timed:
        raise RuntimeError(f"no timed steps: {len(times)} steps ran, {warmup} of them warm-up.")
    step_s = statistics.median(timed)
    return {
        "step_s": step_s,
        "step_s_all": times,
        "items_per_s": items_per_step / step_s,
        "tflops": flops_per_step / step_s / 1e12,
    }


def phase_medians(phases: list[dict], warmup: int, profiled: Optional[int] = None) -> dict:
    """Per mark, the medians over the timed steps (:func:`timed_steps`) of the host's and the
    device's milliseconds from the step's start to the mark (``StepClock.phases``); empty without marks."""
    timed = timed_steps(phases, warmup, profiled)
    out = {}
    for name in dict.fromkeys(k for p in timed for k in p):
        host = [p[name][0] for p in timed if name in p]
        device = [p[name][1] for p in timed if name in p and p[name][1] is not None]
        out[name] = {"host_ms": statistics.median(host), "device_ms": statistics.median(device) if device else None}
    return out


def memory_stats(device: torch.device) -> dict:
    """Peak device memory of this process (None off CUDA) and its peak host RSS."""
    row = {"peak_alloc_bytes": None, "peak_reserved_bytes": None,
           "host_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
    if device.type == "cuda" and torch.cuda.is_initialized():
        row["peak_alloc_bytes"] = torch.cuda.max_memory_allocated(device)
        row["peak_reserved_bytes"] = torch.cuda.max_memory_reserved(device)
    return row


def _version(dist: str) -> Optional[str]:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def environment(device: torch.device) -> dict:
    """The machine and versions a row was measured on (read without importing DeepSpeed or Lightning)."""
    env = {"torch": torch.__version__, "lightning": _version("lightning"), "deepspeed": _version("deepspeed"),
           "python": platform.python_version(), "device_name": platform.processor() or "cpu",
           "device_total_bytes": None, "cpu_threads": torch.get_num_threads()}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(device_name=props.name, device_total_bytes=props.total_memory, cuda=torch.version.cuda)
    else:
        import psutil

        env["device_total_bytes"] = psutil.virtual_memory().total
    return env
