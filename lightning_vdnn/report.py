"""What one step did with memory, in numbers a user can log and compare."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Optional

from lightning_vdnn.planner import UNBOUNDED

GiB = 2**30


@dataclass(frozen=True)
class MemoryReport:
    """Activation-offload statistics of the latest forward/backward pass.

    Attributes:
        step: how many forward/backward passes the offloader has finished.
        policy: the offload policy that ran (``"auto"`` shows what it resolved to).
        offloaded_bytes: bytes of saved activations copied to host memory (each storage once).
        offloaded_tensors: how many storages were copied.
        kept_bytes: bytes of saved activations left on the device (below threshold, or not chosen).
        prefetched_bytes: bytes brought back to the device for backward (less than offloaded when a tensor was
            still resident and reused without a copy).
        d2h_ms / h2d_ms: time the copies took on their side streams.
        exposed_copy_ms: time the compute stream waited for copies (on a CPU device, every copy is exposed).
        hidden_copy_ms: copy time that overlapped with compute.
        peak_device_bytes: ``torch.cuda.max_memory_allocated`` (since the last reset by the user), None on CPU.
        host_pool_bytes: host memory the buffer pool holds (pinned if ``pinned``).
        host_pool_peak_bytes: most host memory in use by offloaded tensors at once.
        host_allocations: host buffers allocated so far; flat in the steady state.
        budget_bytes, predicted_peak_bytes, measured_peak_bytes, layers_kept, layers_offloaded: the
            ``"auto"`` planner's budget and current plan (None for the fixed policies); measured is the peak of
            the last step the planner watched.
        streamed_h2d_bytes, streamed_d2h_bytes, host_optimizer_ms, host_update_wait_ms: L2L layer streaming
            (None without it): block weights copied to the device and block gradients copied back in the last
            optimizer step; worker time of the blocks' host updates since the step before (they run under
            device work), and how much of it training waited for (the part not hidden).
        microbatches: L2L's layer-major chunks per block (None without layer streaming).
    """

    step: int = 0
    policy: str = "none"
    offloaded_bytes: int = 0
    offloaded_tensors: int = 0
    kept_bytes: int = 0
    prefetched_bytes: int = 0
    d2h_ms: float = 0.0
    h2d_ms: float = 0.0
    exposed_copy_ms: float = 0.0
    hidden_copy_ms: float = 0.0
    peak_device_bytes: Optional[int] = None
    host_pool_bytes: int = 0
    host_pool_peak_bytes: int = 0
    host_allocations: int = 0
    pinned: bool = False
    budget_bytes: Optional[int] = None
    predicted_peak_bytes: Optional[int] = None
    measured_peak_bytes: Optional[int] = None
    layers_kept: Optional[int] = None
    layers_offloaded: Optional[int] = None
    streamed_h2d_bytes: Optional[int] = None
    streamed_d2h_bytes: Optional[int] = None
    host_optimizer_ms: Optional[float] = None
    host_update_wait_ms: Optional[float] = None
    microbatches: Optional[int] = None

    def metrics(self, prefix: str = "vdnn/") -> dict[str, float]:
        """Flat numeric metrics for a Lightning logger (sizes in GiB, times in ms)."""
        out = {
            "offloaded_GiB": self.offloaded_bytes / GiB,
            "kept_GiB": self.kept_bytes / GiB,
            "prefetched_GiB": self.prefetched_bytes / GiB,
            "exposed_copy_ms": self.exposed_copy_ms,
            "hidden_copy_ms": self.hidden_copy_ms,
            "host_pool_GiB": self.host_pool_bytes / GiB,
        }
        if self.peak_device_bytes is not None:
            out["peak_device_GiB"] = self.peak_device_bytes / GiB
        if self.streamed_h2d_bytes is not None:
            out["streamed_h2d_GiB"] = self.streamed_h2d_bytes / GiB
            out["streamed_d2h_GiB"] = (self.streamed_d2h_bytes or 0) / GiB
        if self.host_optimizer_ms is not None:
            out["host_optimizer_ms"] = self.host_optimizer_ms
        if self.host_update_wait_ms is not None:
            out["host_update_wait_ms"] = self.host_update_wait_ms
        return {prefix + k: float(v) for k, v in out.items()}

    def as_dict(self) -> dict:
        return asdict(self)

    def __str__(self) -> str:
        peak = "n/a (CPU)" if self.peak_device_bytes is None else f"{self.peak_device_bytes / GiB:.2f} GiB"
        return (
            f"vDNN memory report (policy={self.policy}, passes={self.step})\n"
            f"  activations offloaded  {self.offloaded_bytes / GiB:8.3f} GiB in {self.offloaded_tensors} tensors\n"
            f"  activations kept       {self.kept_bytes / GiB:8.3f} GiB\n"
            f"  copies d2h / h2d       {self.d2h_ms:8.1f} / {self.h2d_ms:.1f} ms "
            f"(exposed {self.exposed_copy_ms:.1f} ms, hidden {self.hidden_copy_ms:.1f} ms)\n"
            f"  peak device memory     {peak}\n"
            f"  host pool              {self.host_pool_bytes / GiB:8.3f} GiB "
            f"({'pinned' if self.pinned else 'pageable'}, {self.host_allocations} allocations)"
            + (self._plan_line() if self.budget_bytes is not None else "")
            + (self._stream_line() if self.streamed_h2d_bytes is not None else "")
        )

    def _plan_line(self) -> str:
        gib = lambda v: "n/a" if v is None else f"{v / GiB:.2f} GiB"  # noqa: E731
        budget = "none (CPU)" if self.budget_bytes >= UNBOUNDED else gib(self.budget_bytes)
        return (f"\n  plan                   {self.layers_kept} layers kept, {self.layers_offloaded} offloaded; "
                f"budget {budget}, predicted peak {gib(self.predicted_peak_bytes)}, "
                f"measured {gib(self.measured_peak_bytes)}")


    def _stream_line(self) -> str:
        opt = "n/a" if self.host_optimizer_ms is None else f"{self.host_optimizer_ms:.1f} ms"
        if self.host_update_wait_ms is not None:
            opt += f" on the host (waited for {self.host_update_wait_ms:.1f} ms)"
        return (f"\n  layer streaming        {self.streamed_h2d_bytes / GiB:8.3f} GiB weights in, "
                f"{(self.streamed_d2h_bytes or 0) / GiB:.3f} GiB grads out per step; optimizer step {opt}"
                + (f"; {self.microbatches} microbatches per block" if (self.microbatches or 1) > 1 else ""))


def union_length(intervals: list[tuple[float, float]]) -> float:
    """Total length covered by ``intervals`` (overlaps counted once)."""
    total, end = 0.0, float("-inf")
    for lo, hi in sorted(intervals):
        if hi <= end:
            continue
        total += hi - max(lo, end)
        end = hi
    return total
