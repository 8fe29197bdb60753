"""One training step under ``torch.profiler``, reduced to what is still exposed in it: PCIe copies not hidden
under kernels, the GPU idle, the host's synchronisations and its busiest ops (a host optimizer on a worker
thread among them). The Chrome trace, when asked for, holds the rest.

The summary (times in ms, volumes in GB; the GPU keys None off CUDA):

- ``wall_ms``: the step as the profiler saw it (the clock's range around it, under the profiler's overhead);
- ``kernel_ms``: the union of the device's kernels (memsets and device-to-device copies count as kernels),
  so that streams running at once count once; ``h2d_ms``/``d2h_ms``: the union of host->device and
  device->host copies, ``h2d_gb``/``d2h_gb`` their bytes (None where the profiler gives none);
  ``copy_hidden_ms``: copy time under a kernel; ``copy_exposed_ms``: copy time under none;
  ``gpu_idle_ms``: wall minus the union of kernels and copies; ``pageable_copies``: copies from or to
  pageable memory (synchronous: they cannot overlap);
- ``sync_ms``: host time in ``cuda{Device,Stream,Event}Synchronize``, the clock's closing sync left out;
- ``host_outside_ops_ms``: the time the step's own chain (the stepping thread, and on CUDA its backward on
  the autograd engine's thread) ran no op: Python, the framework's loop, waits on other threads;
- ``threads_ms``: each thread's self time in ops; ``top_ops``: the busiest ops by self time, per thread.

Not ``profile.py``: that name is the standard library's, and ``python benchmarks/soak.py`` (whose folder is
then first on ``sys.path``) imports it through ``torch._dynamo`` -> ``cProfile``.

Threads: ``torch.profiler`` records only the thread that started it (and the autograd engine's, which
inherit its state) unless ``_ExperimentalConfig(profile_all_threads=True)``; with it (torch 2.11 and 2.13
have it) the ops of threads started before or during the profiled step are recorded too, e.g.
``aten::_fused_adamw_`` under ``Optimizer.step#AdamW.step`` on a host-optimizer thread. Where it is missing
the summary says ``all_threads: False`` and holds the stepping thread's ops only. The profiler numbers threads
itself (1, 2, ...: not OS ids; Python's thread names are not known to it): ``main`` is the thread that ran
the step, ``autograd`` the engine's device thread, ``thread N`` any other.

Device events come from the profiler's public event list (``prof.events()``: ``FunctionEvent.time_range``,
``device_type``, ``name``, ``metadata_json``), told apart by name, since torch 2.11's events carry no
activity type: ``Memcpy HtoD (Pinned -> Device)``, ``Memcpy DtoH (Device -> Pageable)``, ... A copy's bytes
are in its ``metadata_json`` with ``_ExperimentalConfig(expose_kineto_event_metadata=True)``. A device event
that is a user annotation (a ``record_function`` range mirrored onto the GPU, spanning idle gaps) is not
work and is left out.
"""

from __future__ import annotations

import gzip
import json
import os
from collections import defaultdict
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Optional, Sequence

if TYPE_CHECKING:  # torch is imported where it is used: the runner validates --profile-step without it
    import torch

Interval = tuple[float, float]

#: The ``record_function`` ranges the clock opens: the whole profiled step, and its own closing device sync.
STEP_RANGE, CLOCK_SYNC_RANGE = "StepClock.profiled_step", "StepClock.sync"
TOP_OPS = 8
#: A Chrome trace larger than this is written gzipped (Perfetto and chrome://tracing read ``.json.gz``).
GZIP_ABOVE_BYTES = 16 * 2**20
#: Host calls that wait for the device (the clock's own closing sync is not counted).
SYNC_CALLS = frozenset({"cudaDeviceSynchronize", "cudaStreamSynchronize", "cudaEventSynchronize"})
#: The autograd engine's range around each backward node it runs: marks the thread running a backward.
AUTOGRAD_NODE = "autograd::engine::evaluate_function"
#: The profiler's own work, recorded as host events: not the step's.
PROFILER_OVERHEAD = frozenset({"Activity Buffer Request", "Buffer Flush", "Runtime Triggered Module Loading",
                               "Lazy Function Loading"})


