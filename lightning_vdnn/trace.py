"""The record of one forward/backward pass, and its resolution into a :class:`MemoryReport`.

The offload hooks only count and record events while a pass runs; turning events into milliseconds (which
synchronizes with them) and counts into per-layer rows waits until someone asks for a report. A watched pass
(the planner's profiling and verification steps, a fixed policy's first step) also keeps a
:class:`PassTimeline`: when each layer's forward began, and on a GPU ``torch.cuda.memory_allocated()`` (a
counter the allocator keeps on the host: no synchronization) at each layer boundary and each unpack.
"""

from __future__ import annotations

import collections
from typing import Any, Optional

import torch

from lightning_vdnn.pool import CopyEngine, completed, elapsed_ms
from lightning_vdnn.report import LayerStats, MemoryReport, MemorySample, union_length

#: Name of layer 0: what autograd saves before the first layer boundary.
BEFORE_FIRST_LAYER = "(before the first layer)"


class PassTimeline:
    """Events at the start of each layer of one forward, and memory samples through the pass (GPU only)."""

    def __init__(self, engine: CopyEngine) -> None:
        self.engine = engine
        self.starts = [engine.record()]  # layer 0 begins with the pass
        self.end: Optional[object] = None
        self.samples: list[tuple[str, int, int]] = []  # (phase, layer, bytes allocated)
        self._last_layer = 0
        self._sample("forward", 0)

    def layer(self, index: int) -> None:
        """Layer ``index``'s forward begins."""
        self.starts.append(self.engine.record())
        self._sample("forward", index)

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
        self.candidate_bytes: dict[int, int] = collections.defaultdict(int)  # per layer: what "all" would move
        self.kept_by_group: dict[int, int] = collections.defaultdict(int)
        self.offloaded_by_group: dict[int, int] = collections.defaultdict(int)
        self.names: list[str] = [BEFORE_FIRST_LAYER]
        self.keep: Optional[frozenset[int]] = None  # the plan this pass ran
        self.timeline: Optional[PassTimeline] = None  # set on a watched pass
        self.d2h: list[tuple[object, object]] = []
        self.h2d: list[tuple[object, object]] = []
        self.waits: list[tuple[object, object]] = []

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
        return MemoryReport(
            offloaded_bytes=self.offloaded_bytes, offloaded_tensors=self.offloaded_tensors,
            kept_bytes=self.kept_bytes, prefetched_bytes=self.prefetched_bytes, d2h_ms=d2h, h2d_ms=h2d,
            exposed_copy_ms=exposed, hidden_copy_ms=max(d2h + h2d - exposed, 0.0), **common,
            layers=self._layers(watched), timeline=_samples(watched),
        )

    def _layers(self, watched: Optional["PassTrace"]) -> tuple[LayerStats, ...]:
        same = watched is not None and watched.names == self.names  # times only if the layers match
        times = watched.timeline.forward_ms() if same else []
        rows = []
        for g, name in enumerate(self.names):
            moved = self.offloaded_by_group.get(g, 0)
            keep = g in self.keep if self.keep is not None else not moved
            rows.append(LayerStats(g, name, self.kept_by_group.get(g, 0) + moved, moved,
                                   "keep" if keep else "offload", times[g] if g < len(times) else None))
        return tuple(rows)


def _samples(watched: Optional[PassTrace]) -> tuple[MemorySample, ...]:
    if watched is None:
        return ()
    names = watched.names
    return tuple(MemorySample(phase, names[g] if g < len(names) else "", n)
                 for phase, g, n in watched.timeline.samples)
