"""The record of one forward/backward pass, and its resolution into a :class:`MemoryReport` and the planner's
per-layer profile.

The offload hooks only count and record events while a pass runs; turning events into milliseconds (which
synchronizes with them) and counts into per-layer rows waits until someone asks for a report. A watched pass
(the planner's profiling and verification steps, a fixed policy's first step) also keeps a
:class:`PassTimeline`: when each layer's forward began and returned, and on a GPU ``torch.cuda.memory_allocated()``
(a counter the allocator keeps on the host: no synchronization) at each layer boundary and each unpack; and a
:class:`~lightning_vdnn.offload.recompute_probe.LayerProbe`, what each layer would still save if recomputed.
"""

from __future__ import annotations

import collections
import contextlib
import math
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional

import numpy as np
import torch
from torch import nn

from lightning_vdnn.offload.host_pool import CopyEngine, completed, elapsed_ms
from lightning_vdnn.offload.recompute_probe import LayerProbe, SegmentFacts, SelectiveFacts
from lightning_vdnn.offload.spans import StorageSet
from lightning_vdnn.report.memory_report import LayerStats, MemoryReport, MemorySample, union_length

#: Name of layer 0: what autograd saves before the first layer boundary.
BEFORE_FIRST_LAYER = "(before the first layer)"