def profiled_step(warmup: int, steps: int, step: Optional[int] = None) -> int:
    """The index of the profiled step among ``warmup + steps + 1``: the profiled step is one extra step, left
    out of the timed median. By default the last, after warm-up.

    Raises:
        ValueError: ``step`` is outside ``0 .. warmup + steps``.
    """
    last = warmup + steps
    if step is None:
        return last
    if not 0 <= step <= last:
        raise ValueError(f"profile step {step} is out of range: {warmup} warm-up + {steps} timed + 1 profiled "
                         f"steps run, so give 0 .. {last} (default {last}, the last).")
    return step


# ---- interval arithmetic (microseconds in, microseconds out) ----

def union(intervals: Iterable[Interval]) -> list[Interval]:
    """The intervals merged into disjoint ones, sorted: what overlapping streams cover once."""
    merged: list[list[float]] = []
    for start, end in sorted(intervals):
        if end < start:
            raise ValueError(f"interval ({start}, {end}) ends before it starts")
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    return [(s, e) for s, e in merged]


def covered(intervals: Iterable[Interval]) -> float:
    """Length of time that at least one of the intervals covers."""
    return sum(e - s for s, e in union(intervals))


def overlap(a: Iterable[Interval], b: Iterable[Interval]) -> float:
    """Length of time covered by both sets at once (each set's own overlaps counted once)."""
    ua, ub, i, j, both = union(a), union(b), 0, 0, 0.0
    while i < len(ua) and j < len(ub):
        both += max(0.0, min(ua[i][1], ub[j][1]) - max(ua[i][0], ub[j][0]))
        if ua[i][1] < ub[j][1]:
            i += 1
        else:
            j += 1
    return both


def clip(intervals: Iterable[Interval], window: Interval) -> list[Interval]:
    """The parts of the intervals inside ``window``."""
    lo, hi = window
    return [(max(s, lo), min(e, hi)) for s, e in intervals if e > lo and s < hi]


def device_summary(window: Interval, kernels: Sequence[Interval], h2d: Sequence[Interval],
                   d2h: Sequence[Interval]) -> dict:
    """Where the device's time in ``window`` went (ms): kernels (their union; memsets and on-device copies
    count as kernels), host<->device copies by direction, the copy time hidden under kernels and the rest
    exposed, and the time the device did neither."""
    kernels, h2d, d2h = (clip(x, window) for x in (kernels, h2d, d2h))
    copies = [*h2d, *d2h]
    hidden = overlap(copies, kernels)
    return {"kernel_ms": covered(kernels) / 1e3, "h2d_ms": covered(h2d) / 1e3, "d2h_ms": covered(d2h) / 1e3,
            "copy_hidden_ms": hidden / 1e3, "copy_exposed_ms": (covered(copies) - hidden) / 1e3,
            "gpu_idle_ms": (window[1] - window[0] - covered([*kernels, *copies])) / 1e3}


# ---- the profiler's events ----

def _span(event) -> Interval:
    return event.time_range.start, event.time_range.end


def _is_device(event) -> bool:
    from torch.autograd import DeviceType

    return event.device_type != DeviceType.CPU


def copy_direction(name: str) -> Optional[str]:
    """``"h2d"`` / ``"d2h"`` for a host<->device memcpy event's name, else None (kernels, device copies)."""
    if name.startswith("Memcpy HtoD"):
        return "h2d"
    if name.startswith("Memcpy DtoH"):
        return "d2h"
    return None


def _bytes(event) -> Optional[int]:
    """The copy's size where the profiler exposes the event's metadata (``"bytes"``), else None."""
    try:
        return int(json.loads("{" + event.metadata_json + "}")["bytes"])
    except (AttributeError, TypeError, KeyError, ValueError):
        return None


