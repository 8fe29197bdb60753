"""What one step did with memory: numbers a user can log and compare (the end of ``fit`` shows them:
``report/end_of_fit.py``)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Literal, Optional

from lightning_vdnn.units import UNBOUNDED, GiB, format_bytes



@dataclass(frozen=True)
class LayerStats:
    """One layer of the latest pass: what autograd saved for backward from the start of its forward until the
    next layer's (functional ops between layers count for the layer before them), and where that went.

    Attributes:
        index: position in forward order (a layer called twice has two rows); plans index layers so.
        name: the module's qualified name (``"(before the first layer)"`` for row 0).
        saved_bytes: bytes of saved activations, kept plus offloaded.
        offloaded_bytes: bytes of those copied to host memory (each span of storage a saved view covers once:
            views of one storage are copied apiece); the rest stayed on the device (each storage whole and once:
            a storage stays allocated while any view of it is saved).
        decision: ``"keep"``, ``"offload"`` or ``"recompute"``: the plan's choice under ``"auto"`` (a recomputed
            layer's ``saved_bytes`` are what it still saves: its inputs and the code after it); under a fixed
            policy, ``"offload"`` when anything of the layer moved.
        forward_ms: the layer's forward compute in the latest watched step (the planner's profiling or
            verification steps, a fixed policy's first step), from its forward pre-hook to its return, less the
            time compute waited for copies or for the host to pin memory: what the planner takes a recompute to
            cost. None if not measured. On a CPU device copies run inline and are left out as well.
        recompute_ms: time its forward took again in backward in the latest pass (``"recompute"`` only, else
            None), the inputs it brought back included.
        selective: a ``"recompute"`` that is selective: its expensive ops' outputs kept (and counted in
            ``saved_bytes``), the cheap ops run again (``offload/selective.py``).
        lean: a ``"keep"`` whose pointwise activation outputs backward makes again from its kept inputs, so they are
            not held (nor counted in ``saved_bytes``; ``offload/pointwise.py``).
    """

    index: int
    name: str
    saved_bytes: int
    offloaded_bytes: int
    decision: Literal["keep", "offload", "recompute"]
    forward_ms: Optional[float] = None
    recompute_ms: Optional[float] = None
    selective: bool = False
    lean: bool = False

    @property
    def described(self) -> str:
        """The decision as the table shows it: ``"recompute (selective)"``, ``"keep (lean)"`` where so."""
        return "recompute (selective)" if self.selective else "keep (lean)" if self.lean else self.decision

    @property
    def kept_bytes(self) -> int:
        return self.saved_bytes - self.offloaded_bytes


@dataclass(frozen=True)
class MemorySample:
    """Device memory at one moment of a watched step: ``torch.cuda.memory_allocated()`` when ``layer`` began
    its forward (phase ``"forward"``) or when backward unpacked one of its saved tensors (``"backward"``)."""

    phase: Literal["forward", "backward"]
    layer: str
    allocated_bytes: int


@dataclass(frozen=True)
class MemoryReport:
    """Activation-offload statistics of the latest forward/backward pass.

    Attributes:
        step: how many forward/backward passes the offloader has finished.
        policy: the offload policy that ran (``"auto"`` shows what it resolved to).
        offloaded_bytes: bytes of saved activations copied to host memory (each span once).
        offloaded_tensors: how many spans were copied.
        kept_bytes: bytes of saved activations left on the device (below threshold, or not chosen), each storage
            whole and once.
        prefetched_bytes: bytes brought back to the device for backward (less than offloaded when a tensor was
            still resident and reused without a copy).
        d2h_ms / h2d_ms: time the copies took on their side streams.
        exposed_copy_ms: time the compute stream waited for copies (on a CPU device, every copy is exposed).
        hidden_copy_ms: copy time that overlapped with compute.
        peak_device_bytes: ``torch.cuda.max_memory_allocated`` (since the last reset by the user), None on CPU.
        host_pool_bytes: host memory the buffer pool holds (pinned if ``pinned``).
        host_pool_peak_bytes: most host memory in use by offloaded tensors at once.
        host_allocations: host buffers allocated so far; flat in the steady state.
        recomputed_forwards: layer forwards run again in backward in the latest pass (``"auto"``'s recompute).
        recompute_ms: time those recomputes took.
        budget_bytes, predicted_peak_bytes, measured_peak_bytes, layers_kept, layers_offloaded,
            layers_recomputed: the ``"auto"`` planner's budget and current plan (None for the fixed policies);
            measured is the peak of the last step the planner watched.
        segments: of the recomputed layers, the runs recomputed as one segment each (``"auto"`` only).
        layers_selective: of the recomputed layers, those recomputed selectively (``"auto"`` only).
        layers_lean: of the kept layers, those whose pointwise activation outputs backward makes again
            (``"auto"`` only; ``offload/pointwise.py``).
        offloaded_layers: the layers (forward order) the plan offloads (``"auto"`` only; empty while profiling,
            which offloads every layer).
        predicted_copy_ms, predicted_exposed_copy_ms: the plan's copy time both ways, and how much of it compute is
            predicted to wait for (``"auto"`` only; the rest hides under compute, ``planning/copy_link.py``).
        budget_replans: plans made again because a measured peak went over the budget (``"auto"`` only).
        compiled_activation_budget: torch's partitioner memory budget the run set for compiled modules
            (``planning/compiled_budget.py``); None: torch's own.
        budget_kept: whether the measured peak stayed within 2% over the budget (None: not measured, no budget).
        streamed_h2d_bytes, streamed_d2h_bytes, host_optimizer_ms, host_update_wait_ms: L2L layer streaming
            (None without it): block weights copied to the device and block gradients copied back in the last
            optimizer step; worker time of the blocks' host updates since the step before (they run under
            device work), and how much of it training waited for (the part not hidden).
        host_update_bytes: host memory the blocks' one-pass Adam/AdamW updates (``streaming/host_update.py``)
            queued in the last optimizer step read and write: weights, gradient, moments, and the bf16 copy the
            device loads (None without layer streaming, 0 for a same-class optimizer, whose passes are torch's).
        host_update_kernel_ms: of ``host_optimizer_ms``, the time inside the native one-pass kernel, timed in C++
            without the GIL (None on other kernels): the rest is Python around it and the worker winning the GIL
            back from the thread driving the device; the kernel's own rate is ``host_update_bytes`` over it.
        host_state_bytes: host memory the streamed blocks' state holds (None without layer streaming): fp32
            weights, gradients (fp32, or bf16 with ``host_state_dtype="bf16"``), the compute-dtype copies the loads
            read, gradient staging, and the optimizer state of the block parameters.
        microbatches: L2L's layer-major chunks per block (None without layer streaming).
        resident_blocks: L2L's blocks kept on the device (None without layer streaming); with
            ``resident_blocks="auto"``, ``resident_budget_bytes``, ``resident_predicted_peak_bytes`` and
            ``resident_measured_peak_bytes`` are the budget, the peak the choice predicts and the peak of the
            last step measured for it (``planning/resident_blocks.py``; None otherwise, measured None on a CPU device).
        resident_recomputed_blocks: of the resident blocks, those that recompute their activations in backward
            rather than keep them (``"auto"`` makes more blocks resident that way).
        saved_blocks: L2L's streamed blocks that save their activations instead of recomputing them (None without
            layer streaming); with ``saved_blocks="auto"``, ``saved_budget_bytes``, ``saved_predicted_peak_bytes``
            and ``saved_measured_peak_bytes`` are the budget, the peak the choice predicts and the peak of the last
            step measured for it (``planning/saving_blocks.py``).
        batch_chunks, chunk_layers: the module run in dim-0 batch chunks and their number (None: none);
            ``chunks_auto``: chosen by ``batch_chunks="auto"`` because the budget needed them (``planning/auto_chunks.py``).
        layers: one :class:`LayerStats` per layer of the latest pass, in forward order; their ``saved_bytes``
            add up to ``offloaded_bytes + kept_bytes``. Not among ``metrics()`` (a table, not a number).
        timeline: device memory through the latest watched step, one :class:`MemorySample` per layer boundary
            of forward and per unpack of backward; empty on a CPU device (nothing to sample).
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
    recomputed_forwards: int = 0
    recompute_ms: float = 0.0
    budget_bytes: Optional[int] = None
    predicted_peak_bytes: Optional[int] = None
    measured_peak_bytes: Optional[int] = None
    layers_kept: Optional[int] = None
    layers_offloaded: Optional[int] = None
    layers_recomputed: Optional[int] = None
    segments: Optional[int] = None
    layers_selective: Optional[int] = None
    layers_lean: Optional[int] = None
    offloaded_layers: tuple[int, ...] = ()
    predicted_copy_ms: Optional[float] = None
    predicted_exposed_copy_ms: Optional[float] = None
    budget_replans: Optional[int] = None
    compiled_activation_budget: Optional[float] = None
    budget_kept: Optional[bool] = None
    streamed_h2d_bytes: Optional[int] = None
    streamed_d2h_bytes: Optional[int] = None
    host_optimizer_ms: Optional[float] = None
    host_update_wait_ms: Optional[float] = None
    host_update_bytes: Optional[int] = None
    host_update_kernel_ms: Optional[float] = None
    host_state_bytes: Optional[int] = None
    microbatches: Optional[int] = None
    resident_blocks: Optional[int] = None
    resident_recomputed_blocks: Optional[int] = None
    resident_budget_bytes: Optional[int] = None
    resident_predicted_peak_bytes: Optional[int] = None
    resident_measured_peak_bytes: Optional[int] = None
    saved_blocks: Optional[int] = None
    saved_budget_bytes: Optional[int] = None
    saved_predicted_peak_bytes: Optional[int] = None
    saved_measured_peak_bytes: Optional[int] = None
    batch_chunks: Optional[int] = None
    chunk_layers: Optional[str] = None
    chunks_auto: bool = False
    layers: tuple[LayerStats, ...] = ()
    timeline: tuple[MemorySample, ...] = ()

    def metrics(self, prefix: str = "vdnn/") -> dict[str, float]:
        """Flat numeric metrics for a Lightning logger (sizes in GiB, times in ms)."""
        out = {
            "offloaded_GiB": self.offloaded_bytes / GiB,
            "kept_GiB": self.kept_bytes / GiB,
            "prefetched_GiB": self.prefetched_bytes / GiB,
            "exposed_copy_ms": self.exposed_copy_ms,
            "hidden_copy_ms": self.hidden_copy_ms,
            "recompute_ms": self.recompute_ms,
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
        if self.budget_kept is not None:
            out["budget_kept"] = self.budget_kept
        if self.host_update_bytes is not None:
            out["host_update_GiB"] = self.host_update_bytes / GiB
        if self.host_update_kernel_ms is not None:
            out["host_update_kernel_ms"] = self.host_update_kernel_ms
        if self.host_state_bytes is not None:
            out["host_state_GiB"] = self.host_state_bytes / GiB
        if self.resident_blocks is not None:
            out["resident_blocks"] = self.resident_blocks
            out["resident_recomputed_blocks"] = self.resident_recomputed_blocks or 0
        if self.saved_blocks is not None:
            out["saved_blocks"] = self.saved_blocks
        if self.batch_chunks is not None:
            out["batch_chunks"] = self.batch_chunks
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
            + (f"\n  batch chunks           {self.chunks_line()}" if self.batch_chunks is not None else "")
            + (self._stream_line() if self.streamed_h2d_bytes is not None else "")
        )

    def _plan_line(self) -> str:
        gib = lambda v: "n/a" if v is None else format_bytes(v)  # noqa: E731
        budget = "none (CPU)" if self.budget_bytes >= UNBOUNDED else gib(self.budget_bytes)
        lean = f" ({self.layers_lean} lean)" if self.layers_lean else ""
        return (f"\n  plan                   {self.layers_kept} layers kept{lean}, {self.layers_offloaded} offloaded, "
                f"{self.layers_recomputed or 0} recomputed{_in_segments(self.segments, self.layers_selective)} "
                f"({self.recomputed_forwards} recomputes, {self.recompute_ms:.1f} ms); "
                f"budget {budget}, predicted peak {gib(self.predicted_peak_bytes)}, "
                f"measured {gib(self.measured_peak_bytes)}{_kept(self)}" + self._copies_line()
                + ("" if self.compiled_activation_budget is None else
                   f"\n  compiled modules       saved under torch's partitioner budget "
                   f"{self.compiled_activation_budget:.2f}"))

    def _copies_line(self) -> str:
        if not self.offloaded_layers:
            return ""
        total, exposed = self.predicted_copy_ms or 0.0, self.predicted_exposed_copy_ms or 0.0
        return (f"\n  offloaded layers       {layer_ranges(self.offloaded_layers)}: copies predicted {total:.1f} ms, "
                f"{max(0.0, total - exposed):.1f} hidden, {exposed:.1f} exposed")

    def chunks_line(self) -> str:
        """``4 of 'model.features' (auto: the budget is below its unchunked floor)``."""
        return f"{self.batch_chunks} of {self.chunk_layers!r}" + (
            " (auto: the budget is below its unchunked floor)" if self.chunks_auto else "")

    def _stream_line(self) -> str:
        opt = "n/a" if self.host_optimizer_ms is None else f"{self.host_optimizer_ms:.1f} ms"
        if self.host_update_kernel_ms is not None:
            opt += f" ({self.host_update_kernel_ms:.1f} ms in the native kernel)"
        if self.host_update_wait_ms is not None:
            opt += f" on the host (waited for {self.host_update_wait_ms:.1f} ms)"
        if self.host_update_bytes:
            opt += f", {self.host_update_bytes / GiB:.3f} GiB of host memory read and written"
        return (f"\n  layer streaming        {self.streamed_h2d_bytes / GiB:8.3f} GiB weights in, "
                f"{(self.streamed_d2h_bytes or 0) / GiB:.3f} GiB grads out per step; optimizer step {opt}"
                + (f"; host state {self.host_state_bytes / GiB:.3f} GiB" if self.host_state_bytes else "")
                + (f"; {self.microbatches} microbatches per block" if (self.microbatches or 1) > 1 else "")
                + (self._resident_line() if self.resident_blocks or self.resident_budget_bytes is not None else "")
                + (self._saved_line() if self.saved_blocks or self.saved_budget_bytes is not None else ""))

    def _resident_line(self) -> str:
        redone = f", {self.resident_recomputed_blocks} recomputing" if self.resident_recomputed_blocks else ""
        line = f"\n  resident blocks        {self.resident_blocks} on the device{redone}"
        if self.resident_budget_bytes is None:
            return line
        return line + " (auto)" + _budget_tail(self.resident_budget_bytes, self.resident_predicted_peak_bytes,
                                               self.resident_measured_peak_bytes)


    def _saved_line(self) -> str:
        line = f"\n  saving blocks          {self.saved_blocks} streamed blocks keep their activations, not recomputed"
        if self.saved_budget_bytes is None:
            return line
        return line + " (auto)" + _budget_tail(self.saved_budget_bytes, self.saved_predicted_peak_bytes,
                                               self.saved_measured_peak_bytes)