@dataclass(frozen=True)
class LayerProfile:
    """One layer (a call of a layer module, forward order) as the solver sees it.

    Attributes:
        saved_bytes: what its forward saves for backward that offload could move (``b``), as device memory: each
            storage whole and once, for the layer whose save first keeps it alive (``offload/ledger.py``).
        recompute_bytes: what it still saves when its forward runs again in backward (``r``): its inputs that no
            earlier layer saved, and what code between it and the next layer saves. None: it cannot be
            recomputed (the part before the first layer, BatchNorm running statistics, an input modified in
            place, tensors a later layer saves too; see ``offload/recompute_probe.py``).
        forward_ms: its forward's compute: what a recompute costs again (``f``).
        transfer_ms: one copy of ``copied_bytes``, either way, at the measured bandwidth (``t``).
        overlap_ms: compute a copy can hide under: the next layer's forward (``w``); 0 where copies are inline.
        inputs: shapes of its tensor inputs: the planner starts over when they change.
        segment: what it contributes to a run of layers recomputed as one segment; None: it cannot be in one.
        copied_bytes: what offloading it copies to the host, span by span (views of one storage are copied
            apiece, so this can exceed ``saved_bytes``); None: ``saved_bytes``.
        selective: what recomputing it selectively (its expensive ops' outputs kept, ``offload/selective.py``)
            holds and costs; None: it cannot be.
        pointwise_bytes: of ``saved_bytes``, what keeping it *lean* does not hold: its pointwise activations'
            outputs, made again in backward from the inputs it keeps (``offload/pointwise.py``); ``pointwise_ms``:
            what making them again costs (timed once in the profiling pass).
    """

    saved_bytes: int
    recompute_bytes: Optional[int] = None
    forward_ms: float = 0.0
    transfer_ms: float = 0.0
    overlap_ms: float = 0.0
    inputs: tuple = ()
    segment: Optional[SegmentFacts] = None
    copied_bytes: Optional[int] = None
    selective: Optional[SelectiveFacts] = None
    pointwise_bytes: int = 0
    pointwise_ms: float = 0.0

    def __post_init__(self) -> None:
        for name in ("saved_bytes", "recompute_bytes", "copied_bytes", "pointwise_bytes"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, (int, np.integer)) or value < 0):
                raise ValueError(f"LayerProfile {name}={value!r} must be a byte count >= 0.")
        for name in ("forward_ms", "transfer_ms", "overlap_ms", "pointwise_ms"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise ValueError(f"LayerProfile {name}={value!r} must be a finite time in ms >= 0.")

    @property
    def offload_ms(self) -> float:
        """Copy time not hidden: out beside the next layer's forward, back beside its backward (twice as long)."""
        t, w = self.transfer_ms, self.overlap_ms
        return max(0.0, t - w) + max(0.0, t - 2 * w)

    @property
    def offload_bytes(self) -> int:
        """Bytes offloading it copies to the host (``copied_bytes``, else ``saved_bytes``)."""
        return self.saved_bytes if self.copied_bytes is None else self.copied_bytes

    @property
    def rebuilt_bytes(self) -> int:
        """What a recompute rebuilds in the layer's backward: what it saved, less what it still saves."""
        return max(0, self.saved_bytes - (self.recompute_bytes or 0))

    @property
    def selective_ms(self) -> float:
        """What a selective recompute costs: the share of its forward that the cheap ops take."""
        return 0.0 if self.selective is None else self.forward_ms * self.selective.share

    @property
    def selective_rebuilt_bytes(self) -> int:
        """What a selective recompute rebuilds in backward: what it saved, less its inputs and the kept outputs."""
        return 0 if self.selective is None else max(0, self.saved_bytes - self.selective.unrebuilt_bytes)


class PassTimeline:
    """Events at the start and the return of each layer's forward, copy time that blocked compute (a CPU device
    copies inline), and memory samples through the pass (GPU only)."""

    def __init__(self, engine: CopyEngine) -> None:
        self.engine = engine
        self.starts = [engine.record()]  # layer 0 begins with the pass
        self.returns: dict[int, tuple[object, float]] = {}  # layer -> (event as its forward returned, inline_ms)
        self.end: Optional[object] = None
        self.samples: list[tuple[str, int, int]] = []  # (phase, layer, bytes allocated)
        self.inline_ms = 0.0
        self._inline = [0.0]  # inline_ms as each layer began
        self._stalls: list[tuple[int, bool, object, object]] = []  # (layer, after its return, start, end)
        self._last_layer = 0
        self._sample("forward", 0)

    def layer(self, index: int) -> None:
        """Layer ``index``'s forward begins."""
        self.starts.append(self.engine.record())
        self._inline.append(self.inline_ms)
        self._sample("forward", index)

    def layer_return(self, index: int) -> None:
        """Layer ``index``'s module returned from its forward (what follows until the next layer is code after it)."""
        self.returns[index] = (self.engine.record(), self.inline_ms)

    def copied(self, start: object, done: object) -> None:
        """A copy ran inline, blocking compute: its time is not the layer's."""
        self.inline_ms += start.elapsed_time(done)

    def stalled(self, start: object, end: object) -> None:
        """Compute waited (between two events of its stream) for something that is not the layer's work: copies
        in flight (the in-flight cap), or the host pinning a new buffer (the first step's pool growth: 17 s over
        gpt_1b's 340 buffers on the H200, against 0.4 s of compute). Read when the pass is over, like every other
        span on a GPU."""
        layer = len(self.starts) - 1
        self._stalls.append((layer, layer in self.returns, start, end))

    def _stall_ms(self, within_module: bool) -> dict[int, float]:
        out: dict[int, float] = collections.defaultdict(float)
        for layer, after, start, end in self._stalls:
            if not (within_module and after):
                out[layer] += elapsed_ms([(start, end)])
        return out

    def end_forward(self) -> None:
        if self.end is None:
            self.end = self.engine.record()

    def unpack(self, index: Optional[int]) -> None:
        """Backward brought back a saved tensor of layer ``index`` (None: one left in place, layer not known)."""
        self._sample("backward", self._last_layer if index is None else index)

    def forward_ms(self) -> list[float]:
        """Milliseconds from each layer's start to the next one's (the last layer's: to the end of forward)."""
        ends = self.starts[1:] + ([self.end] if self.end is not None else [])
        return [elapsed_ms([(s, e)]) for s, e in zip(self.starts, ends)]

    def compute_ms(self) -> list[float]:
        """:meth:`forward_ms` less the copies that ran inline: the compute a copy on a side stream can hide under."""
        inline, stalls = self._inline[1:] + [self.inline_ms], self._stall_ms(within_module=False)
        return [max(0.0, ms - (inline[g] - self._inline[g]) - stalls.get(g, 0.0))
                for g, ms in enumerate(self.forward_ms())]

    def module_ms(self) -> list[float]:
        """Each layer's own forward, start to return, less inline copies and waits for the in-flight cap: what
        recomputing it costs. A layer that never returned (layer 0, before the first module) counts its whole
        span."""
        out, stalls = self.compute_ms(), self._stall_ms(within_module=True)
        for g, (done, inline) in self.returns.items():
            if g < len(out):
                own = elapsed_ms([(self.starts[g], done)]) - (inline - self._inline[g]) - stalls.get(g, 0.0)
                out[g] = max(0.0, own)
        return out

    def _sample(self, phase: str, index: int) -> None:
        self._last_layer = index
        if self.engine.is_cuda:
            self.samples.append((phase, index, torch.cuda.memory_allocated(self.engine.device)))


class PassTrace:
    """Raw numbers and events of one forward/backward; resolved into a MemoryReport on demand."""

    def __init__(self, engine: CopyEngine) -> None:
        self.engine = engine
        self.start = engine.record()
        self.saved = self.offloaded_bytes = self.offloaded_tensors = self.kept_bytes = self.prefetched_bytes = 0
        self.groups = 0
        # per layer, of what the policy would move (``offload/ledger.py``): device bytes, each storage once (what
        # keeping the layer holds), and bytes copied, each span once (what moving it copies)
        self.candidate_bytes: dict[int, int] = collections.defaultdict(int)
        self.copy_bytes: dict[int, int] = collections.defaultdict(int)
        self.kept_by_group: dict[int, int] = collections.defaultdict(int)
        self.offloaded_by_group: dict[int, int] = collections.defaultdict(int)
        self.names: list[str] = [BEFORE_FIRST_LAYER]
        self.modules: list[Optional[nn.Module]] = [None]  # per layer: the module whose call it is
        self.inputs: list[tuple] = [()]  # per layer: the shapes of its tensor inputs
        self.keep: Optional[frozenset[int]] = None  # the plan this pass ran
        self.recompute: frozenset[int] = frozenset()
        self.selective: frozenset[int] = frozenset()  # of those, the layers recomputed selectively
        self.lean: frozenset[int] = frozenset()  # kept layers whose pointwise outputs backward makes again
        self.timeline: Optional[PassTimeline] = None  # set on a watched pass
        self.probe: Optional[LayerProbe] = None  # set on a watched pass that recomputes nothing
        self.d2h: list[tuple[object, object]] = []
        self.h2d: list[tuple[object, object]] = []
        self.waits: list[tuple[object, object]] = []
        self.recomputes: list[tuple[int, object, object]] = []  # (layer, start, end) of each recompute in backward
        # per layer, what keeping it lean would leave to backward (a watched pass): output storages and their
        # rebuild, timed once each
        self.pointwise: list[tuple[object, object, int]] = []  # (start, end, layer) of each output's rebuild, timed
        self._pointwise_seen = StorageSet()  # the output storages counted
        self.pointwise_bytes: dict[int, int] = collections.defaultdict(int)

    @contextlib.contextmanager
    def recompute_span(self, group: int) -> Iterator[None]:
        """Counts and times one recompute of layer ``group`` in backward."""
        start = self.engine.record()
        try:
            yield
        finally:
            self.recomputes.append((group, start, self.engine.record()))

    def time_pointwise(self, group: int, out: torch.Tensor, op: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """A watched pass saw ``out``, layer ``group``'s pointwise activation output: count its storage once and time
        ``op`` on a tensor like it, what rebuilding it in backward would cost (``offload/pointwise.py``)."""
        storage = out.untyped_storage()
        if storage in self._pointwise_seen:
            return
        self._pointwise_seen.add(storage)
        start = self.engine.record()
        with torch.no_grad(), torch.autocast(out.device.type, enabled=False):
            op(out)
        self.pointwise.append((start, self.engine.record(), group))
        self.pointwise_bytes[group] += storage.nbytes()

    def report(self, watched: Optional["PassTrace"], **common: Any) -> MemoryReport:
        """This pass's numbers; per-layer times and the memory timeline from ``watched``, the latest watched pass."""
        d2h = elapsed_ms(self.d2h)
        h2d = elapsed_ms(self.h2d)
        if self.engine.is_cuda:
            self.start.synchronize()
            spans = [(self.start.elapsed_time(n), self.start.elapsed_time(r)) for n, r in completed(self.waits)]
            exposed = union_length([(lo, hi) for lo, hi in spans if hi > lo])
        else:
            exposed = d2h + h2d  # inline copies block compute
        recompute = self._recompute_ms()
        return MemoryReport(
            offloaded_bytes=self.offloaded_bytes, offloaded_tensors=self.offloaded_tensors,
            kept_bytes=self.kept_bytes, prefetched_bytes=self.prefetched_bytes, d2h_ms=d2h, h2d_ms=h2d,
            exposed_copy_ms=exposed, hidden_copy_ms=max(d2h + h2d - exposed, 0.0), **common,
            recomputed_forwards=len(self.recomputes), recompute_ms=sum(recompute.values()),
            layers=self._layers(watched, recompute), timeline=_samples(watched),
        )

    def profile(self) -> list[LayerProfile]:
        """This pass layer by layer as the planner reads it: bytes and input shapes; on a watched pass also times
        (transfer at the bandwidth its copies reached) and, if it recomputed nothing, recompute sizes."""
        inputs = self.inputs + [()] * (self.groups - len(self.inputs))
        if self.timeline is None:
            return [LayerProfile(self.candidate_bytes.get(g, 0), inputs=inputs[g],
                                 copied_bytes=self.copy_bytes.get(g, 0)) for g in range(self.groups)]
        moved = self.offloaded_bytes + self.prefetched_bytes
        ms_per_byte = (elapsed_ms(self.d2h) + elapsed_ms(self.h2d)) / moved if moved else 0.0
        compute, module = self.timeline.compute_ms(), self.timeline.module_ms()
        compute += [0.0] * (self.groups + 1 - len(compute))
        module += [0.0] * (self.groups - len(module))
        rebuild_ms: dict[int, float] = collections.defaultdict(float)
        for start, end, g in self.pointwise:
            rebuild_ms[g] += elapsed_ms([(start, end)])
        out = []
        for g in range(self.groups):
            copied = self.copy_bytes.get(g, 0)
            out.append(LayerProfile(
                self.candidate_bytes.get(g, 0), self.probe.recompute_bytes(g) if self.probe is not None else None,
                forward_ms=module[g], transfer_ms=copied * ms_per_byte, copied_bytes=copied,
                overlap_ms=compute[g + 1] if self.engine.is_cuda else 0.0,
                inputs=inputs[g], segment=self.probe.segment_facts(g) if self.probe is not None else None,
                selective=self.probe.selective(g) if self.probe is not None else None,
                pointwise_bytes=min(self.pointwise_bytes.get(g, 0), self.candidate_bytes.get(g, 0)),
                pointwise_ms=rebuild_ms.get(g, 0.0)))
        return out

    def _recompute_ms(self) -> dict[int, float]:
        out: dict[int, float] = collections.defaultdict(float)
        for g, start, end in self.recomputes:
            out[g] += elapsed_ms([(start, end)])
        return out

    def _layers(self, watched: Optional["PassTrace"], recompute: dict[int, float]) -> tuple[LayerStats, ...]:
        same = watched is not None and watched.names == self.names  # times only if the layers match
        times = watched.timeline.module_ms() if same else []
        rows = []
        for g, name in enumerate(self.names):
            moved = self.offloaded_by_group.get(g, 0)
            keep = g in self.keep if self.keep is not None else not moved
            decision = "recompute" if g in self.recompute else "keep" if keep else "offload"
            rows.append(LayerStats(g, name, self.kept_by_group.get(g, 0) + moved, moved, decision,
                                   times[g] if g < len(times) else None, recompute.get(g), g in self.selective,
                                   keep and g in self.lean))
        return tuple(rows)


def _samples(watched: Optional[PassTrace]) -> tuple[MemorySample, ...]:
    if watched is None:
        return ()
    names = watched.names
    return tuple(MemorySample(phase, names[g] if g < len(names) else "", n)
                 for phase, g, n in watched.timeline.samples)


class PassRecords:
    """The finished passes' numbers, as the planner and the report read them (mixed into
    :class:`~lightning_vdnn.offload.offloader.ActivationOffloader`, whose state they are)."""

    @property
    def passes(self) -> int:
        """Forward/backward passes finished so far (aborted ones not counted)."""
        return self._passes

    def layer_bytes(self) -> list[int]:
        """Device bytes per layer (forward order, each storage once) of the last pass that its policy would offload,
        kept or not."""
        trace = self._last
        if trace is None:
            return []
        return [trace.candidate_bytes.get(g, 0) for g in range(trace.groups)]

    def layer_names(self) -> list[str]:
        """The module name of each layer call of the last pass, forward order (layer 0: before the first)."""
        trace = self._last
        return [] if trace is None else list(trace.names)

    def layer_modules(self) -> list[Optional[nn.Module]]:
        """The module whose call each layer of the last pass was, forward order (layer 0, before the first: None)."""
        trace = self._last
        return [] if trace is None else list(trace.modules)

    def layer_profile(self) -> list[LayerProfile]:
        """The last pass, layer by layer, as the planner reads it (times and recompute sizes if it was watched)."""
        trace = self._last
        return [] if trace is None else trace.profile()

    def report(self) -> MemoryReport:
        """Numbers of the last finished pass (an empty report before the first)."""
        with self._lock:
            trace = self._last
        peak = torch.cuda.max_memory_allocated(self.device) if self.engine.is_cuda else None
        common = dict(policy=self.policy, step=self._passes, peak_device_bytes=peak,
                      host_pool_bytes=self.pool.reserved_bytes, host_pool_peak_bytes=self.pool.peak_in_use_bytes,
                      host_allocations=self.pool.allocations, pinned=self.pool.pin_memory)
        if trace is None:
            return MemoryReport(**common)
        return trace.report(self._watched, **common)