def _gb(events: list) -> Optional[float]:
    sizes = [_bytes(e) for e in events]
    return None if None in sizes else sum(sizes) / 1e9


def gpu_summary(events: Sequence, window: Interval, device_index: int) -> dict:
    """Kernels and copies of one device in ``window``, with the copies' volumes and pageable count."""
    host_names = {e.name for e in events if not _is_device(e)}
    mine = [e for e in events if _is_device(e) and e.device_index == device_index and clip([_span(e)], window)
            and e.name not in host_names and not getattr(e, "is_user_annotation", False)]
    by: dict[Optional[str], list] = defaultdict(list)
    for e in mine:
        by[copy_direction(e.name)].append(e)
    row = device_summary(window, [_span(e) for e in by[None]], [_span(e) for e in by["h2d"]],
                         [_span(e) for e in by["d2h"]])
    row.update(h2d_gb=_gb(by["h2d"]), d2h_gb=_gb(by["d2h"]),
               pageable_copies=sum("Pageable" in e.name for e in by["h2d"] + by["d2h"]))
    return row


def _range(events: Sequence, name: str):
    found = [e for e in events if e.name == name and not _is_device(e)]
    return found[-1] if found else None


def _inside(event, span: Optional[Interval]) -> bool:
    return span is not None and span[0] <= event.time_range.start and event.time_range.end <= span[1]


def _thread_labels(events: Sequence, main: int) -> dict[int, str]:
    """``main`` for the stepping thread, ``autograd`` for the autograd engine's device threads (where CUDA
    runs the backward while the stepping thread waits), ``thread N`` for any other (e.g. a host optimizer)."""
    autograd = {e.thread for e in events if e.thread != main and e.name.startswith(AUTOGRAD_NODE)}
    labels = {e.thread: "autograd" if e.thread in autograd else f"thread {e.thread}" for e in events}
    return {**labels, main: "main"}


def host_summary(events: Sequence, top: int = TOP_OPS) -> dict:
    """The host side of the step: its window; the busiest ops by self time with their thread; each thread's
    time in ops; the time the step's own chain (the stepping thread and its backward on the autograd threads)
    was in no op at all: Python, the framework's loop, waits on other threads; and the time spent in device
    synchronisations. The clock's closing sync counts in none of them."""
    step = _range(events, STEP_RANGE)
    if step is None:
        raise RuntimeError(f"the profile holds no {STEP_RANGE!r} range: was the step profiled by StepClock?")
    clock_sync = _range(events, CLOCK_SYNC_RANGE)
    sync_span = _span(clock_sync) if clock_sync is not None else None
    labels = _thread_labels(events, step.thread)
    ops: dict[tuple[str, str], list[float]] = defaultdict(lambda: [0.0, 0])
    threads: dict[str, float] = defaultdict(float)
    chain: list[Interval] = [sync_span] if sync_span else []
    sync_us = 0.0
    for e in events:
        if _is_device(e) or e.name == STEP_RANGE:
            continue
        thread = labels[e.thread]
        if thread in ("main", "autograd"):
            chain.append(_span(e))
        if e.name in PROFILER_OVERHEAD or e.name == CLOCK_SYNC_RANGE or (thread == "main" and _inside(e, sync_span)):
            continue
        ops[e.name, thread][0] += e.self_cpu_time_total
        ops[e.name, thread][1] += 1
        threads[thread] += e.self_cpu_time_total
        sync_us += (e.time_range.end - e.time_range.start) if e.name in SYNC_CALLS else 0.0
    window = _span(step)
    busiest = sorted(ops.items(), key=lambda kv: -kv[1][0])[:top]
    return {"window": window, "wall_ms": (window[1] - window[0]) / 1e3,
            "host_outside_ops_ms": (window[1] - window[0] - covered(clip(chain, window))) / 1e3,
            "sync_ms": sync_us / 1e3, "threads_ms": {t: us / 1e3 for t, us in sorted(threads.items())},
            "top_ops": [{"name": n, "thread": t, "self_ms": us / 1e3, "calls": c} for (n, t), (us, c) in busiest]}