def layer_ranges(layers: tuple[int, ...]) -> str:
    """``(0, 1, 2, 5)`` as ``"0-2, 5"``."""
    runs: list[list[int]] = []
    for g in sorted(layers):
        if runs and g == runs[-1][1] + 1:
            runs[-1][1] = g
        else:
            runs.append([g, g])
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)


def _in_segments(segments: Optional[int], selective: Optional[int] = None) -> str:
    parts = [f"{segments} as segments"] * bool(segments) + [f"{selective} selectively"] * bool(selective)
    return f" ({', '.join(parts)})" if parts else ""


def _kept(report: MemoryReport) -> str:
    """Whether the measured peak kept the budget, and the plans made again to keep it."""
    if report.budget_kept is None:
        return ""
    over = report.measured_peak_bytes / report.budget_bytes - 1
    verdict = "within budget" if report.budget_kept else f"OVER budget by {over:.1%}"
    again = report.budget_replans or 0
    return f" ({verdict}" + (f", after {again} re-plans)" if again else ")")


def _budget_tail(budget: int, predicted: Optional[int], measured: Optional[int]) -> str:
    gib = lambda v: "n/a" if v is None else format_bytes(v)  # noqa: E731
    shown = "none (CPU)" if budget >= UNBOUNDED else gib(budget)
    return f": budget {shown}, predicted peak {gib(predicted)}, measured {gib(measured)}"


def union_length(intervals: list[tuple[float, float]]) -> float:
    """Total length covered by ``intervals`` (overlaps counted once)."""
    total, end = 0.0, float("-inf")
    for lo, hi in sorted(intervals):
        if hi <= end:
            continue
        total += hi - max(lo, end)
        end = hi
    return total
