"""Backward's side of offload: bring offloaded spans back to the device before backward reads them.

Backward reads saved tensors in roughly the reverse order forward saved them, so when it first reads group
``g`` the groups below ``g`` are next. Two ways to say how far ahead to copy:

* by layers (a model is attached): keep ``prefetch_layers`` layers below the one backward is in on their way
  back, so the copy of layer ``i-1`` runs while layer ``i`` computes;
* by a plan's schedule (:meth:`Prefetcher.plan`): layer ``j``'s copy starts as backward reaches its cue layer
  ``c > j``, however many layers ahead that is (a copy that takes five layers' backward starts five layers up;
  ``planning/copy_link.py`` chooses the cues within the budget). Backward reaching a layer is seen at its first
  unpack: of its offloaded tensors, or of those it keeps, which the offloader packs as a :class:`Cue` where a copy
  waits on that layer;
* by bytes (no model, as ``torch.autograd.graph.save_on_cpu``): each saved span is its own group, and the
  spans saved before the one backward reads are copied back in reverse order of saving while the bytes
  copied ahead and not yet read stay within ``max_ahead_bytes`` (at least one span ahead, however large). A
  span read stays on the device until backward reads one saved earlier: a span two nodes saved (a ReLU's
  output that the next Linear saves too) is read twice in a row, and would otherwise be copied twice.

Copies run on the engine's host->device stream on CUDA, inline on a CPU device.
"""

from __future__ import annotations

import weakref
from typing import Optional, Sequence

import torch

from lightning_vdnn.offload.host_pool import CopyEngine
from lightning_vdnn.offload.spans import Offloaded


class Cue:
    """A kept saved tensor of layer ``group``: its unpack tells the prefetcher that backward has reached the layer."""

    __slots__ = ("tensor", "group")

    def __init__(self, tensor: torch.Tensor, group: int) -> None:
        self.tensor, self.group = tensor, group