def summarize(events: Sequence, device: torch.device, all_threads: bool) -> dict:
    """The JSON-able summary of one profiled step (times in ms, volumes in GB; GPU keys None off CUDA)."""
    host = host_summary(events)
    window = host.pop("window")
    gpu = dict.fromkeys(("kernel_ms", "h2d_ms", "h2d_gb", "d2h_ms", "d2h_gb", "copy_hidden_ms",
                         "copy_exposed_ms", "gpu_idle_ms", "pageable_copies"))
    if device.type == "cuda":
        gpu = gpu_summary(events, window, device.index if device.index is not None else 0)
    else:
        host["sync_ms"] = None
    summary = {"device": device.type, "all_threads": all_threads, "wall_ms": host.pop("wall_ms"), **gpu, **host}
    return _rounded(summary)


def _rounded(value):
    """Floats to the microsecond (ms) or MB (GB): a summary to read, not to re-analyse (the trace is that)."""
    if isinstance(value, float):
        return round(value, 3)
    if isinstance(value, dict):
        return {k: _rounded(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_rounded(v) for v in value]
    return value


# ---- running the profiler around one step ----

def _experimental_config() -> tuple[Optional[object], bool]:
    """The profiler's config recording every thread (and exposing each event's metadata, where a copy's
    bytes are), and whether this torch records every thread."""
    try:
        from torch.profiler import _ExperimentalConfig
    except ImportError:
        return None, False
    for flags in ({"profile_all_threads": True, "expose_kineto_event_metadata": True},
                  {"profile_all_threads": True}):
        try:
            return _ExperimentalConfig(**flags), True
        except TypeError:
            continue
    return None, False


def write_trace(prof, path: Path) -> Path:
    """The Chrome trace at ``path`` (``.json``), gzipped to ``path.gz`` instead when it is large."""
    path.parent.mkdir(parents=True, exist_ok=True)
    prof.export_chrome_trace(str(path))
    if path.stat().st_size <= GZIP_ABOVE_BYTES:
        return path
    zipped = path.with_name(path.name + ".gz")
    with path.open("rb") as src, gzip.open(zipped, "wb") as dst:
        dst.writelines(src)
    os.remove(path)
    return zipped


class StepProfiler:
    """``torch.profiler.profile`` around one step: ``start`` before it, ``stop`` after it (device synced by
    the caller inside :meth:`closing_sync`), which returns the summary. Host ops on every thread, plus the
    device's kernels and copies on CUDA; the Chrome trace written to ``trace_path`` when one is given."""

    def __init__(self, device: torch.device, trace_path: Optional[Path] = None) -> None:
        self.device, self.trace_path = device, trace_path
        self._prof = None
        self._step = None

    def start(self) -> None:
        from torch.profiler import ProfilerActivity, profile, record_function

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.device.type == "cuda" else [])
        config, self._all_threads = _experimental_config()
        # acc_events: one cycle either way; torch 2.11 warns "Profiler clears events at the end of each cycle"
        self._prof = profile(activities=activities, experimental_config=config, acc_events=True)
        self._prof.__enter__()
        self._step = record_function(STEP_RANGE)
        self._step.__enter__()

    def closing_sync(self):
        """The range the clock's own closing device sync runs in, so that it is not counted as the step's."""
        from torch.profiler import record_function

        return record_function(CLOCK_SYNC_RANGE)

    def stop(self) -> dict:
        if self._prof is None:
            raise RuntimeError("StepProfiler.stop() before start()")
        self._step.__exit__(None, None, None)
        self._prof.__exit__(None, None, None)
        summary = summarize(self._prof.events(), self.device, self._all_threads)
        summary["trace"] = str(write_trace(self._prof, self.trace_path)) if self.trace_path else None
        self._prof = None
        return summary
