"""How a case is measured: synchronized wall-clock per step, peak device memory, peak host RSS, versions.

Every case, raw loop or Lightning, uses these same functions, so that their numbers are comparable.
"""

from __future__ import annotations

import platform
import resource
import statistics
import time
from importlib import metadata
from typing import Callable, Optional

import torch


class StepClock:
    """Wall-clock time of each step, with the device synchronized at both ends so queued kernels count, and
    the step's loss (read after the clock stopped, so its copy to the host is not timed).

    The first ``start`` also resets the device's peak-memory counters: every case's peak then covers its
    training steps (warm-up included) and not its set-up, e.g. DeepSpeed holding the whole model on the GPU
    for a moment before partitioning it, which a user avoids with ``zero.Init``.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.times: list[float] = []
        self.losses: list[float] = []
        self._t0 = 0.0

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def start(self) -> None:
        self._sync()
        if not self.times and self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        self._t0 = time.perf_counter()

    def stop(self, loss: Optional[torch.Tensor] = None) -> None:
        self._sync()
        self.times.append(time.perf_counter() - self._t0)
        if loss is not None:
            self.losses.append(float(loss))


def timed_loop(step: Callable[[], Optional[torch.Tensor]], n: int, device: torch.device) -> StepClock:
    """Run ``step`` ``n`` times; the clock holds the time of each call and the loss each returned."""
    clock = StepClock(device)
    for _ in range(n):
        clock.start()
        clock.stop(step())
    return clock


def summarize(times: list[float], warmup: int, items_per_step: int, flops_per_step: float) -> dict:
    """Median over the steps after warm-up, and the throughput and model TFLOP/s it implies."""
    timed = times[warmup:]
    if not timed:
        raise RuntimeError(f"no timed steps: {len(times)} steps ran, {warmup} of them warm-up.")
    step_s = statistics.median(timed)
    return {
        "step_s": step_s,
        "step_s_all": times,
        "items_per_s": items_per_step / step_s,
        "tflops": flops_per_step / step_s / 1e12,
    }


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