class Prefetcher:
    """Copies offloaded spans back for one pass at a time; :meth:`reset` between passes.

    Args:
        engine: the offloader's copy engine (streams and events).
        prefetch_layers: groups to keep on their way back (layer mode).
        max_ahead_bytes: None for layer mode; else per-tensor mode, with this bound on bytes copied ahead.
    """

    def __init__(self, engine: CopyEngine, prefetch_layers: int = 1, max_ahead_bytes: Optional[int] = None) -> None:
        self.engine = engine
        self.prefetch_layers = prefetch_layers
        self.max_ahead_bytes = max_ahead_bytes
        self.plan(())
        self.reset()

    def plan(self, prefetch_from: Sequence[tuple[int, int]]) -> None:
        """From the next pass: each ``(layer, cue)``'s copy back starts as backward reaches layer ``cue`` (layer
        mode); offloaded layers not named are copied back as backward reads them. Empty: ``prefetch_layers``."""
        self._cue_of = {int(j): int(c) for j, c in prefetch_from}
        self.cues = frozenset(self._cue_of.values())

    def cue(self, tensor: torch.Tensor, group: int) -> object:
        """What to save for a tensor layer ``group`` keeps: a :class:`Cue` where a copy back waits on the layer."""
        return Cue(tensor, group) if group in self.cues else tensor

    def reset(self) -> None:
        self._started: set[int] = set()       # scheduled groups whose copy back has started
        self._frontier: Optional[int] = None  # the lowest group a prefetch has reached
        self._copied_groups: list[int] = []    # groups whose prefetch took a copy (layer mode)
        for e in getattr(self, "_read", ()):
            e.hold = None
        self._ahead: list[Offloaded] = []      # spans copied ahead, maybe not read yet (per-tensor mode)
        self._read: list[Offloaded] = []       # spans read and kept for a second read (per-tensor mode)

    @property
    def scheduled(self) -> bool:
        """Whether a plan's schedule says when copies back start (:meth:`reached`, not :meth:`below`)."""
        return bool(self._cue_of)

    def advance(self, groups: list[list[Offloaded]], layer: int, owner: int, trace) -> None:
        """Backward reads a save of ``layer`` whose bytes are layer ``owner``'s: start the copies back now due, by
        the plan's cues (:meth:`reached`) or, without a schedule, by layers or bytes below ``owner`` (:meth:`below`)."""
        if self.scheduled:
            self.reached(groups, layer, trace)
        else:
            self.below(groups, owner, trace)

    def below(self, groups: list[list[Offloaded]], group: int, trace) -> None:
        """Backward reads ``group`` now: start the copies of the groups it will read next."""
        if self._frontier is None:
            self._frontier = group
        if self.max_ahead_bytes is None:
            self._layers_below(groups, group, trace)
        else:
            for e in self._read:
                if e.group > group:  # backward has moved below it: its copy goes with autograd's reference
                    e.hold = None
            self._read = [e for e in self._read if e.group <= group]
            self._bytes_below(groups, group, trace)

    def read(self, entry: Offloaded) -> None:
        """Backward has read ``entry`` (after :meth:`below` and :meth:`wait`)."""
        entry.used = True
        if self.max_ahead_bytes is None:
            entry.hold = None
        elif isinstance(entry.hold, torch.Tensor):  # a copy we made (not the original storage): keep it a while
            self._read.append(entry)
        else:
            entry.hold = None

    def _layers_below(self, groups: list[list[Offloaded]], group: int, trace) -> None:
        ahead = sum(1 for g in self._copied_groups if g < group)
        while ahead < self.prefetch_layers and self._frontier > 0:
            self._frontier -= 1
            pending = [e for e in groups[self._frontier] if not e.used and e.hold is None]
            if any([self.fetch(e, trace) for e in pending]):
                self._copied_groups.append(self._frontier)
                ahead += 1

    def reached(self, groups: list[list[Offloaded]], layer: int, trace) -> None:
        """Backward reads a save of ``layer`` (scheduled mode; the bytes may be an earlier layer's): start the
        copies back whose cue it has reached (a cue it skipped counts), top layer first, the plan's queue order."""
        due = [j for j, cue in self._cue_of.items() if cue >= layer and j not in self._started and j < len(groups)]
        for j in sorted(due, reverse=True):
            self._started.add(j)
            for e in groups[j]:
                if not e.used and e.hold is None:
                    self.fetch(e, trace)

    def _bytes_below(self, groups: list[list[Offloaded]], group: int, trace) -> None:
        self._ahead = [e for e in self._ahead if not e.used and e.group < group]  # not the one being read
        ahead = sum(e.nbytes for e in self._ahead)
        while self._frontier > 0:
            pending = [e for e in groups[self._frontier - 1] if not e.used and e.hold is None]
            size = sum(e.nbytes for e in pending)
            if self._ahead and ahead + size > self.max_ahead_bytes:
                return  # the next copy waits until backward reads what is on its way
            self._frontier -= 1
            for e in pending:
                if self.fetch(e, trace):
                    self._ahead.append(e)
                    ahead += e.nbytes

    def fetch(self, entry: Offloaded, trace) -> bool:
        """Make ``entry`` resident on the device; True if that took a host->device copy."""
        resident = entry.dev()
        if resident is not None:
            entry.hold = resident  # keep it until backward uses it
            return False
        eng = self.engine
        with eng.stream(eng.h2d):
            if eng.is_cuda:
                eng.h2d.wait_event(entry.last_use)
            start = eng.record(eng.h2d)
            dev = torch.empty(entry.nbytes, dtype=torch.uint8, device=eng.device)
            dev.copy_(entry.host[: entry.nbytes], non_blocking=True)
            done = eng.record(eng.h2d)
        trace.h2d.append((start, done))
        trace.prefetched_bytes += entry.nbytes
        entry.hold, entry.dev, entry.dev_lo = dev, weakref.ref(dev.untyped_storage()), entry.lo
        entry.ready = entry.last_use = done
        return True

    def wait(self, entry: Offloaded, trace) -> None:
        """The consumer (current stream) waits for ``entry``'s copy; the wait is recorded as exposure."""
        eng = self.engine
        need = eng.record()
        if eng.is_cuda:
            stream = eng.current_stream()
            stream.wait_event(entry.ready)
            if isinstance(entry.hold, torch.Tensor):
                entry.hold.record_stream(stream)  # allocated on the copy stream, freed after this one reads it
        trace.waits.append((need, entry.ready))
        entry.ready = None
